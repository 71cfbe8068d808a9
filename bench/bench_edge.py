"""The edge half on this CPU at batch 1 (one 30 s window): our jitted JAX, the exported ONNX model
in onnxruntime (fp32 and int8) and PyTorch eager (HF WhisperEncoder + the torch reference adapter),
same weights, same threads, one process.

    python bench/bench_edge.py                          # whisper-base dims, then whisper-large-v3 dims
    python bench/bench_edge.py --dims base --repeats 10
    python bench/bench_edge.py --dims large-v3 --repeats 3
    python bench/bench_edge.py --config configs/demo.yaml --checkpoint runs/demo   # + quality on a run

Weights: random (torch's init, seed 0) for the HF WhisperEncoder and the LLM-SRT-style adapter
(`tests/test_qformer.torch_reference`: Blip2QFormerModel + projector), converted into ours; the
ONNX models are exported from ours (`esrt_jax.export.onnx_edge`), so all four compute one function.
Prints, per runtime: the one-off cost (JAX compile, onnxruntime session build, torch first call),
the steady-state median ms per utterance and the ratio to PyTorch eager (goal for the exported
model: >= 1.5x faster); max |features - JAX| for each; the fp16 payload of ONNX fp32 vs JAX (fp16
ulps); the int8 model's feature error; file sizes; the load average (uptime) before and after
(the machine may be shared).

With `--config/--checkpoint` (a trained run, e.g. the demo) it also exports that run's edge half
with the export CLI and compares, on the demo test set (`bench_bandwidth.load_records`): the
features of JAX / ONNX fp32 / ONNX int8, their fp16 payloads, and the greedy translations decoded
from those payloads (token agreement with JAX's, BLEU / WER): the int8 model's quality effect.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and tests.reference (the torch reference adapter)

DIMS = {  # HF WhisperConfig encoder keys
    "base": dict(num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
    "large-v3": dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                     encoder_ffn_dim=5120),
}


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def file_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20


def fp16_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in fp16 ulps of the fp16 roundings of a and b (what the fp16 payload carries)."""
    def key(x):
        i = np.asarray(x, np.float16).view(np.int16).astype(np.int32)
        return np.where(i < 0, -32768 - i, i)  # monotone in the float value
    return np.abs(key(a) - key(b))


def payload_report(y: np.ndarray, ref: np.ndarray, fingerprint: str) -> str:
    """How the fp16 payloads of features `y` and `ref` (B, ...) differ."""
    from esrt_jax.infer import payload as pl

    dec = [np.stack([pl.decode(pl.encode(r, fingerprint=fingerprint, split="projector")).features for r in x])
           for x in (y, ref)]
    ulps = fp16_ulps(y, ref)
    far = ulps > 1
    return (f"{np.mean(ulps == 0) * 100:.2f}% of values identical, max |diff| {np.abs(dec[0] - dec[1]).max():.2e}; "
            f"{int(far.sum())} values > 1 fp16 ulp apart"
            + (f", all with |x| < {np.abs(ref[far]).max() * 1.01:.0e}" if far.any() else ""))


def bench_dims(name: str, args, workdir: Path) -> None:
    import torch
    from flax import nnx
    from transformers import Qwen2Config, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as TorchWhisperEncoder

    from esrt_jax.convert.llm_srt import load_llm_srt_into
    from esrt_jax.edge import EdgeModel, OnnxEdgeModel
    from esrt_jax.export.onnx_edge import export_edge_onnx
    from esrt_jax.infer.cloud import model_fingerprint
    from esrt_jax.models.llm import config_from_hf
    from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter
    from esrt_jax.models.speech_llm import EdgeHalf, SpeechLLMConfig
    from esrt_jax.models.whisper import WhisperEncoderConfig, encoder_from_params, params_from_hf
    from tests.reference.qformer import numpy_state_dict, torch_reference

    repeats = args.repeats or (10 if name == "base" else 3)
    dims = DIMS[name]
    print(f"\n== whisper-{name} dims: {dims}; adapter: Q-Former 8 x 768, 80 queries, llm_dim {args.llm_dim}, "
          f"split projector; batch 1 x 30 s; median of {repeats}; {args.threads} threads; {load()}")
    hf_cfg = WhisperConfig(**dims, max_source_positions=1500)
    torch.manual_seed(0)
    t_enc = TorchWhisperEncoder(hf_cfg).eval()
    ad_cfg = QFormerConfig(encoder_hidden_size=dims["d_model"], llm_dim=args.llm_dim)
    t_proj = torch_reference(ad_cfg, seed=1)

    enc_cfg = WhisperEncoderConfig.from_hf_config(hf_cfg)
    sd = numpy_state_dict(t_enc)
    encoder = encoder_from_params(enc_cfg, params_from_hf(sd, enc_cfg, prefix="", names=list(sd)))
    del sd
    adapter = SpeechAdapter(ad_cfg, rngs=nnx.Rngs(0))
    load_llm_srt_into(adapter, numpy_state_dict(t_proj))
    llm = config_from_hf(Qwen2Config(vocab_size=64, hidden_size=args.llm_dim, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=2))
    half = EdgeHalf(SpeechLLMConfig(enc_cfg, ad_cfg, llm), encoder, adapter)
    fingerprint = model_fingerprint(half)
    mel = np.random.default_rng(0).standard_normal((1, dims["num_mel_bins"], 3000)).astype(np.float32)

    # Each runtime: a builder -> (run, what its one-off cost was). Interleaved (default for
    # whisper-base): all built, then the timed runs go round by round, so that a machine shared
    # with other work loads each runtime alike. Sequential (--sequential, and whisper-large-v3,
    # whose four copies of the weights would not fit beside other work): one runtime at a time.
    torch.set_grad_enabled(False)
    held = {"torch": (t_enc, t_proj), "half": half}
    del t_enc, t_proj, half, encoder, adapter
    paths = {}

    def build_torch():
        t_enc, t_proj = held.pop("torch")
        return lambda: t_proj.encoder_projector(t_enc(torch.from_numpy(mel)).last_hidden_state).numpy(), ""

    def build_jax():
        model = EdgeModel(held["half"], max_batch=1)  # what the JAX edge client runs
        return lambda: model.encode(mel), "compile "

    def build_onnx(kind):
        if not paths:
            t0 = time.perf_counter()
            paths.update(export_edge_onnx(held.pop("half"), fingerprint, workdir / name, int8=True))
            print(f"export: {time.perf_counter() - t0:.1f} s; files: fp32 {file_mb(paths['fp32']):.1f} MiB, "
                  f"int8 {file_mb(paths['int8']):.1f} MiB")
        t0 = time.perf_counter()
        m = OnnxEdgeModel(paths[kind], threads=args.threads)
        return functools.partial(m.encode, mel), f"session {time.perf_counter() - t0:.1f} s + "

    builders = {"PyTorch eager (HF + reference adapter)": build_torch, "JAX jitted (ours)": build_jax,
                "ONNX fp32 (onnxruntime)": functools.partial(build_onnx, "fp32"),
                "ONNX int8 (onnxruntime)": functools.partial(build_onnx, "int8")}
    once, outs, times = {}, {}, {label: [] for label in builders}

    def start(label):
        fn, note = builders[label]()
        t0 = time.perf_counter()
        outs[label] = fn()
        once[label] = f"{note}{time.perf_counter() - t0:.1f} s"
        return fn

    def time_once(label, fn):
        t0 = time.perf_counter()
        fn()
        times[label].append((time.perf_counter() - t0) * 1e3)

    if args.sequential or name == "large-v3":
        for label in builders:
            fn = start(label)
            for _ in range(repeats):
                time_once(label, fn)
            del fn
            gc.collect()
    else:
        fns = {label: start(label) for label in builders}
        for _ in range(repeats):
            for label, fn in fns.items():
                time_once(label, fn)
    ms = {label: statistics.median(t) for label, t in times.items()}
    torch_label, jax_label, *onnx_labels = builders
    y_j = outs[jax_label]
    print(f"{'runtime':40s} {'one-off':>22s} {'ms/utt':>9s} {'(min-max)':>15s} {'vs torch':>9s} {'max|f - JAX|':>13s}")
    for label in (jax_label, *onnx_labels, torch_label):
        print(f"{label:40s} {once[label]:>22s} {ms[label]:9.1f} {min(times[label]):7.0f}-{max(times[label]):<7.0f} "
              f"{ms[torch_label] / ms[label]:8.2f}x {np.abs(outs[label] - y_j).max():13.2e}")
    y_f32, y_i8 = outs["ONNX fp32 (onnxruntime)"], outs["ONNX int8 (onnxruntime)"]
    print(f"fp16 payload, ONNX fp32 vs JAX: {payload_report(y_f32, y_j, fingerprint)}")
    rel = np.abs(y_i8 - y_j).max() / np.abs(y_j).max()
    cos = float((y_i8 * y_j).sum() / np.sqrt((y_i8 ** 2).sum() * (y_j ** 2).sum()))
    print(f"int8 vs JAX features: max |diff| {np.abs(y_i8 - y_j).max():.3e} ({rel * 100:.2f}% of max |f|), "
          f"mean |diff| {np.abs(y_i8 - y_j).mean():.3e}, cosine {cos:.6f}")
    print(f"after whisper-{name}: {load()}")


def run_quality(args, workdir: Path) -> None:
    """JAX vs ONNX fp32 vs ONNX int8 on a trained run's test set: features, payloads, translations."""
    import types

    from bench_bandwidth import agreement, decode_ids, load_records, quality, texts
    from esrt_jax.audio import mel_from_file
    from esrt_jax.edge import OnnxEdgeModel
    from esrt_jax.cli.export import main as export_main
    from esrt_jax.infer import payload as pl
    from esrt_jax.speech.load import load_model, translator_for

    loaded = load_model(args.config, args.checkpoint)
    tr = translator_for(loaded, max_batch=8)
    out = workdir / "run"
    assert export_main(["--run", args.checkpoint, "--config", args.config, "--edge", "--out", str(out),
                        "--int8"]) == 0
    _, utts = load_records(types.SimpleNamespace(jsonl=None, quick=False, max_records=args.records),
                           loaded.run_config)
    enc = tr.config.encoder
    mels = np.stack([mel_from_file(u.audio, enc.num_mel_bins, enc.num_frames)[0] for u in utts])
    feats = {"JAX": np.concatenate([tr.encode(mels[i:i + 8]) for i in range(0, len(mels), 8)])}
    for kind, name in (("fp32", "edge.onnx"), ("int8", "edge.int8.onnx")):
        feats[f"ONNX {kind}"] = OnnxEdgeModel(out / name, threads=args.threads).encode(mels)
    print(f"\n== quality on {args.checkpoint} (model {loaded.fingerprint}, split {tr.split}, "
          f"features {tr.feature_shape}): {len(utts)} test records; {load()}")
    ids = {}
    print(f"{'edge half':10s} {'max|f - JAX|':>13s} {'tokens = JAX':>13s} {'exact':>6s} {'BLEU':>6s} {'WER':>6s}"
          f"   fp16 payload vs JAX's")
    for name, f in feats.items():
        x = np.stack([pl.decode(pl.encode(r, fingerprint=loaded.fingerprint, split=tr.split)).features for r in f])
        ids[name] = decode_ids(tr, x, utts, 8)  # what the service decodes from the fp16 payloads
        tok, exact = agreement(ids[name], ids["JAX"])
        bleu, wer = quality(texts(tr, ids[name], utts), utts)
        print(f"{name:10s} {np.abs(f - feats['JAX']).max():13.2e} {tok:13.3f} {exact:6.2f} {bleu:6.1f} {wer:6.1f}   "
              f"{payload_report(f, feats['JAX'], loaded.fingerprint)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", nargs="*", default=["base", "large-v3"], choices=sorted(DIMS),
                    help="speed at these dims (none: `--dims` alone, e.g. for the quality part only)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default: 10 base, 3 large-v3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch, onnxruntime and XLA threads: all cores (default) or 1")
    ap.add_argument("--sequential", action="store_true",
                    help="time one runtime after the other (less memory; always for large-v3)")
    ap.add_argument("--llm-dim", type=int, default=2048, help="projector output width")
    ap.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temp dir)")
    ap.add_argument("--config", default=None, help="a trained run's config (with --checkpoint): quality too")
    ap.add_argument("--checkpoint", default=None, help="the trained run dir")
    ap.add_argument("--records", type=int, default=0, help="quality: test records (0: all)")
    args = ap.parse_args()
    if args.threads == 1:  # XLA's CPU backend: all cores, or one thread with these flags
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")
    elif args.threads != os.cpu_count():
        ap.error(f"--threads: all cores ({os.cpu_count()}) or 1 (XLA cannot be limited otherwise)")

    import jax
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}), onnxruntime {onnxruntime.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench_edge_") as tmp:
        for name in args.dims:
            bench_dims(name, args, Path(args.workdir or tmp))
        if args.checkpoint:
            run_quality(args, Path(args.workdir or tmp))


if __name__ == "__main__":
    main()
