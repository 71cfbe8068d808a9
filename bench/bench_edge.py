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
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package; the torch reference adapter

DIMS = {  # HF WhisperConfig encoder keys
    "base": dict(num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
    "large-v3": dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                     encoder_ffn_dim=5120),
}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


def bench_dims(name: str, args, workdir: Path) -> list[tuple]:
    import jax
    import torch
    from flax import nnx
    from transformers import Qwen2Config, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as TorchWhisperEncoder

    from esrt_jax.convert.llm_srt import load_llm_srt_into
    from esrt_jax.edge import EdgeModel, OnnxEdgeModel
    from esrt_jax.export.onnx_edge import export_edge_onnx
    from esrt_jax.infer import payload as pl
    from esrt_jax.infer.cloud import model_fingerprint
    from esrt_jax.models.llm import config_from_hf
    from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter
    from esrt_jax.models.speech_llm import EdgeHalf, SpeechLLMConfig
    from esrt_jax.models.whisper import WhisperEncoderConfig, encoder_from_params, params_from_hf
    from test_qformer import numpy_state_dict, torch_reference

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
    rows = []

    # PyTorch eager: the reference
    with torch.inference_mode():
        run_t = lambda: t_proj.encoder_projector(t_enc(torch.from_numpy(mel)).last_hidden_state)  # noqa: E731
        t0 = time.perf_counter()
        y_t = run_t().numpy()
        first = time.perf_counter() - t0
        torch_ms = median_ms(run_t, repeats)
    rows.append(("PyTorch eager (HF + reference adapter)", f"first call {first:.2f} s", torch_ms, y_t))
    del t_enc, t_proj
    gc.collect()

    # ours, jitted (the JAX edge client's EdgeModel)
    model = EdgeModel(half, max_batch=1)
    t0 = time.perf_counter()
    y_j = model.encode(mel)
    compile_s = time.perf_counter() - t0
    jax_ms = median_ms(lambda: model.encode(mel), repeats)
    rows.insert(0, ("JAX jitted (ours)", f"compile {compile_s:.1f} s", jax_ms, y_j))

    # ONNX export
    out = workdir / name
    t0 = time.perf_counter()
    paths = export_edge_onnx(half, fingerprint, out, int8=True)
    export_s = time.perf_counter() - t0
    del model, half, encoder, adapter
    gc.collect()
    jax.clear_caches()
    for kind in ("fp32", "int8"):
        t0 = time.perf_counter()
        onnx_model = OnnxEdgeModel(paths[kind], threads=args.threads)
        build = time.perf_counter() - t0
        y = onnx_model.encode(mel)
        ms = median_ms(lambda: onnx_model.encode(mel), repeats)
        rows.append((f"ONNX {kind} (onnxruntime)", f"session {build:.1f} s", ms, y))
        del onnx_model
        gc.collect()

    print(f"export: {export_s:.1f} s; files: fp32 {file_mb(paths['fp32']):.1f} MiB, "
          f"int8 {file_mb(paths['int8']):.1f} MiB")
    print(f"{'runtime':40s} {'one-off':>16s} {'ms/utt':>9s} {'vs torch':>9s} {'max|f - JAX|':>13s}")
    for label, once, ms, y in rows:
        print(f"{label:40s} {once:>16s} {ms:9.1f} {torch_ms / ms:8.2f}x {np.abs(y - y_j).max():13.2e}")
    y_f32, y_i8 = rows[-2][3], rows[-1][3]
    ulps = fp16_ulps(y_f32, y_j)
    dec = [pl.decode(pl.encode(y[0], fingerprint=fingerprint, split="projector")).features for y in (y_f32, y_j)]
    print(f"fp16 payload, ONNX fp32 vs JAX: {np.mean(ulps == 0) * 100:.2f}% of values identical, max "
          f"{ulps.max()} fp16 ulp, max |diff| {np.abs(dec[0] - dec[1]).max():.2e} (fp16 spacing at the "
          f"largest value {np.spacing(np.float16(np.abs(y_j).max())):.1e})")
    rel = np.abs(y_i8 - y_j).max() / np.abs(y_j).max()
    cos = float((y_i8 * y_j).sum() / np.sqrt((y_i8 ** 2).sum() * (y_j ** 2).sum()))
    print(f"int8 vs JAX features: max |diff| {np.abs(y_i8 - y_j).max():.3e} ({rel * 100:.2f}% of max |f|), "
          f"mean |diff| {np.abs(y_i8 - y_j).mean():.3e}, cosine {cos:.6f}")
    print(f"after whisper-{name}: {load()}")
    return rows


def run_quality(args, workdir: Path) -> None:
    """JAX vs ONNX fp32 vs ONNX int8 on a trained run's test set: features, payloads, translations."""
    import types

    from bench_bandwidth import agreement, decode_ids, load_records, quality, texts
    from esrt_jax.audio import mel_from_file
    from esrt_jax.edge import OnnxEdgeModel
    from esrt_jax.export import main as export_main
    from esrt_jax.infer import payload as pl
    from esrt_jax.infer.cloud import translator_for
    from esrt_jax.train.restore import load_model

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
    print(f"{'edge half':10s} {'max|f - JAX|':>13s} {'fp16 payload = JAX':>19s} {'max ulp':>8s} "
          f"{'tokens = JAX':>13s} {'exact':>6s} {'BLEU':>6s} {'WER':>6s}")
    for name, f in feats.items():
        x = np.stack([pl.decode(pl.encode(r, fingerprint=loaded.fingerprint, split=tr.split)).features for r in f])
        ids[name] = decode_ids(tr, x, utts, 8)  # what the service decodes from the fp16 payloads
        ulps = fp16_ulps(f, feats["JAX"])
        tok, exact = agreement(ids[name], ids["JAX"])
        bleu, wer = quality(texts(tr, ids[name], utts), utts)
        print(f"{name:10s} {np.abs(f - feats['JAX']).max():13.2e} {np.mean(ulps == 0) * 100:18.2f}% "
              f"{ulps.max():8d} {tok:13.3f} {exact:6.2f} {bleu:6.1f} {wer:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", nargs="*", default=["base", "large-v3"], choices=sorted(DIMS),
                    help="speed at these dims (none: `--dims` alone, e.g. for the quality part only)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default: 10 base, 3 large-v3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch and onnxruntime threads (default: all cores, which XLA uses)")
    ap.add_argument("--llm-dim", type=int, default=2048, help="projector output width")
    ap.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temp dir)")
    ap.add_argument("--config", default=None, help="a trained run's config (with --checkpoint): quality too")
    ap.add_argument("--checkpoint", default=None, help="the trained run dir")
    ap.add_argument("--records", type=int, default=0, help="quality: test records (0: all)")
    args = ap.parse_args()

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
