"""Edge -> cloud bandwidth and the quality cost of compressing the features.

For the utterances of the demo test set (offline espeak-ng corpus, `esrt_jax.data.demo`):

1. Bytes per utterance actually sent by the edge client — the HTTP body, which is exactly the
   payload (`esrt_jax.infer.payload`) — for each split point (after the Q-Former / after the
   projector) and codec (fp16, int8, int4, each with and without zstd), against the same
   utterances as 16-bit PCM at their real duration, as FLAC (16-bit, libsndfile default level),
   and as 30 s of 16-bit PCM (what a Whisper front end would consume if the audio were sent).
   The shape arithmetic for the published model sizes is printed too (computed, not measured).
2. Quality: greedy SRT outputs of every codec against fp16 features (token agreement, exact-match
   rate), and BLEU (translation) / WER (transcription) of each codec and its delta to fp16.

    python bench/bench_bandwidth.py --quick                       # smoke: 8 records, untrained ok
    python bench/bench_bandwidth.py --config configs/demo.yaml --checkpoint runs/demo
    python bench/bench_bandwidth.py ... --json bandwidth.json     # also write the numbers

Without a checkpoint the model is the untrained demo model (its outputs are noise, so the quality
columns then only measure how often quantisation changes the noise); the report says which.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CODECS = [("fp16", False), ("fp16", True), ("int8", False), ("int8", True), ("int4", False), ("int4", True)]
# Published shapes (per utterance, after the Q-Former / after the projector): (Q', dims).
PUBLISHED = {
    "ESRT-4B (Gemma-3-4B, Q=80)": ((80, 768), (80, 2560)),
    "ESRT-12B (Gemma-3-12B, Q=150 pooled k=5)": ((150, 768), (30, 3840)),
    "LLM-SRT-7B (Qwen2.5-7B, Q=80)": ((80, 768), (80, 3584)),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--checkpoint", default=None, help="run dir / stage dir (default: runs/demo if it exists)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--jsonl", default=None, help="records to use (default: the demo corpus' test.jsonl)")
    ap.add_argument("--max-records", type=int, default=0, help="0: all (of the config's languages)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="8 records, 12 new tokens (smoke test)")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    return ap.parse_args(argv)


def load_records(args, cfg):
    from esrt_jax.data.demo import build_demo_corpus, default_demo_dir
    from esrt_jax.infer.batch import utterances

    path = args.jsonl
    if path is None:
        d = cfg.data.get("demo_dir") or default_demo_dir()
        path = str(build_demo_corpus(d, progress=False) / "test.jsonl")
    utts = utterances(jsonl=path)
    langs = set(cfg.data.get("languages") or [])
    if langs:
        utts = [u for u in utts if u.src in langs and u.tgt in langs]
    n = 8 if args.quick and not args.max_records else args.max_records
    if n:
        # Spread over directions and speakers rather than the first n lines.
        step = max(1, len(utts) // n)
        utts = utts[::step][:n]
    return path, utts


def audio_sizes(paths):
    """Per unique audio file: (seconds, PCM-16 bytes at real duration, FLAC bytes, 30 s PCM-16 bytes)."""
    import soundfile as sf

    from esrt_jax import audio as audio_lib

    out = {}
    for p in paths:
        wav = audio_lib.load_audio(p)
        buf = io.BytesIO()
        sf.write(buf, wav, audio_lib.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        out[p] = (wav.size / audio_lib.SAMPLE_RATE, 2 * wav.size, len(buf.getvalue()), 2 * audio_lib.N_SAMPLES)
    return out


def decode_ids(tr, feats, utts, bs):
    ids = []
    for i in range(0, len(utts), bs):
        chunk = utts[i:i + bs]
        ids += tr.generate_ids(feats[i:i + bs], [u.src for u in chunk], [u.tgt for u in chunk])
    return ids


def texts(tr, ids, utts):
    from esrt_jax.data.tasks import split_srt_output

    pad = tr.task_tok.pad_id
    out = []
    for row, u in zip(ids, utts):
        text = tr.tokenizer.decode([x for x in row if x != pad], skip_special_tokens=False)
        out.append(split_srt_output(text, u.src, u.tgt))
    return out


def quality(outs, utts):
    """(BLEU of translations, WER/CER of transcriptions) over all records (grouped by metric)."""
    from esrt_jax import languages
    from esrt_jax.metrics import asr_error, bleu

    bleus, errs = [], []
    for tok in sorted({languages.get(u.tgt).bleu_tokenize for u in utts}):
        sel = [i for i, u in enumerate(utts) if languages.get(u.tgt).bleu_tokenize == tok]
        bleus.append(bleu([outs[i][1] for i in sel], [utts[i].translation for i in sel], tok)[0])
    for m in sorted({languages.get(u.src).asr_metric for u in utts}):
        sel = [i for i, u in enumerate(utts) if languages.get(u.src).asr_metric == m]
        errs.append(asr_error([utts[i].transcription for i in sel], [outs[i][0] for i in sel], m))
    return float(np.mean(bleus)), float(np.mean(errs))


def agreement(a, b):
    """Position-wise token agreement (matches / longer length, summed over rows) and exact-match rate."""
    match = total = exact = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y), 1)
        match += sum(p == q for p, q in zip(x, y))
        total += n
        exact += x == y
    return match / total, exact / len(a)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from esrt_jax.edge import EdgeEncoder
    from esrt_jax.infer import payload as pl
    from esrt_jax.infer.batch import encode_utterances
    from esrt_jax.speech.load import load_model, translator_for

    ckpt = args.checkpoint
    if ckpt is None and Path("runs/demo").is_dir():
        ckpt = "runs/demo"
    t0 = time.perf_counter()
    loaded = load_model(args.config, ckpt, args.set)
    model_note = (f"checkpoint {loaded.checkpoint_dir} (stage {loaded.stage}, step {loaded.step})"
                  if ckpt else "UNTRAINED model (no checkpoint): quality numbers compare noise")
    path, utts = load_records(args, loaded.run_config)
    gen = {"max_new_tokens": args.max_new_tokens or (12 if args.quick else None)}
    gen = {k: v for k, v in gen.items() if v}
    print(f"model: {args.config}, {model_note}; fingerprint {loaded.fingerprint}")
    print(f"records: {len(utts)} from {path} ({len({u.audio for u in utts})} utterances)")

    sizes = audio_sizes(sorted({u.audio for u in utts}))
    secs = np.array([sizes[u.audio][0] for u in utts])
    ref = {"pcm16_real": np.array([sizes[u.audio][1] for u in utts], float),
           "flac": np.array([sizes[u.audio][2] for u in utts], float),
           "pcm16_30s": np.array([sizes[u.audio][3] for u in utts], float)}
    res = {"model": model_note, "records": len(utts), "seconds_mean": float(secs.mean()),
           "reference_bytes": {k: float(v.mean()) for k, v in ref.items()}, "splits": {}}
    bs = args.batch_size
    for split in ("qformer", "projector"):
        tr = translator_for(loaded, split=split, max_batch=bs, gen_overrides=gen)
        feats = encode_utterances(tr, utts, bs)
        base_ids = None
        rows = {}
        for scheme, z in [("fp32", False)] + CODECS:
            if scheme == "fp32":  # in-process features, nothing sent: the unquantised reference
                x, nbytes = feats, np.full(len(utts), np.nan)
            else:
                enc = EdgeEncoder(tr, loaded.fingerprint, scheme=scheme, compress=z)
                blobs = [enc.payload(f) for f in feats]  # the exact HTTP bodies
                nbytes = np.array([len(b) for b in blobs], float)
                x = np.stack([pl.decode(b, fingerprint=loaded.fingerprint, split=split,
                                        shape=tr.feature_shape).features for b in blobs])
            name = scheme + ("+zstd" if z else "")
            row = {"bytes_mean": float(np.nanmean(nbytes)) if scheme != "fp32" else None}
            if scheme != "fp32":
                for k, v in ref.items():
                    row[f"x_fewer_than_{k}"] = float(v.sum() / nbytes.sum())
            if not z:  # zstd is lossless: same features, same outputs as without it
                ids = decode_ids(tr, x, utts, bs)
                if scheme == "fp16":
                    base_ids = ids
                row["_ids"] = ids
                row["bleu"], row["wer"] = quality(texts(tr, ids, utts), utts)
            rows[name] = row
        for name, row in rows.items():
            src = rows[name.replace("+zstd", "")]
            row.setdefault("bleu", src["bleu"])
            row.setdefault("wer", src["wer"])
            row["token_agreement_vs_fp16"], row["exact_match_vs_fp16"] = agreement(src["_ids"], base_ids)
            row["bleu_delta_vs_fp16"] = row["bleu"] - rows["fp16"]["bleu"]
            row["wer_delta_vs_fp16"] = row["wer"] - rows["fp16"]["wer"]
        for row in rows.values():
            row.pop("_ids", None)
        res["splits"][split] = {"feature_shape": list(tr.feature_shape), "codecs": rows}

    # ------------------------------------------------------------------ report
    r = res["reference_bytes"]
    print(f"\nmean utterance {res['seconds_mean']:.2f} s; reference bytes per utterance: "
          f"PCM-16 real duration {r['pcm16_real']:.0f}, FLAC {r['flac']:.0f}, PCM-16 30 s {r['pcm16_30s']:.0f}")
    hdr = (f"{'split':9} {'codec':10} {'bytes/utt':>9} {'vs PCM':>7} {'vs FLAC':>7} {'vs 30s':>7} "
           f"{'tok.agr':>7} {'exact':>6} {'BLEU':>6} {'dBLEU':>6} {'WER':>6} {'dWER':>6}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for split, s in res["splits"].items():
        for name, row in s["codecs"].items():
            b = "-" if row["bytes_mean"] is None else f"{row['bytes_mean']:.0f}"
            ratios = ["-" if row["bytes_mean"] is None else f"{row[f'x_fewer_than_{k}']:.1f}x"
                      for k in ("pcm16_real", "flac", "pcm16_30s")]
            print(f"{split:9} {name:10} {b:>9} {ratios[0]:>7} {ratios[1]:>7} {ratios[2]:>7} "
                  f"{row['token_agreement_vs_fp16']:7.3f} {row['exact_match_vs_fp16']:6.2f} "
                  f"{row['bleu']:6.2f} {row['bleu_delta_vs_fp16']:+6.2f} {row['wer']:6.1f} "
                  f"{row['wer_delta_vs_fp16']:+6.1f}")
    print("\nfeature shapes: " + ", ".join(f"{k} {tuple(v['feature_shape'])}" for k, v in res["splits"].items()))
    print("\npublished model sizes (shape arithmetic, payload body without header/zstd; 30 s PCM-16 = 960000 B):")
    for name, (q, p) in PUBLISHED.items():
        parts = []
        for split, (n, d) in (("qformer", q), ("projector", p)):
            fp16, int8, int4 = (sum(pl.expected_sizes((n, d), s)) for s in ("fp16", "int8", "int4"))
            parts.append(f"{split} {n}x{d}: fp16 {fp16} B, int8 {int8} B, int4 {int4} B")
        print(f"  {name}: " + "; ".join(parts))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
