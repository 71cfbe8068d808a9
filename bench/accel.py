"""The accelerator check: one prepared command that measures parity, speed, MFU and memory on a GPU
(or TPU) and writes the figures as JSON.

    python bench/accel.py --out accel.json               # one H100 / H200: <= 8 min (--budget 470)
    python bench/accel.py --smoke --out /tmp/smoke.json  # the same code path on CPU, tiny dims, seconds

Sections (each runs in its own child process with its own timeout, so one failure, hang or out of
memory is reported and the others still run; the JSON has every section with `ok` and `error`):

  device      jax devices, platform, device kind, memory, the chip's bf16 dense peak (table below)
              and the versions of python / jax / jaxlib / flax / optax / transformers / torch.
  parity      on the device, random tiny weights: our Whisper encoder, Q-Former and each LLM family
              (`esrt_jax.models.llm.FAMILIES`: qwen2, qwen3, gemma3_text, llama; `gemma3` is the same
              text model read from a multimodal config) against the transformers torch module on the
              same device, in fp32 (max |ours - torch| / max |torch| <= 1e-4, both at full matmul
              precision) and bf16 (ours against torch fp32 within max(1e-2, 2x torch bf16's own error)).
  train       the production train step (`cfg.model_builder()`, `train.step`, `train.loop`) at
              ESRT-4B dims (configs/esrt_4b.yaml with random weights: whisper-large-v3 encoder,
              Q-Former 8 x 768 with 80 queries, Gemma-3-4B + LoRA q/v r16, bf16 compute, remat,
              frozen params in bf16) fed cached encoder features (`enc (B, 1500, 1280)` bf16: the
              batch `data.encoder_cache` gives; the encoder does not run), text bucket 384. The
              largest batch that fits is searched with the dry run (`train.dryrun`: AOT compile,
              XLA memory analysis) against the device's memory. Reports steps/s, examples/s, answer
              tokens/s and LLM positions/s, FLOPs per step three ways -- XLA's cost analysis
              (`compiled.cost_analysis()['flops']`, which counts a while-loop body once, so scanned
              layers are under-counted), the compiled HLO's dot FLOPs with loop trip counts
              (`bench_train.hlo_dot_flops`: what runs, remat recompute included) and the model FLOPs
              the training loop logs (`bundle.flops_per_example`) -- and MFU (model FLOPs), HFU (HLO
              FLOPs) and the cost-analysis figure against the bf16 peak.
  train_torch the PyTorch reference step at the same dims and batch on the same device (LLM-SRT's
              way: Blip2QFormerModel + projector, HF Gemma-3 + peft LoRA fed `inputs_embeds`, full
              logits, HF loss, bf16 autocast, gradient checkpointing as our remat): examples/s and
              the ratio ours / torch. A smaller batch is taken (and said) when torch runs out of memory.
  memory      the train step's measured peak (device `memory_stats()['peak_bytes_in_use']`; on CPU,
              which has none, the process's max RSS) against the dry run's `peak_estimate`.
  encoder     whisper-large-v3 encoder forward (bf16, 30 s windows): audio seconds per second, ours
              and transformers' WhisperEncoder on the same device.
  decode      greedy decoding at Gemma-3-4B dims (bf16, random weights, EOS off): new tokens/s at
              batch 1 / 8 / 32, ours (`infer.generate`) and `transformers.generate` on the same device.

bf16 dense peaks (TFLOP/s) by device kind: H100 SXM 989 (PCIe 756), H200 989, A100 312, TPU v4 275,
v5e 197, v5p 459, v6e 918; an unknown kind (and the CPU) has no peak, and then no MFU.
Nothing is downloaded: all weights are random, built from configs; the run needs only the repo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SECTIONS = ("device", "parity", "train", "train_torch", "encoder", "decode")  # children, in this order
DERIVED = ("memory",)                                                          # from the train child
# (substring of device_kind, bf16 dense TFLOP/s); the first match wins, so specific names go first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
                    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0))
# Per-section wall-clock caps (s) on the accelerator; each is also cut to what the budget leaves.
CAPS = {"device": 60, "parity": 120, "train": 240, "train_torch": 120, "encoder": 90, "decode": 150}
# Smoke caps are loose: a shared 2-core CI machine may run it several times slower than alone.
SMOKE_CAPS = {"device": 120, "parity": 300, "train": 400, "train_torch": 200, "encoder": 200, "decode": 200}
GiB = 1024 ** 3


def peak_bf16_tflops(device_kind: str) -> float | None:
    for key, tf in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return tf
    return None


# ------------------------------------------------------------------------------------------ dims

def run_config(smoke: bool, batch: int = 8):
    """configs/esrt_4b.yaml without its weight dirs (random weights from the shape configs), on all
    local devices (data parallel), SRT stage; with `smoke` the same blocks at tiny dims."""
    from esrt_jax.config import from_dict, load_yaml
    from esrt_jax.train.config import RunConfig

    d = load_yaml(ROOT / "configs" / "esrt_4b.yaml")
    m = {k: v for k, v in d["model"].items() if k not in ("whisper", "llm", "tokenizer")}
    if smoke:
        m["whisper_config"] = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                   encoder_ffn_dim=64, max_source_positions=32)
        m["llm_config"] = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=512, sliding_window=8, sliding_window_pattern=2,
                               query_pre_attn_scalar=16, rms_norm_eps=1e-6, max_position_embeddings=512,
                               hidden_activation="gelu_pytorch_tanh")
        m["adapter"] = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                            num_queries=8)
    data = {"text_buckets": [32] if smoke else d["data"]["text_buckets"]}
    train = {**d["train"], "batch_size": batch, "grad_accum": 1, "progress": False}
    cfg = from_dict(RunConfig, {"run_dir": "/tmp/esrt-accel", "model": m, "data": data, "lora": d["lora"],
                                "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "train": train,
                                "stages": d.get("stages", {})})
    return cfg.for_stage("srt")


def with_batch(cfg, batch: int):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))


# ------------------------------------------------------------------------------------------ helpers

def versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch", "peft", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def torch_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int) -> float:
    """Min wall seconds of `fn()` (which must block until its result is ready) over `repeats` runs."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def rel_err(a, b, where=None) -> float:
    """max |a - b| / max |b| (over `where` when given), in float64."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torch_np(x):
    return x.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------ device

def child_device(args) -> dict:
    import jax
    devs = jax.devices()
    d0 = devs[0]
    stats = d0.memory_stats() or {}
    kind = d0.device_kind
    out = {"platform": d0.platform, "device_kind": kind, "device_count": len(devs),
           "devices": [str(d) for d in devs], "process_count": jax.process_count(),
           "memory_bytes_limit": stats.get("bytes_limit"), "peak_bf16_tflops": peak_bf16_tflops(kind),
           "versions": versions()}
    try:
        import torch
        out["torch_cuda"] = torch.cuda.is_available()
        out["torch_device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError as e:
        out["torch_cuda"], out["torch_error"] = None, str(e)
    print(f"{len(devs)} x {kind} ({d0.platform}); memory limit {stats.get('bytes_limit')}; "
          f"peak bf16 {out['peak_bf16_tflops']} TFLOP/s; {out['versions']}")
    return out


# ------------------------------------------------------------------------------------------ parity

FP32_TOL = 1e-4
BF16_FLOOR = 1e-2


def _bf16_verdict(ours: float, theirs: float) -> dict:
    tol = max(BF16_FLOOR, 2.0 * theirs)
    return {"bf16_err": ours, "torch_bf16_err": theirs, "bf16_tol": tol, "bf16_ok": ours <= tol}


def child_parity(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers as T
    from flax import nnx
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from esrt_jax.convert.llm import model_from_hf_state
    from esrt_jax.convert.qformer import load_hf_qformer
    from esrt_jax.models import llm as L
    from esrt_jax.models import whisper as W
    from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter

    jax.config.update("jax_default_matmul_precision", "highest")  # fp32 means fp32 (no TF32) ...
    torch.backends.cuda.matmul.allow_tf32 = False                 # ... on both sides
    torch.backends.cudnn.allow_tf32 = False
    dev = torch_device()
    rng = np.random.default_rng(0)
    items: dict[str, dict] = {}

    def perturb_(m, seed):  # HF init has zero biases and unit norms: make them non-trivial
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "embed_positions" not in name:
                    p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))

    def sd_np(m):
        return {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()}

    # -- Whisper encoder
    wc = T.WhisperConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                         encoder_ffn_dim=128, max_source_positions=16, decoder_layers=1,
                         decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(0)
    t_enc = HFWhisperEncoder(wc).eval()
    perturb_(t_enc, 0)
    sd = sd_np(t_enc)
    mel = rng.standard_normal((2, 80, 32)).astype(np.float32)
    t_enc = t_enc.to(dev)
    with torch.no_grad():
        ref = torch_np(t_enc(torch.from_numpy(mel).to(dev)).last_hidden_state)
        ref_bf = torch_np(t_enc.to(torch.bfloat16)(torch.from_numpy(mel).to(dev, torch.bfloat16)).last_hidden_state)
    res = {}
    for dt in ("float32", "bfloat16"):
        ecfg = W.WhisperEncoderConfig.from_hf_config(wc, dtype=dt, param_dtype=dt)
        enc = W.encoder_from_params(ecfg, W.params_from_hf(sd, ecfg, prefix="", names=list(sd)))
        g, s = nnx.split(enc)
        res[dt] = np.asarray(jax.jit(lambda s, x: nnx.merge(g, s)(x))(s, jnp.asarray(mel)))
    items["whisper_encoder"] = {"fp32_err": rel_err(res["float32"], ref),
                                **_bf16_verdict(rel_err(res["bfloat16"], ref), rel_err(ref_bf, ref))}

    # -- Q-Former (masked encoder input)
    qcfg = QFormerConfig(num_hidden_layers=2, cross_attention_frequency=1, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, encoder_hidden_size=24, num_queries=10, llm_dim=48)
    torch.manual_seed(1)
    t_q = T.Blip2QFormerModel(T.Blip2QFormerConfig(**qcfg.to_hf_config())).eval()
    perturb_(t_q, 1)
    sd = sd_np(t_q)
    enc_in = rng.standard_normal((2, 50, 24)).astype(np.float32)
    mask = np.ones((2, 50), np.int64)
    mask[1, 31:] = 0
    res, query = {}, None
    for dt in ("float32", "bfloat16"):
        ad = SpeechAdapter(dataclasses.replace(qcfg, dtype=dt, param_dtype=dt), rngs=nnx.Rngs(1))
        load_hf_qformer(ad.qformer, sd)
        if query is None:
            query = np.asarray(ad.query[...], np.float32)
        ad.query[...] = jnp.asarray(query, ad.query[...].dtype)  # the same queries at both precisions
        g, s = nnx.split(ad)
        res[dt] = np.asarray(jax.jit(lambda s, e, m: nnx.merge(g, s).qformer_features(e, m))(
            s, jnp.asarray(enc_in), jnp.asarray(mask)), np.float32)
    t_q = t_q.to(dev)
    with torch.no_grad():
        kw = dict(query_embeds=torch.from_numpy(query).expand(2, -1, -1).to(dev),
                  encoder_hidden_states=torch.from_numpy(enc_in).to(dev),
                  encoder_attention_mask=torch.from_numpy(mask).to(dev))
        ref = torch_np(t_q(**kw).last_hidden_state)
        t_q = t_q.to(torch.bfloat16)
        ref_bf = torch_np(t_q(**{k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
                                 for k, v in kw.items()}).last_hidden_state)
    items["qformer"] = {"fp32_err": rel_err(res["float32"], ref),
                        **_bf16_verdict(rel_err(res["bfloat16"], ref), rel_err(ref_bf, ref))}

    # -- each LLM family: logits on a left-padded batch
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_hidden_layers=2)
    fams = {"qwen2": T.Qwen2Config(**common, tie_word_embeddings=False),
            "qwen3": T.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True),
            "llama": T.LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True),
            "phi3": T.Phi3Config(**common, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
            "gemma3_text": T.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=4,
                                              query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                                              layer_types=["sliding_attention", "full_attention",
                                                           "sliding_attention"])}
    covered = {type(L.config_from_hf(c)).__name__ for c in fams.values()}
    missing = {mt for mt, cls in L.FAMILIES.items() if cls.__name__ not in covered}
    if missing:
        raise RuntimeError(f"parity: no tiny config for the LLM families {sorted(missing)}")
    B, Tn = 3, 16
    ids = rng.integers(3, 256, (B, Tn)).astype(np.int32)
    am = np.ones((B, Tn), bool)
    am[1, :5] = False
    am[2, :11] = False
    ids[~am] = 0
    pos = np.maximum(np.cumsum(am, -1) - 1, 0).astype(np.int32)
    for name, hc in fams.items():
        torch.manual_seed(2)
        tm = T.AutoModelForCausalLM.from_config(hc).eval()
        perturb_(tm, 2)
        sd = sd_np(tm)
        tm = tm.to(dev)
        tk = dict(input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
                  attention_mask=torch.tensor(am.astype(np.int64), device=dev),
                  position_ids=torch.tensor(pos, dtype=torch.long, device=dev))
        with torch.no_grad():
            ref = torch_np(tm(**tk).logits)
            ref_bf = torch_np(tm.to(torch.bfloat16)(**tk).logits)
        res = {}
        for dt in (jnp.float32, jnp.bfloat16):
            model, _ = model_from_hf_state(hc, sd, dtype=dt, param_dtype=dt)
            g, s = nnx.split(model)
            fwd = jax.jit(lambda s, i, p, m: (lambda mm: mm(mm.embed(i), p, m)[0])(nnx.merge(g, s)))
            res[jnp.dtype(dt).name] = np.asarray(fwd(s, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(am)),
                                                 np.float32)
        items[f"llm_{name}"] = {"fp32_err": rel_err(res["float32"], ref, am),
                                **_bf16_verdict(rel_err(res["bfloat16"], ref, am), rel_err(ref_bf, ref, am))}
    for k, v in items.items():
        v["fp32_tol"] = FP32_TOL
        v["fp32_ok"] = v["fp32_err"] <= FP32_TOL
        print(f"{k:18s} fp32 {v['fp32_err']:.2e} ({'ok' if v['fp32_ok'] else 'OVER'} {FP32_TOL:.0e})  "
              f"bf16 {v['bf16_err']:.2e} vs torch bf16 {v['torch_bf16_err']:.2e} "
              f"({'ok' if v['bf16_ok'] else 'OVER'} {v['bf16_tol']:.1e})")
    return {"torch_device": str(dev), "items": items,
            "pass": all(v["fp32_ok"] and v["bf16_ok"] for v in items.values())}


# ------------------------------------------------------------------------------------------ train

def on_cached_features(bundle, scfg):
    """The bundle with the batch `data.encoder_cache` (bf16) gives: `enc (rows, P, d_model)` instead
    of the mel (speech_llm.loss_fn then skips the encoder), without writing a cache to disk."""
    import jax
    import jax.numpy as jnp

    spec0 = bundle.batch_spec
    P, D = scfg.encoder.max_source_positions, scfg.encoder.d_model

    def spec(rows):
        s = {k: v for k, v in spec0(rows).items() if k not in ("mel", "audio")}
        return {**s, "enc": jax.ShapeDtypeStruct((rows, P, D), jnp.bfloat16)}
    return dataclasses.replace(bundle, batch_spec=spec)


def synthetic_batch(spec: dict, vocab: int, max_pos: int, seed: int = 0) -> tuple[dict, int]:
    """Host arrays for `spec`: random bf16 features, FLEURS-like 5-15 s utterances, rows of a
    16-token prompt and an answer filling 40-100% of the rest of the text bucket. -> (batch,
    answer tokens)."""
    import ml_dtypes
    import numpy as np

    from esrt_jax.audio import encoder_frames

    rng = np.random.default_rng(seed)
    B, T = spec["tokens"].shape
    seconds = rng.uniform(5.0, 15.0, B)
    frames = np.array([encoder_frames(round(x * 16000), max_pos) for x in seconds], np.int32)
    prompt = min(16, T // 4)
    length = prompt + np.maximum(1, (rng.uniform(0.4, 1.0, B) * (T - prompt)).astype(int))
    p = np.arange(T)[None]
    attn = (p < length[:, None]).astype(np.int32)
    loss = ((p >= prompt) & (attn > 0)).astype(np.int32)
    enc = rng.standard_normal(spec["enc"].shape, np.float32).astype(ml_dtypes.bfloat16)
    batch = {"enc": enc, "enc_frames": frames, "tokens": rng.integers(3, vocab, (B, T)).astype(np.int32) * attn,
             "loss_mask": loss, "attention_mask": attn}
    return batch, int(loss.sum())


def search_batch(limit: float, b0: int, cap: int, multiple: int, plan) -> tuple[int, list]:
    """Largest batch whose dry-run peak estimate stays under `limit`: plan b0, extrapolate the
    temporaries linearly from the origin (an over-estimate, so the guess is on the safe side),
    round down to `multiple`, re-plan; shrink while over. -> (batch, [(batch, peak estimate)])."""
    tried = []

    def est(b):
        rep = plan(b)["per_device_bytes"]
        tried.append((b, rep["peak_estimate"]))
        return rep

    r0 = est(b0)
    if r0["peak_estimate"] > limit:
        raise RuntimeError(f"batch {b0} needs {r0['peak_estimate'] / GiB:.2f} GiB by the dry run, "
                           f"over the {limit / GiB:.2f} GiB budget")
    fixed = r0["peak_estimate"] - r0["temporaries"]
    per_row = max(r0["temporaries"] / b0, 1.0)
    b = int((limit - fixed) // per_row) // multiple * multiple
    b = max(b0, min(cap, b))
    while b > b0:
        if est(b)["peak_estimate"] <= limit:
            return b, tried
        b = max(b0, int(b * limit / tried[-1][1]) // multiple * multiple)
        b = min(b, tried[-1][0] - multiple)
    return b0, tried


def child_train(args) -> dict:
    import jax
    import numpy as np

    from bench_train import hlo_dot_flops
    from esrt_jax.models.speech_llm import loss_chunk
    from esrt_jax.train import mesh as mesh_lib
    from esrt_jax.train.bundle import count_params
    from esrt_jax.train.dryrun import dry_run
    from esrt_jax.train.loop import (host_batch_to_global, memory_report, place_on_mesh, stage_layout,
                                     step_flops, with_frozen_dtype)
    from esrt_jax.train.step import jit_train_step, make_train_step

    d0 = jax.devices()[0]
    stats = d0.memory_stats() or {}
    limit_total = stats.get("bytes_limit") or args.cpu_mem_budget * 2**20
    limit = 0.9 * limit_total  # headroom for fragmentation and the allocator's own use
    cfg = run_config(args.smoke)
    builder = cfg.model_builder()
    abstract = builder(cfg, abstract=True)
    scfg = _speech_config(cfg)
    abstract = on_cached_features(abstract, scfg)

    plans: dict[int, dict] = {}

    def plan(b):
        plans[b] = dry_run(with_batch(cfg, b), abstract)
        return plans[b]

    n_dev = jax.device_count()
    if args.batch:
        B, tried = args.batch, [(args.batch, plan(args.batch)["per_device_bytes"]["peak_estimate"])]
    else:
        # smoke: cap = b0, so the search runs its arithmetic but compiles once (a CPU compile is slow)
        B, tried = search_batch(limit, b0=(2 if args.smoke else 8) * n_dev,
                                cap=(2 if args.smoke else 512) * n_dev, multiple=(2 if args.smoke else 8) * n_dev,
                                plan=plan)
    print(f"batch {B} (tried {[(b, round(p / GiB, 3)) for b, p in tried]} GiB; budget {limit / GiB:.2f} GiB)",
          flush=True)
    cfg_b = with_batch(cfg, B)
    tc = cfg_b.train
    del abstract
    t0 = time.perf_counter()
    bundle = with_frozen_dtype(on_cached_features(builder(cfg_b), scfg), tc)
    build_s = time.perf_counter() - t0
    layout = stage_layout(cfg_b, bundle)
    mesh, rules, optimizer, sh = layout.mesh, layout.rules, layout.optimizer, layout.sh
    host, answer_tokens = synthetic_batch(bundle.batch_spec(B), scfg.llm.vocab_size,
                                          scfg.encoder.max_source_positions)
    n_train, n_frozen = count_params(bundle.trainable), count_params(bundle.frozen)
    with jax.set_mesh(mesh):
        trainable, frozen = place_on_mesh(bundle, sh)
        bundle = dataclasses.replace(bundle, trainable=None, frozen=None)  # drop the host-side copies
        opt_state = jax.jit(optimizer.init, out_shardings=sh["opt_state"])(trainable)
        batch = host_batch_to_global(host, 1, sh["batch"])
        key = jax.random.key(tc.seed)
        step = jit_train_step(make_train_step(bundle.loss_fn, optimizer), sh)
        t0 = time.perf_counter()
        compiled = step.lower(trainable, opt_state, frozen, batch, key).compile()
        compile_s = time.perf_counter() - t0
        mem = memory_report(compiled, sh, trainable, frozen, sh["abstract_opt"])
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops_ca = float(ca.get("flops", 0.0)) * n_dev
        chunks = -(-answer_tokens // loss_chunk(mesh_lib.batch_divisor(mesh, rules), B * host["tokens"].shape[1]))
        flops_hlo = hlo_dot_flops(compiled.as_text(), chunks) * n_dev
        flops_model = step_flops(compiled, n_dev, bundle, B)
        in_use_before = (d0.memory_stats() or {}).get("bytes_in_use")
        for i in range(args.warmup):
            trainable, opt_state, met = compiled(trainable, opt_state, frozen, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(met)
        first_loss = float(met["loss"])
        t0 = time.perf_counter()
        for i in range(args.steps):
            trainable, opt_state, met = compiled(trainable, opt_state, frozen, batch,
                                                 jax.random.fold_in(key, 100 + i))
        jax.block_until_ready(met)
        dt = (time.perf_counter() - t0) / args.steps
        met = {k: float(v) for k, v in jax.device_get(met).items()}
    stats = d0.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    peak_src = "device memory_stats peak_bytes_in_use"
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_src = f"process max RSS ({d0.platform} has no device memory_stats)"
    peak_tf = peak_bf16_tflops(d0.device_kind)
    sps = 1.0 / dt
    Q, T = scfg.adapter.num_output_tokens, host["tokens"].shape[1]

    def util(fl):
        return None if peak_tf is None else fl * sps / (peak_tf * 1e12 * n_dev)

    est = plans[B]["per_device_bytes"]["peak_estimate"]
    out = {"batch": B, "text_len": int(T), "speech_tokens": int(Q), "batch_search": tried,
           "search_budget_bytes": limit, "trainable_params": n_train, "frozen_params": n_frozen,
           "build_s": build_s, "compile_s": compile_s, "dry_run_compile_s": plans[B]["compile_s"],
           "steps_timed": args.steps, "step_s": dt, "steps_per_s": sps, "examples_per_s": B * sps,
           "answer_tokens_per_s": answer_tokens * sps, "llm_positions_per_s": B * (Q + T) * sps,
           "loss_first": first_loss, "loss_last": met["loss"], "finite": bool(met["finite"]),
           "flops_per_step_cost_analysis": flops_ca, "flops_per_step_hlo": flops_hlo,
           "flops_per_step_model": flops_model, "tflops_s": flops_hlo * sps / 1e12,
           "tflops_s_model": flops_model * sps / 1e12, "tflops_s_cost_analysis": flops_ca * sps / 1e12,
           "peak_bf16_tflops": peak_tf, "mfu": util(flops_model), "hfu": util(flops_hlo),
           "mfu_cost_analysis": util(flops_ca), "compiled_memory": mem,
           "memory": {"peak_bytes": int(peak), "peak_source": peak_src, "dry_run_peak_estimate": est,
                      "measured_over_estimate": peak / est if est else None,
                      "bytes_in_use_before_steps": in_use_before, "bytes_limit": stats.get("bytes_limit"),
                      "dry_run": {k: v for k, v in plans[B]["per_device_bytes"].items()}}}
    print(f"batch {B}: {sps:.3f} steps/s, {B * sps:.2f} ex/s, {out['tflops_s']:.2f} TFLOP/s (HLO), "
          f"MFU {out['mfu']}, HFU {out['hfu']}; peak {peak / GiB:.3f} GiB vs dry run {est / GiB:.3f} GiB")
    return out


def _speech_config(cfg):
    """The SpeechLLMConfig of `cfg`, through the model builder's own module (it moves with it)."""
    import importlib
    mod = importlib.import_module(cfg.model_builder().__module__)
    return mod.speech_config(cfg)


# ------------------------------------------------------------------------------------------ train_torch

def child_train_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers as T
    from peft import LoraConfig as PeftLora, get_peft_model
    from torch import nn

    cfg = run_config(args.smoke)
    scfg = _speech_config(cfg)  # JAX_PLATFORMS=cpu in this child: jax never touches the device
    dev = torch_device()
    a, llm_cfg = scfg.adapter, dict(cfg.model["llm_config"])
    hf_cfg = T.AutoConfig.for_model(**llm_cfg)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        llm = T.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    llm.requires_grad_(False)
    if scfg.remat:  # our remat: true <-> HF gradient checkpointing
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.lora
    llm = get_peft_model(llm, PeftLora(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       target_modules=list(lora.targets)))

    class Projector(nn.Module):
        """LLM-SRT's Q-Former projector (the rule in QFormerConfig's docstring; pool_k None)."""

        def __init__(self):
            super().__init__()
            H, D = a.hidden_size, a.llm_dim
            self.query = nn.Parameter(torch.randn(1, a.num_queries, H))
            self.qformer = T.Blip2QFormerModel(T.Blip2QFormerConfig(**a.to_hf_config()))
            mid = None if D <= 1536 else (1536 if D <= 2560 else 2560)
            self.mlp = nn.Linear(H, D) if mid is None else nn.Sequential(nn.Linear(H, mid), nn.ReLU(),
                                                                         nn.Linear(mid, D))
            self.norm = nn.LayerNorm(D, eps=a.projector_eps)

        def forward(self, x):
            q = self.qformer(query_embeds=self.query.expand(x.shape[0], -1, -1),
                             encoder_hidden_states=x).last_hidden_state
            return self.norm(self.mlp(q))

    with torch.device(dev):
        proj = Projector().train()
    params = [p for p in list(proj.parameters()) + list(llm.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=dev.type == "cuda")
    P, Dm, Tn = scfg.encoder.max_source_positions, scfg.encoder.d_model, max(cfg.data["text_buckets"])
    Q = a.num_output_tokens

    def make(B):
        rng = np.random.default_rng(0)
        enc = torch.from_numpy(rng.standard_normal((B, P, Dm), np.float32)).to(dev, torch.bfloat16)
        tok = torch.from_numpy(rng.integers(3, scfg.llm.vocab_size, (B, Tn))).to(dev)
        prompt = min(16, Tn // 4)
        length = prompt + np.maximum(1, (rng.uniform(0.4, 1.0, B) * (Tn - prompt)).astype(int))
        attn = torch.from_numpy((np.arange(Tn)[None] < length[:, None]).astype(np.int64)).to(dev)
        lab = torch.where((attn > 0) & (torch.arange(Tn, device=dev)[None] >= prompt), tok, -100)
        full_attn = torch.cat([torch.ones(B, Q, dtype=attn.dtype, device=dev), attn], 1)
        full_lab = torch.cat([torch.full((B, Q), -100, dtype=lab.dtype, device=dev), lab], 1)
        return enc, tok * attn, full_attn, full_lab

    def step(data):
        enc, tok, attn, lab = data
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            speech = proj(enc.float())
            emb = torch.cat([speech.to(torch.bfloat16), llm.get_input_embeddings()(tok)], 1)
            loss = llm(inputs_embeds=emb, attention_mask=attn, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    want = args.batch or 2
    B, oom_at = want, []
    while True:
        try:
            data = make(B)
            for _ in range(args.warmup):
                first = float(step(data).detach())
            torch_sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step(data).detach()
            torch_sync(dev)
            dt = (time.perf_counter() - t0) / args.steps
            break
        except torch.OutOfMemoryError:
            oom_at.append(B)
            opt.zero_grad(set_to_none=True)
            data = None
            torch.cuda.empty_cache()
            if B == 1:
                raise
            B = max(1, B // 2)
            print(f"out of memory at batch {oom_at[-1]}; trying {B}", flush=True)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    out = {"device": str(dev), "batch": B, "same_batch": B == want, "oom_at": oom_at, "step_s": dt,
           "steps_per_s": 1.0 / dt, "examples_per_s": B / dt, "loss_first": first, "loss_last": float(loss),
           "gradient_checkpointing": bool(scfg.remat), "peak_bytes": peak}
    print(f"torch: batch {B}, {1 / dt:.3f} steps/s, {B / dt:.2f} ex/s (oom at {oom_at})")
    return out


# ------------------------------------------------------------------------------------------ encoder

def child_encoder(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers as T
    from flax import nnx
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from bench_whisper import encoder_flops
    from esrt_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig

    cfg = run_config(args.smoke)
    wc = dict(cfg.model["whisper_config"])
    dt = cfg.model.get("encoder_dtype", "bfloat16")
    ecfg = WhisperEncoderConfig(**wc, dtype=dt, param_dtype=dt)
    B = 2 if args.smoke else 16
    window_s = 30.0 * ecfg.max_source_positions / 1500  # smoke: a shorter window, scaled
    enc = WhisperEncoder(ecfg, rngs=nnx.Rngs(0))
    g, s = nnx.split(enc)
    mel = jnp.asarray(np.random.default_rng(0).standard_normal((B, ecfg.num_mel_bins, ecfg.num_frames)),
                      jnp.float32)
    fwd = jax.jit(lambda s, x: nnx.merge(g, s)(x))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(s, mel))
    first = time.perf_counter() - t0
    ours = best_time(lambda: jax.block_until_ready(fwd(s, mel)), args.repeats)
    del enc, s
    dev = torch_device()
    hc = T.WhisperConfig(**wc, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    hc._attn_implementation = "sdpa"
    with torch.device(dev):
        t_enc = HFWhisperEncoder(hc).to(torch.bfloat16 if dt == "bfloat16" else torch.float32).eval()
    t_mel = torch.from_numpy(np.array(mel)).to(dev, next(t_enc.parameters()).dtype)

    def run_t():
        with torch.inference_mode():
            t_enc(t_mel)
        torch_sync(dev)
    run_t()
    theirs = best_time(run_t, args.repeats)
    fl = encoder_flops(B, ecfg.num_mel_bins, ecfg.d_model, ecfg.encoder_layers, ecfg.encoder_ffn_dim,
                       ecfg.max_source_positions)
    out = {"batch": B, "window_s": window_s, "dtype": dt, "first_call_s": first, "ours_s": ours,
           "torch_s": theirs, "audio_s_per_s": B * window_s / ours, "torch_audio_s_per_s": B * window_s / theirs,
           "ratio_vs_torch": theirs / ours, "tflops_s": fl / ours / 1e12, "torch_device": str(dev)}
    print(f"encoder batch {B} x {window_s:g} s: ours {out['audio_s_per_s']:.0f} audio s/s, torch "
          f"{out['torch_audio_s_per_s']:.0f} ({out['ratio_vs_torch']:.2f}x)")
    return out


# ------------------------------------------------------------------------------------------ decode

def child_decode(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers as T
    from flax import nnx

    from esrt_jax.infer import generate as gen
    from esrt_jax.models.llm import CausalLM, config_from_hf

    cfg = run_config(args.smoke)
    llm_cfg = dict(cfg.model["llm_config"])
    batches = (1, 2) if args.smoke else (1, 8, 32)
    Pn, M = (8, 4) if args.smoke else (128, 64)
    model = CausalLM(config_from_hf(llm_cfg), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    g, s = nnx.split(model)
    gcfg = gen.GenerateConfig(max_new_tokens=M, no_repeat_ngram_size=0, eos_ids=(), pad_id=0)  # EOS off
    rng = np.random.default_rng(0)
    rows = {}
    for B in batches:
        ids = jnp.asarray(rng.integers(3, llm_cfg["vocab_size"], (B, Pn)), jnp.int32)
        mask = jnp.ones((B, Pn), bool)
        run = lambda: jax.block_until_ready(gen.generate(g, s, model.embed(ids), mask, gcfg))  # noqa: E731
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        t = best_time(run, args.repeats)
        rows[B] = {"ours_s": t, "ours_tok_s": B * M / t, "compile_s": max(first - t, 0.0)}
    del model, s
    dev = torch_device()
    hf_cfg = T.AutoConfig.for_model(**llm_cfg)
    with torch.device(dev):
        hf = T.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    for B in batches:
        ids = torch.from_numpy(rng.integers(3, llm_cfg["vocab_size"], (B, Pn))).to(dev)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=M, min_new_tokens=M, do_sample=False,
                  num_beams=1, eos_token_id=None, pad_token_id=0)

        def run_t():
            with torch.inference_mode():
                hf.generate(ids, **kw)
            torch_sync(dev)
        run_t()
        t = best_time(run_t, args.repeats)
        rows[B].update(torch_s=t, torch_tok_s=B * M / t, ratio_vs_torch=t / rows[B]["ours_s"])
        print(f"decode batch {B}: ours {rows[B]['ours_tok_s']:.1f} tok/s, transformers {B * M / t:.1f} tok/s "
              f"({rows[B]['ratio_vs_torch']:.2f}x)", flush=True)
    return {"prompt": Pn, "new_tokens": M, "dtype": "bfloat16", "torch_device": str(dev),
            "batches": {str(b): r for b, r in rows.items()}}


CHILDREN = {"device": child_device, "parity": child_parity, "train": child_train,
            "train_torch": child_train_torch, "encoder": child_encoder, "decode": child_decode}


# ------------------------------------------------------------------------------------------ parent

def child_env(name: str, smoke: bool, xla_cache: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", ESRT_ACCEL_XLA_CACHE=xla_cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if name == "train_torch":
        env["JAX_PLATFORMS"] = "cpu"  # jax only reads configs here: the device is torch's alone
    elif name == "train":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # the step has the device to itself
    else:  # jax shares the device with torch in this process: allocate on demand
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def run_child(name: str, args, timeout: float, workdir: Path, extra: list[str]) -> dict:
    res_file = workdir / f"{name}.json"
    res_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(res_file),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--cpu-mem-budget", str(args.cpu_mem_budget), *extra] + (["--smoke"] if args.smoke else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(name, args.smoke, args.xla_cache), start_new_session=True)
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            tail.append(line)
            del tail[:-40]
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    th.join(5)
    secs = time.perf_counter() - t0
    if res_file.is_file():
        out = json.loads(res_file.read_text())
    elif rc is None:
        out = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    else:
        out = {"ok": False, "error": f"child exited with code {rc} and wrote no result"}
    if not out.get("ok"):
        out["log_tail"] = "".join(tail[-25:])
    out["seconds"] = secs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny dims: the same code path in seconds")
    ap.add_argument("--out", default="accel.json", help="results JSON (default accel.json)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="wall seconds for all sections (default 470; smoke 1200)")
    ap.add_argument("--batch", type=int, default=None, help="train batch (default: the largest that fits)")
    ap.add_argument("--steps", type=int, default=None, help="timed train steps (default 5; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed train steps first (default 2; smoke 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of encoder / decode (best kept)")
    ap.add_argument("--cpu-mem-budget", type=float, default=256.0,
                    help="MiB the batch search may fill where the device reports no memory (CPU)")
    ap.add_argument("--xla-cache", default="/tmp/esrt-accel-xla-cache",
                    help="persistent XLA compilation cache (a rerun compiles nothing twice)")
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 5)
    args.warmup = args.warmup or (1 if args.smoke else 2)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.child:
        return child_main(args)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    budget = args.budget or (1200.0 if args.smoke else 470.0)
    caps = SMOKE_CAPS if args.smoke else CAPS
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"esrt-accel-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "smoke": args.smoke, "commit": commit,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget,
              "sections": {}}
    t_start = time.perf_counter()
    for i, name in enumerate(sections):
        left = budget - (time.perf_counter() - t_start)
        timeout = min(caps[name], left - 20.0 * (len(sections) - i - 1))
        if timeout < 15:
            report["sections"][name] = {"ok": False, "error": f"not run: {left:.0f} s of the budget left"}
            continue
        extra = []
        if name == "train" and args.batch:
            extra = ["--batch", str(args.batch)]
        if name == "train_torch":
            tr = report["sections"].get("train", {})
            b = args.batch or (tr.get("batch") if tr.get("ok") else None)
            if b is None:
                report["sections"][name] = {"ok": False, "error": "not run: needs the train section's batch "
                                                                  "(run train first, or pass --batch)"}
                continue
            extra = ["--batch", str(b)]
        print(f"== {name} (timeout {timeout:.0f} s)", flush=True)
        report["sections"][name] = run_child(name, args, timeout, workdir, extra)
    tr = report["sections"].get("train")
    if tr is not None:  # (f) memory: measured in the train child, reported as its own section
        report["sections"]["memory"] = ({"ok": True, **tr.pop("memory")} if tr.get("ok") and "memory" in tr
                                        else {"ok": False, "error": "the train section failed"})
    tt = report["sections"].get("train_torch")
    if tr and tt and tr.get("ok") and tt.get("ok"):
        tt["ours_over_torch_examples_per_s"] = tr["examples_per_s"] / tt["examples_per_s"]
    report["total_s"] = time.perf_counter() - t_start
    report["device"] = {k: report["sections"].get("device", {}).get(k)
                        for k in ("platform", "device_kind", "device_count")}
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    summary(report)
    print(f"wrote {args.out} ({report['total_s']:.0f} s)")
    return 0 if all(s.get("ok") for s in report["sections"].values()) else 1


def summary(rep: dict) -> None:
    s = rep["sections"]
    print(f"== accelerator check: {rep['device']} commit {rep['commit']}{' (smoke)' if rep['smoke'] else ''}")
    for name, r in s.items():
        print(f"  {name:12s} {'ok' if r.get('ok') else 'FAILED: ' + str(r.get('error'))[:200]}  "
              f"({r.get('seconds', 0):.0f} s)")
    if s.get("parity", {}).get("ok"):
        print(f"  parity within tolerance: {s['parity']['pass']}")
    t = s.get("train", {})
    if t.get("ok"):
        print(f"  train: batch {t['batch']}, {t['steps_per_s']:.3f} steps/s, {t['examples_per_s']:.2f} ex/s, "
              f"{t['tflops_s']:.1f} TFLOP/s (HLO), MFU {t['mfu']}, HFU {t['hfu']}")
    tt = s.get("train_torch", {})
    if tt.get("ok") and "ours_over_torch_examples_per_s" in tt:
        print(f"  vs PyTorch (batch {tt['batch']}): {tt['ours_over_torch_examples_per_s']:.2f}x examples/s")
    m = s.get("memory", {})
    if m.get("ok"):
        print(f"  memory: peak {m['peak_bytes'] / GiB:.3f} GiB ({m['peak_source']}) vs dry run "
              f"{m['dry_run_peak_estimate'] / GiB:.3f} GiB")


def child_main(args) -> int:
    cache = os.environ.get("ESRT_ACCEL_XLA_CACHE")
    if cache and args.child != "train_torch":
        import jax
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        out = {"ok": True, **CHILDREN[args.child](args)}
    except BaseException as e:  # noqa: BLE001 - reported in the JSON; the parent runs the next section
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        traceback.print_exc()
    Path(args.result).write_text(json.dumps(out, default=float))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
