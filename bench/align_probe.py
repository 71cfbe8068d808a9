"""LLM-free alignment probes on real speech: adapter + CTC head on frozen Whisper features.

    python bench/align_probe.py features --data DIR [DIR ...] --whisper WHISPER_DIR --out FEATS
    python bench/align_probe.py train --feats FEATS --units char|token|tied [--llm LLM_DIR] ...

`features` runs the frozen encoder once per clip, on the clip's real length (mel cut to the
clip, rounded up to `--bucket` mel frames; `--window padded`: Whisper's 30 s window, then the
clip's frames kept), and stores the real frames per split: FEATS/<split>.npy (sum of frames,
d_model) float16 + <split>.json (per clip: key, text, language, offset, frames).

`train` fits a Q-Former (real_small's sizes) + CTC head on the train clips and reports, per epoch,
the dev loss and the dev CER of the greedy CTC decode (detokenised for token units) on the dev
clips (held out: never trained on, nothing tuned on them within a run). Prints one JSON line per
epoch; the last line is the summary. Research tooling for issue [P]; the shipped route is
`python train.py --stage=align`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esrt_jax import audio as audio_lib
from esrt_jax.convert.whisper import load_whisper_encoder
from esrt_jax.metrics import asr_error, normalize_transcript
from esrt_jax.models import ctc
from esrt_jax.models.layers import Dense
from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter


# ----------------------------------------------------------------------------- features

def read_clips(data_dirs, split):
    """One entry per clip (the JSONL has one line per target language)."""
    seen, clips = set(), []
    for d in data_dirs:
        for line in (Path(d) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            key = f"{r['src']}/{r['clip']}"
            if key in seen:
                continue
            seen.add(key)
            clips.append({"key": key, "text": r["asr"], "lang": r["src"],
                          "audio": str((Path(d) / r["audio"]).resolve())})
    return clips


def cmd_features(a):
    enc = load_whisper_encoder(a.whisper, scan_layers=True)
    graphdef, state = nnx.split(enc)

    @jax.jit
    def encode(state, mel):
        return nnx.merge(graphdef, state)(mel)

    out = Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split in a.splits:
        clips = read_clips(a.data, split)
        t0 = time.perf_counter()
        feats, offset = [], 0
        # group by bucket so each shape compiles once
        for c in clips:
            wav = audio_lib.load_audio(c["audio"])
            c["frames"] = audio_lib.encoder_frames(len(wav))
            c["_mel"] = audio_lib.log_mel_spectrogram(wav, 80)  # (80, 3000), padded window
        order = sorted(range(len(clips)), key=lambda i: clips[i]["frames"])
        rows = {}
        for j in range(0, len(order), a.batch):
            idx = order[j:j + a.batch]
            if a.window == "padded":
                T = 3000
            else:
                T = min(3000, -(-2 * max(clips[i]["frames"] for i in idx) // a.bucket) * a.bucket)
            mel = np.stack([clips[i]["_mel"][:, :T] for i in idx]).astype(np.float32)
            if len(idx) < a.batch:
                mel = np.concatenate([mel, np.zeros((a.batch - len(idx),) + mel.shape[1:], np.float32)])
            h = np.asarray(encode(state, mel))
            for r, i in enumerate(idx):
                rows[i] = h[r, :clips[i]["frames"]].astype(np.float16)
            print(f"\r{split}: {min(j + a.batch, len(order))}/{len(order)} clips "
                  f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        for i, c in enumerate(clips):
            c.pop("_mel")
            c["offset"] = offset
            offset += c["frames"]
            feats.append(rows[i])
        np.save(out / f"{split}.npy", np.concatenate(feats))
        (out / f"{split}.json").write_text(json.dumps(clips))
        print(json.dumps({"split": split, "clips": len(clips), "frames": offset, "window": a.window,
                          "seconds": round(time.perf_counter() - t0, 1)}))


# ----------------------------------------------------------------------------- units

class CharUnits:
    """Characters of the normalised transcripts (Whisper's BasicTextNormalizer), blank = 0."""

    def __init__(self, texts):
        chars = sorted({ch for t in texts for ch in normalize_transcript(t)})
        self.table = {ch: i + 1 for i, ch in enumerate(chars)}
        self.chars = chars

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        return [self.table[ch] for ch in normalize_transcript(text) if ch in self.table]

    def decode(self, ids):
        return "".join(self.chars[i - 1] for i in ids)


class TokenUnits:
    """The LLM tokenizer's tokens of the training transcripts (restricted vocabulary), blank = 0;
    unseen tokens map to one <unk> unit."""

    def __init__(self, tokenizer, texts):
        self.tok = tokenizer
        ids = sorted({i for t in texts for i in self._ids(t)})
        self.llm_ids = ids + [tokenizer.unk_token_id]
        self.table = {t: k + 1 for k, t in enumerate(self.llm_ids)}

    def _ids(self, text):
        return self.tok(" " + text.strip(), add_special_tokens=False)["input_ids"]

    def __len__(self):
        return len(self.llm_ids)

    def encode(self, text):
        unk = len(self.llm_ids)
        return [self.table.get(i, unk) for i in self._ids(text)]

    def decode(self, ids):
        return self.tok.decode([self.llm_ids[i - 1] for i in ids if i - 1 < len(self.llm_ids) - 1])


# ----------------------------------------------------------------------------- training

class Probe(nnx.Module):
    """CTC head on the adapter (`head_input`: the projector + LayerNorm, the projector without its
    LayerNorm, or the Q-Former outputs), or (`stack` k > 0) the frame-synchronous baseline: k
    encoder frames stacked -> Dense + GELU -> CTC head, no Q-Former. The adapter is the shipped
    `SpeechAdapter` (Q-Former, or window means with `--window-means`).
    (enc (B, T, d), frames (B,)) -> (logits (B, N, K), valid CTC frames (B,))."""

    def __init__(self, acfg: QFormerConfig, hcfg: ctc.CTCHeadConfig, *, head_input="proj", stack=0, rngs):
        self.head_input, self.stack, self.upsample = head_input, stack, hcfg.upsample
        if stack:
            self.adapter = None
            self.frames_in = Dense(stack * acfg.encoder_hidden_size, hcfg.in_dim, rngs=rngs)
        else:
            self.adapter = SpeechAdapter(acfg, rngs=rngs)
        self.head = ctc.CTCHead(hcfg, rngs=rngs)

    def __call__(self, enc, frames, unit_embeds=None, rngs=None):
        if self.stack:
            B, T, D = enc.shape
            k = self.stack
            enc = jnp.pad(enc, ((0, 0), (0, -T % k), (0, 0)))
            x = jax.nn.gelu(self.frames_in(enc.reshape(B, -1, k * D)))
            return self.head(x, unit_embeds), -(-frames // k) * self.upsample
        a = self.adapter
        q = a.qformer_features(enc, enc_frames=frames, deterministic=rngs is None, rngs=rngs)
        x = {"proj": lambda: a.head(q), "proj_nonorm": lambda: a.linear(q), "qformer": lambda: q}[self.head_input]()
        logits = self.head(x, unit_embeds)  # unpooled: one vector per query -> upsample CTC frames
        return logits, jnp.full(frames.shape, logits.shape[1])


def load_split(feats_dir, split):
    meta = json.loads((Path(feats_dir) / f"{split}.json").read_text())
    arr = np.load(Path(feats_dir) / f"{split}.npy", mmap_mode="r")
    return meta, arr


def batches(meta, arr, labels, idx, batch, frame_bucket=50, label_bucket=16):
    for j in range(0, len(idx), batch):
        rows = idx[j:j + batch]
        F = max(meta[i]["frames"] for i in rows)
        T = -(-F // frame_bucket) * frame_bucket
        L = max(1, -(-max(len(labels[i]) for i in rows) // label_bucket) * label_bucket)
        enc = np.zeros((batch, T, arr.shape[1]), np.float32)
        fr = np.ones((batch,), np.int32)
        lab = np.zeros((batch, L), np.int32)
        lpad = np.ones((batch, L), np.float32)
        for r, i in enumerate(rows):
            m = meta[i]
            enc[r, :m["frames"]] = arr[m["offset"]:m["offset"] + m["frames"]]
            fr[r] = m["frames"]
            lab[r, :len(labels[i])] = labels[i][:L]
            lpad[r, :len(labels[i])] = 0.0
        yield rows, enc, fr, lab, lpad


def cmd_train(a):
    tr_meta, tr_arr = load_split(a.feats, "train")
    dv_meta, dv_arr = load_split(a.feats, "dev")
    if a.langs:
        keep = lambda m: [i for i, c in enumerate(m) if c["lang"] in a.langs]  # noqa: E731
    else:
        keep = lambda m: list(range(len(m)))  # noqa: E731
    tr_idx, dv_idx = keep(tr_meta), keep(dv_meta)
    if a.max_train:
        tr_idx = tr_idx[:a.max_train]
    texts = [tr_meta[i]["text"] for i in tr_idx]
    unit_embeds = None
    llm_dim = a.llm_dim
    if a.units == "char":
        units = CharUnits(texts)
    else:
        from transformers import AutoTokenizer
        units = TokenUnits(AutoTokenizer.from_pretrained(a.llm), texts)
        if a.units == "tied":
            from safetensors import safe_open
            files = sorted(Path(a.llm).glob("*.safetensors"))
            with safe_open(str(files[0]), "np") as f:
                name = next(n for n in f.keys() if n.endswith("embed_tokens.weight"))
                E = f.get_slice(name)
                unit_embeds = jnp.asarray(np.stack([E[i] for i in units.llm_ids]).astype(np.float32))
            llm_dim = unit_embeds.shape[1]
    tr_lab = {i: units.encode(tr_meta[i]["text"]) for i in tr_idx}
    dv_lab = {i: units.encode(dv_meta[i]["text"]) for i in dv_idx}
    acfg = QFormerConfig(num_hidden_layers=2, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                         num_queries=a.queries, hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=0.0,
                         initializer_range=a.init, cross_attention_frequency=a.cross_every,
                         attend_padding=False, window_queries=a.windows,
                         window_overlap=a.overlap, window_means=a.window_means, encoder_hidden_size=tr_arr.shape[1], llm_dim=llm_dim)
    in_dim = acfg.hidden_size if a.head_input == "qformer" and not a.stack else llm_dim
    hcfg = ctc.CTCHeadConfig(in_dim=in_dim, units=len(units), kind="tied" if a.units == "tied" else "linear",
                             upsample=a.upsample)
    model = Probe(acfg, hcfg, head_input=a.head_input, stack=a.stack, rngs=nnx.Rngs(a.seed))
    steps_per_epoch = -(-len(tr_idx) // a.batch)
    total = steps_per_epoch * a.epochs
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, min(200, total // 10) if a.warmup is None else a.warmup, total, a.lr * 0.05)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01)),
                        wrt=nnx.Param)
    def loss_of(m, enc, fr, lab, lpad, rngs):
        logits, n = m(enc, fr, unit_embeds, rngs)
        return ctc.ctc_loss(logits, ctc.frame_paddings(n, logits.shape[1]), lab, lpad)

    @nnx.jit
    def step(m, opt, enc, fr, lab, lpad, key):
        (loss, n), g = nnx.value_and_grad(loss_of, has_aux=True)(m, enc, fr, lab, lpad, nnx.Rngs(dropout=key))
        opt.update(m, g)
        return loss, n

    @nnx.jit
    def evaluate(m, enc, fr, lab, lpad):
        logits, n_ctc = m(enc, fr, unit_embeds, None)
        loss, n = ctc.ctc_loss(logits, ctc.frame_paddings(n_ctc, logits.shape[1]), lab, lpad)
        return loss, n, logits, n_ctc

    rng = np.random.default_rng(a.seed)
    key = jax.random.key(a.seed)
    t_train = 0.0
    hist = []
    for ep in range(1, a.epochs + 1):
        order = [tr_idx[i] for i in rng.permutation(len(tr_idx))]
        t0 = time.perf_counter()
        losses = []
        for _, enc, fr, lab, lpad in batches(tr_meta, tr_arr, tr_lab, order, a.batch):
            key, k = jax.random.split(key)
            loss, n = step(model, opt, enc, fr, lab, lpad, k)
            losses.append(float(loss))
        t_train += time.perf_counter() - t0
        def decode_split(meta, arr, labs, idx):
            hyps, refs, dl = [], [], []
            for rows, enc, fr, lab, lpad in batches(meta, arr, labs, idx, a.batch):
                loss, n, logits, n_ctc = evaluate(model, enc, fr, lab, lpad)
                dl.append(float(loss))
                dec = ctc.greedy_decode(np.asarray(logits), np.asarray(n_ctc))
                hyps += [units.decode(d) for d in dec[:len(rows)]]
                refs += [meta[i]["text"] for i in rows]
            return hyps, refs, dl

        extra = {}
        if a.eval_train:
            th, tref, _ = decode_split(tr_meta, tr_arr, tr_lab, tr_idx[:a.eval_train])
            extra = {"train_cer": round(asr_error(tref, th, "cer"), 2)}
        if a.eval_every and ep % a.eval_every and ep != a.epochs:
            print(json.dumps({"epoch": ep, "train_loss": round(float(np.mean(losses)), 4), **extra}), flush=True)
            continue
        hyps, refs, dl = decode_split(dv_meta, dv_arr, dv_lab, dv_idx)
        rec = {"epoch": ep, "train_loss": round(float(np.mean(losses)), 4), "dev_loss": round(float(np.mean(dl)), 4),
               "dev_cer": round(asr_error(refs, hyps, "cer"), 2), "dev_wer": round(asr_error(refs, hyps, "wer"), 2),
               "distinct": round(len(set(hyps)) / len(hyps), 3), "train_s": round(t_train, 1), **extra}
        hist.append(rec)
        print(json.dumps(rec), flush=True)
    print(json.dumps({"summary": vars(a) | {"units_n": len(units)}, "final": hist[-1],
                      "samples": [[r, h] for r, h in list(zip(refs, hyps))[:4]]}, ensure_ascii=False))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--data", nargs="+", required=True)
    f.add_argument("--whisper", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--splits", nargs="+", default=["train", "dev"])
    f.add_argument("--window", choices=["real", "padded"], default="real")
    f.add_argument("--bucket", type=int, default=100, help="mel frames the real window is rounded up to")
    f.add_argument("--batch", type=int, default=8)
    t = sub.add_parser("train")
    t.add_argument("--feats", required=True)
    t.add_argument("--units", choices=["char", "token", "tied"], default="char")
    t.add_argument("--llm", help="LLM dir (tokenizer; embeddings for --units tied)")
    t.add_argument("--llm-dim", type=int, default=640)
    t.add_argument("--langs", nargs="*", default=None)
    t.add_argument("--queries", type=int, default=64)
    t.add_argument("--upsample", type=int, default=2)
    t.add_argument("--windows", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--overlap", type=int, default=2)
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", type=float, default=0.1, help="Q-Former initializer_range")
    t.add_argument("--cross-every", type=int, default=2, help="Q-Former cross_attention_frequency")
    t.add_argument("--max-train", type=int, default=0, help="first N train clips only (0: all)")
    t.add_argument("--head-input", choices=["proj", "proj_nonorm", "qformer"], default="proj",
                   help="what the CTC head reads: projector + LayerNorm, projector only, Q-Former outputs")
    t.add_argument("--stack", type=int, default=0,
                   help="k > 0: frame-synchronous baseline (k frames stacked + MLP, no Q-Former)")
    t.add_argument("--window-means", type=int, default=0,
                   help="s > 0: the window-means adapter (adapter.window_means = s) instead of the Q-Former")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default min(200, steps / 10))")
    t.add_argument("--eval-train", type=int, default=0, help="also report the CER on the first N train clips")
    t.add_argument("--eval-every", type=int, default=1, help="dev decode every N epochs (and the last)")
    a = p.parse_args(argv)
    (cmd_features if a.cmd == "features" else cmd_train)(a)


if __name__ == "__main__":
    main()
