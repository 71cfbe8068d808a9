"""Baselines for a speech-translation dev set, scored exactly as `eval.py` scores our model.

    python bench/baselines.py --whisper $ESRT_REAL_DIR/whisper-base --llm $ESRT_REAL_DIR/gemma3-270m \
        --data $ESRT_REAL_DIR/fillets/dev.jsonl --shots-from $ESRT_REAL_DIR/fillets/train.jsonl \
        [--data .../fillets_ces/dev.jsonl --shots-from .../fillets_ces/train.jsonl] \
        [--tgt eng,deu] [--clips 30] [--shots 3] --out runs/baselines

Systems (each written as OUT/<system>/results.jsonl in the ESRT result schema, then scored into
OUT/<system>/scores/ by `eval.py --score`'s code; one closing table):

- `whisper`: Whisper's own transcription (`task=transcribe`, the source language given) -> `asr_r`,
  and its own speech translation (`task=translate`: into English only) -> `s2tt_r` of the `eng`
  records. Its WER/CER is the cascade's transcript quality.
- `cascade`: the Whisper transcript -> the LLM prompted to translate (`--shots` examples of the same
  direction from `--shots-from`, a plain "Dutch: ... / English: ..." prompt; greedy, one line).
- `oracle`: the reference transcript -> the same LLM and prompt (no transcript hypothesis is scored).

Whisper's decoder and the LLM run in PyTorch (transformers; the `torch` extra), greedy. `--clips`
takes the first N clips of each `--data` file (records of the same clip share one Whisper decode),
`--tgt` the target languages, so a CPU run stays short; it prints its wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esrt_jax import languages  # noqa: E402
from esrt_jax.audio import load_audio  # noqa: E402
from esrt_jax.cli.eval import build_parser, run_score  # noqa: E402

SYSTEMS = ("whisper", "cascade", "oracle")


def read_set(path: Path, clips: int, tgts: set[str] | None) -> list[dict]:
    """Records of the first `clips` clips (by first appearance) whose target is in `tgts`."""
    recs, keep = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        key = r.get("clip") or r["audio"]
        if key not in keep:
            if clips and len(keep) >= clips:
                continue
            keep.append(key)
        if tgts and r["tgt"] not in tgts:
            continue
        recs.append({**r, "audio": str((path.parent / r["audio"]).resolve())})
    return recs


def few_shot(path: Path, src: str, tgt: str, k: int) -> list[tuple[str, str]]:
    """The first k records of `src`->`tgt` in `path` with short texts (fixed: the same for every run)."""
    shots = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["src"] == src and r["tgt"] == tgt and 3 <= len(r["asr"].split()) <= 12:
            shots.append((r["asr"], r["s2tt"]))
        if len(shots) == k:
            break
    return shots


class Whisper:
    """transformers' WhisperForConditionalGeneration, greedy, 30 s features."""

    def __init__(self, model_dir: str):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor  # torch extra

        self.proc = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        self.model = WhisperForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()

    def run(self, audios: list[str], lang: str, task: str, batch: int = 8) -> list[str]:
        import torch

        code = languages.get(lang).fleurs.split("_")[0]  # ISO 639-1, as Whisper names languages
        out = []
        for i in range(0, len(audios), batch):
            wavs = [load_audio(a) for a in audios[i:i + batch]]
            feats = self.proc(wavs, sampling_rate=16000, return_tensors="pt").input_features
            with torch.no_grad():
                ids = self.model.generate(feats, language=code, task=task, max_new_tokens=96)
            out += [t.strip() for t in self.proc.batch_decode(ids, skip_special_tokens=True)]
        return out


class LLMTranslator:
    """A causal LM prompted with k examples: 'Dutch: x\\nEnglish: y\\n\\n' ... greedy to the newline."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer  # torch extra

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                          dtype=torch.float32).eval()
        # Stop at the end of the line: "\n" and "\n\n" are separate tokens in some vocabularies.
        self.stop = sorted({self.tok.encode(nl, add_special_tokens=False)[-1] for nl in ("\n", "\n\n")}
                           | {self.tok.eos_token_id})

    def translate(self, texts: list[str], src: str, tgt: str, shots: list[tuple[str, str]],
                  batch: int = 8) -> list[str]:
        """Greedy translations of `texts`, `batch` prompts per `generate` call (left-padded)."""
        import torch

        s, t = languages.get(src).name, languages.get(tgt).name
        head = "".join(f"{s}: {a}\n{t}: {b}\n\n" for a, b in shots)
        self.tok.padding_side = "left"  # generation continues every row from its last token
        out = []
        for i in range(0, len(texts), batch):
            prompts = [f"{head}{s}: {x}\n{t}:" for x in texts[i:i + batch]]
            ids = self.tok(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = self.model.generate(**ids, max_new_tokens=64, do_sample=False,
                                          eos_token_id=self.stop, pad_token_id=self.tok.pad_token_id)
            for row in gen[:, ids["input_ids"].shape[1]:]:
                out.append(self.tok.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
        return out


def result(r: dict, asr_r: str | None, s2tt_r: str | None) -> dict:
    """One record in the ESRT result schema (`asr_r` None: no transcript hypothesis scored)."""
    out = {"id": r["id"], "audio": r["audio"], "prompt": languages.srt_marker(r["src"], r["tgt"]),
           "src": r["src"], "tgt": r["tgt"], "asr": r["asr"], "s2tt": r["s2tt"]}
    if asr_r is not None:
        out["asr_r"] = asr_r
    if s2tt_r is not None:
        out["s2tt_r"] = s2tt_r
    out["response"] = s2tt_r or asr_r or ""
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python bench/baselines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--whisper", required=True, help="local HF Whisper folder (encoder + decoder)")
    p.add_argument("--llm", required=True, help="local HF causal-LM folder (the speech LLM's LLM)")
    p.add_argument("--data", action="append", required=True, help="ESRT-schema dev JSONL (repeatable)")
    p.add_argument("--shots-from", action="append", default=[],
                   help="training JSONL for the few-shot examples, one per --data (default: the --data file)")
    p.add_argument("--tgt", default="", help="target languages, comma-separated (default: all)")
    p.add_argument("--clips", type=int, default=0, help="first N clips of each --data file (0: all)")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.time()
    tgts = set(a.tgt.split(",")) if a.tgt else None
    systems = a.systems.split(",")
    out = Path(a.out)
    rows: dict[str, list[dict]] = defaultdict(list)
    whisper = Whisper(a.whisper)
    llm = LLMTranslator(a.llm) if {"cascade", "oracle"} & set(systems) else None
    for i, data in enumerate(a.data):
        data = Path(data).expanduser()
        shots_file = Path(a.shots_from[i]).expanduser() if i < len(a.shots_from) else data
        recs = read_set(data, a.clips, tgts)
        by_src = defaultdict(list)
        for r in recs:
            by_src[r["src"]].append(r)
        for src, rs in by_src.items():
            audios = sorted({r["audio"] for r in rs})
            t = time.time()
            asr = dict(zip(audios, whisper.run(audios, src, "transcribe")))
            st = dict(zip(audios, whisper.run(audios, src, "translate"))) if "whisper" in systems else {}
            print(f"{data.name} {src}: Whisper on {len(audios)} clips in {time.time() - t:.0f} s", flush=True)
            t = time.time()
            for r in rs:
                if "whisper" in systems and r["tgt"] == "eng":
                    rows["whisper"].append(result(r, asr[r["audio"]], st[r["audio"]]))
            if llm is None:
                continue
            by_tgt = defaultdict(list)
            for r in rs:
                by_tgt[r["tgt"]].append(r)
            for tgt, ts in by_tgt.items():
                sh = few_shot(shots_file, src, tgt, a.shots)
                if "cascade" in systems:
                    hyps = llm.translate([asr[r["audio"]] for r in ts], src, tgt, sh)
                    rows["cascade"] += [result(r, asr[r["audio"]], h) for r, h in zip(ts, hyps)]
                if "oracle" in systems:
                    hyps = llm.translate([r["asr"] for r in ts], src, tgt, sh)
                    rows["oracle"] += [result(r, None, h) for r, h in zip(ts, hyps)]
            print(f"{data.name} {src}: LLM on {len(rs)} records in {time.time() - t:.0f} s", flush=True)
    summary = {}
    for name in systems:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        f = d / "results.jsonl"
        f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name]), encoding="utf-8")
        print(f"\n== {name} ({len(rows[name])} records)")
        run_score(build_parser().parse_args(["--score", str(f), "--out", str(d / "scores")]))
        summary[name] = json.loads((d / "scores" / "summary.json").read_text())
    print(f"\nbaselines done in {time.time() - t0:.0f} s; results and scores in {out}")
    return summary


if __name__ == "__main__":
    main()
