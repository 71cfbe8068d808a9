"""Greedy decoding speed: esrt-jax (`infer.generate.generate`: jitted prefill + KV-cache decode steps
inside one `lax.while_loop`) vs `transformers.generate`.

For each family (Qwen2, Qwen3, Gemma-3 text, Llama) at a ~100M-parameter config with random
weights: batch 8, prompt 96 tokens, 64 new tokens, greedy, EOS disabled so both produce exactly
64 tokens. The same weights run in both (the HF model's state dict is converted to our params in
memory), on the same CPU threads (`--threads` pins the process, torch.set_num_threads too).
Prints compile time (first call minus a steady call), steady-state tokens/s of both and the
ratio; checks that both produced the same tokens (reported, not asserted: random-weight logits
can tie in low precision).

    python bench/bench_llm.py                 # full: ~100M configs, every family
    python bench/bench_llm.py --quick         # tiny configs, few tokens (smoke test)
    python bench/bench_llm.py --families qwen2,gemma3_text --threads 8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _pin_threads(n: int | None) -> None:
    # Before jax/torch start their thread pools: both then see the same cores.
    if n:
        cpus = sorted(os.sched_getaffinity(0))[:n]
        os.sched_setaffinity(0, cpus)


def hf_configs(quick: bool) -> dict:
    """HF configs of each family: ~100M params (or tiny with --quick)."""
    import transformers as T

    if quick:
        common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        hd = 16
    else:
        # 12 layers x d768, GQA 12/4 heads, ffn 2048, vocab 32000: ~100M params.
        common = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096)
        hd = 64
    return {
        "qwen2": T.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": T.Qwen3Config(**common, head_dim=hd, tie_word_embeddings=True),
        "gemma3_text": T.Gemma3TextConfig(
            **common, head_dim=hd, query_pre_attn_scalar=hd, sliding_window=64 if not quick else 8,
            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention"
                         for i in range(common["num_hidden_layers"])]),
        "llama": T.LlamaConfig(**common, tie_word_embeddings=False),
    }


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_family(name, hf_cfg, args) -> dict:
    import numpy as np
    import torch
    import transformers as T

    import jax
    import jax.numpy as jnp
    from esrt_jax.convert.llm import model_from_hf_state
    from flax import nnx

    from esrt_jax.infer import generate as gen

    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    hf = hf.to(getattr(torch, args.dtype))  # both sides compute in --dtype on the same weights
    B, P, M = args.batch, args.prompt, args.new_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, hf_cfg.vocab_size, size=(B, P)).astype(np.int64)
    mask = np.ones((B, P), np.int64)

    # transformers: greedy, EOS disabled (min_new_tokens) so every run makes M tokens.
    gen_kwargs = dict(max_new_tokens=M, min_new_tokens=M, do_sample=False, num_beams=1,
                      pad_token_id=0, eos_token_id=None)
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.inference_mode():
        hf.generate(t_ids[:, :8], attention_mask=t_mask[:, :8], max_new_tokens=2, do_sample=False,
                    pad_token_id=0, eos_token_id=None)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out_hf = hf.generate(t_ids, attention_mask=t_mask, **gen_kwargs)
            times.append(time.perf_counter() - t0)
    hf_tokens = out_hf[:, P:].numpy()
    hf_s = min(times)

    # Ours: same weights, converted in memory.
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    dt = jnp.dtype(args.dtype)
    model, _ = model_from_hf_state(hf_cfg.to_dict(), state, dtype=dt, param_dtype=dt)
    del state
    # EOS disabled (None): every row runs all M steps, like HF above.
    gcfg = gen.GenerateConfig(max_new_tokens=M, no_repeat_ngram_size=0, eos_ids=(), pad_id=0)

    def run(model, ids, mask):
        g, s = nnx.split(model)
        return gen.generate(g, s, model.embed(ids), mask, gcfg)

    j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    t0 = time.perf_counter()
    first = jax.block_until_ready(run(model, j_ids, j_mask))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = jax.block_until_ready(run(model, j_ids, j_mask))
        times.append(time.perf_counter() - t0)
    ours_s = min(times)
    ours_tokens = np.asarray(ours)
    del first
    return dict(
        family=name, params_m=n_params(hf) / 1e6, compile_s=max(first_s - ours_s, 0.0),
        ours_tok_s=B * M / ours_s, hf_tok_s=B * M / hf_s, ratio=hf_s / ours_s,
        same_tokens=float((ours_tokens == hf_tokens).mean()),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configs, few tokens (smoke test)")
    ap.add_argument("--families", default="qwen2,qwen3,gemma3_text,llama")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is kept)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and compute dtype of BOTH sides")
    ap.add_argument("--threads", type=int, default=None, help="pin to this many cores (both sides)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.new_tokens, args.repeats = 2, 16, 8, 1
    _pin_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cfgs = hf_configs(args.quick)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in fams if f not in cfgs]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {sorted(cfgs)}")
    print(f"greedy decode: batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{args.dtype}, {threads} CPU threads, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__}")
    header = (f"{'family':<12} {'params':>8} {'compile s':>10} {'ours tok/s':>11} "
              f"{'HF tok/s':>10} {'ratio':>7} {'same tokens':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for f in fams:
        r = bench_family(f, cfgs[f], args)
        rows.append(r)
        print(f"{r['family']:<12} {r['params_m']:>7.1f}M {r['compile_s']:>10.2f} {r['ours_tok_s']:>11.1f} "
              f"{r['hf_tok_s']:>10.1f} {r['ratio']:>6.2f}x {r['same_tokens']:>11.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
