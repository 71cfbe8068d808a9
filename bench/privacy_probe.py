"""How much speaker identity does the edge payload leak? A speaker-classification probe.

ESRT claims the transmitted features carry no voiceprint. We measure it: on espeak-ng voice
variants of the offline demo corpus (`esrt_jax.data.demo`; the same variants speak every
language) we train simple speaker classifiers — multinomial logistic regression and nearest
centroid, written in numpy — on

  (a) log-mel statistics of the audio (per-bin mean and std over the speech frames): what
      sending audio (or a spectrogram) would expose; a classic voiceprint baseline;
  (b) the transmitted payloads (decoded exactly as the server sees them), for each split point,
      as per-dimension mean+std over the queries and as the flat vector;
  (c) for reference, the Whisper encoder output (never transmitted; mean+std over speech frames),

and report held-out accuracy against chance, twice: on sentences not seen in training (content
cannot identify the speaker) and on a language not seen in training (the last of --langs: the
voice must be recognised across languages). Whatever the numbers are, they are the result.

    python bench/privacy_probe.py --quick                      # smoke: 2 languages, 3 voices, 8 sentences
    python bench/privacy_probe.py --config configs/demo.yaml --checkpoint runs/demo   # 6 voices, 40 sentences
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--checkpoint", default=None, help="run dir / stage dir (default: runs/demo if it exists)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--langs", default=None, help="comma list (default: the config's data.languages)")
    ap.add_argument("--voices", type=int, default=6, help="espeak voice variants (speakers), 2..10")
    ap.add_argument("--sentences", type=int, default=40, help="sentences of the demo table to speak")
    ap.add_argument("--corpus-dir", default=None, help="where to build the probe corpus (cached)")
    ap.add_argument("--scheme", default="fp16", help="payload codec of the transmitted features")
    ap.add_argument("--quick", action="store_true", help="2 languages, 3 voices, 8 sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- classifiers


def standardise(train, test):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def logistic_regression(x, y, k, *, l2=1e-2, steps=500, lr=0.05, seed=0):
    """Multinomial logistic regression, full-batch Adam on mean cross-entropy + l2 |W|^2."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    W = rng.normal(0, 0.01, (d, k))
    b = np.zeros(k)
    Y = np.eye(k)[y]
    m = [np.zeros_like(W), np.zeros_like(b)]
    v = [np.zeros_like(W), np.zeros_like(b)]
    for t in range(1, steps + 1):
        z = x @ W + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - Y) / n
        grads = [x.T @ g + 2 * l2 * W, g.sum(0)]
        for i, (param, gr) in enumerate(zip((W, b), grads)):
            m[i] = 0.9 * m[i] + 0.1 * gr
            v[i] = 0.999 * v[i] + 0.001 * gr ** 2
            param -= lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return lambda q: np.argmax(q @ W + b, 1)


def nearest_centroid(x, y, k):
    c = np.stack([x[y == j].mean(0) if np.any(y == j) else np.full(x.shape[1], np.inf) for j in range(k)])
    return lambda q: np.argmin(((q[:, None, :] - c[None]) ** 2).sum(-1), 1)


def probe(feats, y, train, test, k, seed):
    xtr, xte = standardise(feats[train], feats[test])
    out = {}
    for name, fit in (("logreg", lambda: logistic_regression(xtr, y[train], k, seed=seed)),
                      ("centroid", lambda: nearest_centroid(xtr, y[train], k))):
        out[name] = float(np.mean(fit()(xte) == y[test]))
    return out


# ----------------------------------------------------------------------------- features


def mel_stats(mel, n_real):
    m = mel[:, :max(n_real, 2)]
    return np.concatenate([m.mean(1), m.std(1)])


def pooled(x):
    """(Q, D) -> mean and std over the first axis (2D,)."""
    return np.concatenate([x.mean(0), x.std(0)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from esrt_jax import audio as audio_lib
    from esrt_jax.data.demo import VOICE_VARIANTS, build_demo_corpus, default_demo_dir
    from esrt_jax.audio import mel_for_model
    from esrt_jax.edge import EdgeEncoder
    from esrt_jax.infer import payload as pl
    from esrt_jax.speech.load import load_model, translator_for

    if args.quick:
        args.voices, args.sentences = 3, 8
    if not 2 <= args.voices <= len(VOICE_VARIANTS):
        raise SystemExit(f"--voices must be in [2, {len(VOICE_VARIANTS)}]")
    t0 = time.perf_counter()
    ckpt = args.checkpoint or ("runs/demo" if Path("runs/demo").is_dir() else None)
    loaded = load_model(args.config, ckpt, args.set)
    note = (f"checkpoint {loaded.checkpoint_dir} (stage {loaded.stage}, step {loaded.step})" if ckpt
            else "UNTRAINED model (no checkpoint)")
    langs = args.langs.split(",") if args.langs else list(loaded.run_config.data.get("languages") or ["eng", "deu"])
    if args.quick:
        langs = langs[:2]
    tag = f"{'-'.join(langs)}_v{args.voices}_s{args.sentences}"
    cdir = Path(args.corpus_dir) if args.corpus_dir else default_demo_dir().parent / f"privacy_probe_{tag}"
    corpus = build_demo_corpus(cdir, langs=langs, voices_per_lang=args.voices, max_sentences=args.sentences,
                               progress=False)
    # One item per utterance (the JSONL has one line per target language).
    utts = {}
    for split in ("train", "dev", "test"):
        for line in (corpus / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            utts.setdefault(r["audio"], r)
    items = sorted(utts.values(), key=lambda r: r["audio"])
    speakers = sorted({r["speaker"] for r in items})
    y = np.array([speakers.index(r["speaker"]) for r in items])
    sent = np.array([r["sentence"] for r in items])
    test = sent % 4 == 3  # held-out sentences
    train = ~test
    lang = np.array([r["src"] for r in items])
    xl_test = lang == langs[-1]  # held-out language: the voice must be recognised in a new language
    print(f"model: {args.config}, {note}")
    print(f"probe corpus: {corpus} — {len(items)} utterances, {len(speakers)} speakers {speakers}, "
          f"languages {langs}")

    enc = loaded.model.config.encoder
    mels, n_real = [], []
    for r in items:
        wav = audio_lib.load_audio(corpus / r["audio"])
        mels.append(mel_for_model(wav, enc.num_mel_bins, enc.num_frames))
        n_real.append(min(wav.size // audio_lib.HOP_LENGTH, enc.num_frames))
    mels = np.stack(mels)
    n_real = np.array(n_real)

    feats = {"(a) log-mel mean+std": np.stack([mel_stats(m, n) for m, n in zip(mels, n_real)])}
    gd, st = nnx.split(loaded.model.encoder)
    enc_fn = jax.jit(lambda s, m: nnx.merge(gd, s)(m))
    hs = np.concatenate([np.asarray(enc_fn(st, mels[i:i + 8])) for i in range(0, len(mels), 8)])
    feats["(c) encoder output mean+std [not sent]"] = np.stack(
        [pooled(h[:max(n // 2, 1)]) for h, n in zip(hs, n_real)])
    sizes = {}
    for split in ("qformer", "projector"):
        tr = translator_for(loaded, split=split)
        edge = EdgeEncoder(tr, loaded.fingerprint, scheme=args.scheme)
        blobs = [edge.payload(f) for i in range(0, len(mels), 8) for f in tr.encode(mels[i:i + 8])]
        sent_x = np.stack([pl.decode(b).features for b in blobs])  # what the server receives
        sizes[split] = float(np.mean([len(b) for b in blobs]))
        feats[f"(b) payload {split} {args.scheme} mean+std"] = np.stack([pooled(x) for x in sent_x])
        feats[f"(b) payload {split} {args.scheme} flat"] = sent_x.reshape(len(sent_x), -1)

    k = len(speakers)
    chance = 1.0 / k
    majority = float(np.max(np.bincount(y[test], minlength=k)) / test.sum())
    res = {"model": note, "speakers": speakers, "languages": langs, "n_train": int(train.sum()),
           "n_test": int(test.sum()), "chance": chance, "majority": majority, "payload_bytes": sizes,
           "probes": {}}
    print(f"\nchance {chance:.3f} (1/{k}); majority class of the held-out set {majority:.3f}\n")
    print(f"held-out sentences: train {train.sum()} / test {test.sum()}; held-out language "
          f"{langs[-1]}: train {(~xl_test).sum()} / test {xl_test.sum()}\n")
    hdr = (f"{'features':48} {'dims':>6} | held-out sentences: {'logreg':>6} {'centroid':>8} "
           f"| held-out language: {'logreg':>6} {'centroid':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, x in feats.items():
        acc = probe(x.astype(np.float64), y, train, test, k, args.seed)
        xl = probe(x.astype(np.float64), y, ~xl_test, xl_test, k, args.seed) if len(langs) > 1 else \
            {"logreg": float("nan"), "centroid": float("nan")}
        res["probes"][name] = {"dims": int(x.shape[1]), **acc, "held_out_language": xl}
        print(f"{name:48} {x.shape[1]:6d} | {'':20}{acc['logreg']:6.3f} {acc['centroid']:8.3f} "
              f"| {'':19}{xl['logreg']:6.3f} {xl['centroid']:8.3f}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
