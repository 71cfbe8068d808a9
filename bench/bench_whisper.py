"""Our jitted Whisper encoder vs transformers' PyTorch WhisperEncoder on CPU, same weights.

    python bench/bench_whisper.py            # whisper-base dims, batch 4 x 30 s
    python bench/bench_whisper.py --quick    # batch 1, fewer repeats (smoke test)

Prints compile time, steady-state ms per batch (median of N runs) for both, the ratio
ours / torch (goal <= 1.0), and our achieved GFLOP/s (analytic count: convs + attention + MLP)
as a fraction of a plain jitted f32 matmul's GFLOP/s measured in the same run (goal >= 0.6).
Both frameworks use every core: torch.set_num_threads(cores); XLA's CPU backend uses all cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def encoder_flops(b: int, n_mels: int, d: int, layers: int, ffn: int, positions: int) -> float:
    """Multiply-adds x 2 of one forward pass (elementwise ops, softmax and norms not counted)."""
    frames, t = 2 * positions, positions
    conv = 2 * b * frames * (3 * n_mels) * d + 2 * b * t * (3 * d) * d
    proj = 4 * 2 * b * t * d * d                  # q, k, v, out
    attn = 2 * 2 * b * t * t * d                   # q k^T and p v over all heads
    mlp = 2 * 2 * b * t * d * ffn                  # fc1, fc2
    return conv + layers * (proj + attn + mlp)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1, 2 repeats (smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (1 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs; default 10 (2 with --quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--n-mels", type=int, default=80)
    ap.add_argument("--no-scan", action="store_true", help="Python loop over layers instead of scan")
    ap.add_argument("--attention", default="auto", choices=["auto", "blocked", "xla"],
                    help="our attention: blocked query tiles (auto on CPU) or jax.nn.dot_product_attention")
    args = ap.parse_args()
    batch = args.batch or (1 if args.quick else 4)
    repeats = args.repeats or (2 if args.quick else 10)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as TorchWhisperEncoder

    from esrt_jax.models.whisper import WhisperEncoderConfig, encoder_from_params, params_from_hf

    torch.set_num_threads(args.threads)
    hf_cfg = WhisperConfig(num_mel_bins=args.n_mels, d_model=args.d_model, encoder_layers=args.layers,
                           encoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn,
                           max_source_positions=1500)
    torch.manual_seed(0)
    t_model = TorchWhisperEncoder(hf_cfg).eval()
    tensors = {k: v.numpy() for k, v in t_model.state_dict().items()}
    cfg = WhisperEncoderConfig.from_hf_config(hf_cfg, scan_layers=not args.no_scan,
                                              attention=args.attention)
    model = encoder_from_params(cfg, params_from_hf(tensors, cfg, prefix="", names=tensors))
    graphdef, state = nnx.split(model)

    mel = np.random.default_rng(0).standard_normal((batch, args.n_mels, 3000)).astype(np.float32)
    mel_j = jax.device_put(mel)
    mel_t = torch.from_numpy(mel)

    print(f"jax {jax.__version__} ({jax.default_backend()}, {len(jax.devices())} device(s)), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, attention "
          f"{t_model.config._attn_implementation}), {os.cpu_count()} cores")
    print(f"whisper encoder: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
          f"ffn {args.ffn}, {args.n_mels} mels; batch {batch} x 30 s; median of {repeats} runs; "
          f"{'python loop' if args.no_scan else 'scan'} over layers, {args.attention} attention")

    # --- ours: compile, then steady state
    fwd = jax.jit(lambda state, mel: nnx.merge(graphdef, state)(mel))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, mel_j).compile()
    compile_s = time.perf_counter() - t0
    y = compiled(state, mel_j).block_until_ready()  # warm-up
    ours_ms = median_ms(lambda: compiled(state, mel_j).block_until_ready(), repeats)

    # --- torch
    with torch.inference_mode():
        t0 = time.perf_counter()
        y_t = t_model(mel_t).last_hidden_state  # first call (warm-up)
        torch_first_s = time.perf_counter() - t0
        torch_ms = median_ms(lambda: t_model(mel_t), repeats)
    diff = float(np.abs(np.asarray(y) - y_t.numpy()).max())

    # --- plain jitted f32 matmul on the same machine
    n = 1024 if args.quick else 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul).lower(a, b).compile()
    mm(a, b).block_until_ready()
    mm_ms = median_ms(lambda: mm(a, b).block_until_ready(), max(3, repeats))
    mm_gflops = 2 * n**3 / (mm_ms * 1e6)

    flops = encoder_flops(batch, args.n_mels, args.d_model, args.layers, args.ffn, 1500)
    ours_gflops = flops / (ours_ms * 1e6)
    torch_gflops = flops / (torch_ms * 1e6)
    print(f"max |ours - torch| = {diff:.2e}")
    print(f"compile (ours)          : {compile_s:8.2f} s   (torch first call {torch_first_s:.2f} s)")
    print(f"ours  steady state      : {ours_ms:8.1f} ms/batch  {ours_gflops:7.1f} GFLOP/s")
    print(f"torch steady state      : {torch_ms:8.1f} ms/batch  {torch_gflops:7.1f} GFLOP/s")
    print(f"ratio ours/torch        : {ours_ms / torch_ms:8.3f}   (goal <= 1.0)")
    print(f"matmul {n}x{n} f32     : {mm_gflops:8.1f} GFLOP/s")
    print(f"ours / matmul throughput: {ours_gflops / mm_gflops:8.3f}   (goal >= 0.6; "
          f"{flops / 1e9:.1f} GFLOP per batch)")


if __name__ == "__main__":
    main()
