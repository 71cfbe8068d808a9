"""Train-step speed: our jitted step (three ways) vs a PyTorch reference step, same weights,
batch and threads, measured in one run.

Two model settings (`--setting base|gemma|both`):
  base : whisper-base-shaped encoder (frozen; 80 mels, d 512, 6 layers, 3000 frames) -> 2-layer
         Q-Former (hidden 768, 80 queries) + projector -> ~100M Qwen2-style LLM (32k vocab).
  gemma: the same encoder and adapter -> a small Gemma-3-shaped LLM with Gemma-3's 262,144-token
         vocabulary (tied head, d 640, 4 layers): the large-vocabulary case.
Both with LoRA (q_proj, v_proj; r 16) on frozen LLM base weights; trainable: adapter + LoRA, AdamW.

Ours, four ways:
  (a) today's step before the cost work: encoder every step, logits over all (B, Q'+T) positions
  (b) + answer-only chunked loss (`speech_llm.answer_xent`; the production loss)
  (c) + encoder feature cache (batches carry the encoder output; `data.encoder_cache`)
  (d) + no attention to padding: an adapter with `attend_padding: false` whose cross-attention
      sees only the real encoder frames, given a prefix of the cached frames (the batch's
      longest real length rounded up to a bucket of 250 frames, 5 s). A different model from
      LLM-SRT's (which attends over the 30 s padding), so its loss differs.
Realistic lengths: the B utterances last 5-15 s (FLEURS-like, drawn with a fixed seed; padded to
30 s as Whisper and LLM-SRT do), and each row holds a 16-token prompt, an answer of ~3.2 tokens
per second of audio (+ eos) and right padding up to the text bucket.
The PyTorch reference is assembled and trained as LLM-SRT does it: transformers' WhisperEncoder
(every step, no_grad) -> LLM-SRT's Q-Former projector -> HF causal LM (+ peft LoRA) fed
`inputs_embeds = cat(speech, embed_tokens(text))`, full logits, loss on answer tokens; weights
are copied from the torch modules into ours with our converters, so all run the same function.

Reports compile time, steady-state steps/s and examples/s of each, the ratio to PyTorch (goal for
(c) / (d): >= 3x), the compiled step's temporary memory (XLA memory analysis), and the matmul FLOPs of
one step (ours: the dots of the compiled HLO times their loop trip counts; PyTorch:
`torch.utils.flop_counter`), so that time per FLOP can be compared too.

    python bench/bench_train.py                     # both settings, full size (slow on a small CPU)
    python bench/bench_train.py --quick             # tiny shapes, smoke test
    python bench/bench_train.py --setting gemma --threads 8 --batch 4 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and tests.reference (the torch reference adapter)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--setting", default="both", choices=("base", "gemma", "both"))
    p.add_argument("--threads", type=int, default=None, help="pin both frameworks to N cores")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--text", type=int, default=None, help="text tokens per example")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    return p.parse_args()


def shapes(quick: bool, setting: str) -> dict:
    if quick:
        s = dict(n_mels=80, d_enc=32, enc_layers=2, enc_heads=4, enc_ffn=64, max_pos=32,
                 q_layers=2, q_hidden=32, q_heads=4, q_ffn=64, queries=8,
                 vocab=320, d_llm=64, llm_layers=2, llm_heads=4, llm_kv=2, llm_ffn=128, head_dim=16,
                 batch=2, text=16, steps=3)
        return {**s, "vocab": 4096} if setting == "gemma" else s
    s = dict(n_mels=80, d_enc=512, enc_layers=6, enc_heads=8, enc_ffn=2048, max_pos=1500,
             q_layers=2, q_hidden=768, q_heads=12, q_ffn=3072, queries=80,
             vocab=32000, d_llm=768, llm_layers=12, llm_heads=12, llm_kv=4, llm_ffn=2688, head_dim=64,
             batch=4, text=64, steps=3)
    if setting == "gemma":
        s.update(vocab=262144, d_llm=640, llm_layers=4, llm_heads=4, llm_kv=1, llm_ffn=2048, head_dim=256)
    return s


def hlo_dot_flops(hlo: str, unknown_trips: int = 1) -> float:
    """Matmul FLOPs of a compiled XLA module: 2 x output size x contracted size of every dot, times
    the trip counts of the while loops around it (a loop with a data-dependent trip count, the
    answer-only loss's chunk loop, counts `unknown_trips` times)."""
    import math
    import re

    comps: dict[str, list[str]] = {}
    entry = cur = None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            cur = head.group(2)
            comps[cur] = []
            entry = cur if head.group(1) else entry
        elif cur and line.startswith("  "):
            comps[cur].append(line.strip().removeprefix("ROOT "))

    def dims(shape: str) -> list[int]:
        return [int(d) for d in shape.split(",") if d]

    def flops(comp: str) -> float:
        shapes, total = {}, 0.0
        for ins in comps.get(comp, []):
            m = re.match(r"%?([\w.\-]+) = \w+\[([0-9,]*)\]\S* (\w+)\(([^)]*)\)", ins)
            if m:
                shapes[m.group(1)] = dims(m.group(2))
                if m.group(3) == "dot":
                    lhs = shapes[re.findall(r"%([\w.\-]+)", m.group(4))[0]]
                    k = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins).group(1)
                    total += 2 * math.prod(dims(m.group(2))) * math.prod(lhs[i] for i in dims(k))
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins)
            for callee in re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", ins):
                n = (int(trips.group(1)) if trips else unknown_trips) if " while(" in ins else 1
                total += flops(callee) * n
        return total

    return flops(entry)


def count_cpu_sdpa(fc, aten) -> None:
    """Give torch's flop_counter the formulas of the CPU kernels of scaled_dot_product_attention
    (it has none and counts them as 0); once per process."""
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kw):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_back(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def main() -> None:
    args = parse()
    if args.threads:
        cpus = sorted(os.sched_getaffinity(0))[:args.threads]
        os.sched_setaffinity(0, cpus)
        os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                           f"intra_op_parallelism_threads={args.threads}")
    for setting in (("base", "gemma") if args.setting == "both" else (args.setting,)):
        run_setting(args, setting)


def run_setting(args, setting: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from flax import nnx
    from peft import LoraConfig as PeftLora, get_peft_model
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config, WhisperConfig)
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    from esrt_jax.audio import encoder_frames
    from esrt_jax.convert.llm import model_from_hf_state
    from esrt_jax.convert.llm_srt import load_llm_srt_into
    from esrt_jax.models import whisper as W
    from esrt_jax.models.llm import LoraConfig, positions_from_mask
    from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter
    from esrt_jax.models.speech_llm import SpeechLLM, SpeechLLMConfig
    from esrt_jax.models.speech_llm import loss_chunk, loss_fn as speech_loss
    from esrt_jax.train.bundle import split_nnx
    from esrt_jax.train.config import TrainConfig
    from esrt_jax.train.optimizer import make_optimizer
    from esrt_jax.train.step import make_train_step
    from tests.reference.qformer import numpy_state_dict, torch_reference

    s = shapes(args.quick, setting)
    B, T, steps = args.batch or s["batch"], args.text or s["text"], args.steps or s["steps"]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    jax.config.update("jax_default_matmul_precision", "highest")

    # ---- the same weights in both frameworks
    torch.manual_seed(0)
    wcfg = WhisperConfig(num_mel_bins=s["n_mels"], d_model=s["d_enc"], encoder_layers=s["enc_layers"],
                         encoder_attention_heads=s["enc_heads"], encoder_ffn_dim=s["enc_ffn"],
                         max_source_positions=s["max_pos"], decoder_layers=1, decoder_attention_heads=4,
                         decoder_ffn_dim=64, vocab_size=100, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)
    wcfg._attn_implementation = "sdpa"
    t_enc = HFWhisperEncoder(wcfg).eval()
    enc_cfg = W.WhisperEncoderConfig.from_hf_config(wcfg)
    sd = numpy_state_dict(t_enc)
    enc = W.encoder_from_params(enc_cfg, W.params_from_hf(sd, enc_cfg, prefix="", names=list(sd)))
    ad_cfg = QFormerConfig(num_hidden_layers=s["q_layers"], hidden_size=s["q_hidden"],
                           num_attention_heads=s["q_heads"], intermediate_size=s["q_ffn"],
                           encoder_hidden_size=s["d_enc"], num_queries=s["queries"], llm_dim=s["d_llm"],
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    t_proj = torch_reference(ad_cfg, seed=1)
    def _adapter(cfg):
        a = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
        load_llm_srt_into(a, numpy_state_dict(t_proj))
        return a
    adapter = _adapter(ad_cfg)
    common = dict(vocab_size=s["vocab"], hidden_size=s["d_llm"], intermediate_size=s["llm_ffn"],
                  num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"],
                  num_key_value_heads=s["llm_kv"])
    if setting == "gemma":
        hf_cfg = Gemma3TextConfig(**common, head_dim=s["head_dim"], sliding_window=512,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=1)
    else:
        hf_cfg = Qwen2Config(**common, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(2)
    t_llm = AutoModelForCausalLM.from_config(hf_cfg)
    lora = LoraConfig(targets=("q_proj", "v_proj"), rank=16, alpha=32.0, dropout=0.0)
    llm, llm_cfg = model_from_hf_state(hf_cfg, numpy_state_dict(t_llm), lora=lora)
    t_llm = get_peft_model(t_llm, PeftLora(r=16, lora_alpha=32, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
    model = SpeechLLM.from_parts(SpeechLLMConfig(enc_cfg, ad_cfg, llm_cfg, lora=lora), enc, adapter, llm)
    n_params = sum(p.numel() for p in t_llm.parameters())
    print(f"== setting {setting}: threads {threads}; batch {B}, text {T}, mel frames {2 * s['max_pos']}; "
          f"LLM {n_params / 1e6:.1f}M params, vocab {s['vocab']} (+ encoder "
          f"{sum(p.numel() for p in t_enc.parameters()) / 1e6:.1f}M, adapter "
          f"{sum(p.numel() for p in t_proj.parameters()) / 1e6:.1f}M)", flush=True)

    load0 = os.getloadavg()
    rng = np.random.default_rng(0)
    seconds = rng.uniform(5.0, 15.0, B)  # FLEURS-like utterances, padded to 30 s
    frames = np.array([encoder_frames(round(x * 16000)) for x in seconds], np.int32)
    frames = np.maximum(frames * s["max_pos"] // 1500, 1).astype(np.int32)  # --quick: fewer frames
    mel = rng.standard_normal((B, s["n_mels"], 2 * s["max_pos"])).astype(np.float32)
    mel[:, :, 2 * frames.max():] = -0.5  # constant log-mel of the padding (exact value immaterial)
    tokens = rng.integers(3, s["vocab"], (B, T)).astype(np.int32)
    prompt = min(16, T // 4)
    answer = np.minimum(np.round(3.2 * seconds).astype(int) + 1, T - prompt)
    pos = np.arange(T)[None]
    attn = (pos < (prompt + answer)[:, None]).astype(np.int32)
    loss_mask = ((pos >= prompt) & (attn > 0)).astype(np.int32)
    text = dict(tokens=tokens * attn, loss_mask=loss_mask, attention_mask=attn)
    enc_out = np.asarray(jax.jit(lambda m: enc(m))(jnp.asarray(mel)))  # what the cache would hold
    bucket = 250 if not args.quick else 4
    P = min(s["max_pos"], -(-int(frames.max()) // bucket) * bucket)  # the (d) prefix
    print(f"  audio {', '.join(f'{x:.1f}' for x in seconds)} s -> {frames.tolist()} of {s['max_pos']} "
          f"encoder frames ((d) keeps {P}); answers {answer.tolist()} tokens of {T}", flush=True)
    model_d = SpeechLLM.from_parts(
        SpeechLLMConfig(enc_cfg, dataclasses.replace(ad_cfg, attend_padding=False), llm_cfg, lora=lora),
        enc, _adapter(dataclasses.replace(ad_cfg, attend_padding=False)), llm)

    # ---- ours: the production train step (trainable = adapter + LoRA), three ways
    def today_loss(m, batch):
        """The loss before the cost work: logits over every (B, Q'+T) position."""
        speech = m.encode(batch["mel"], split="projector")
        embeds, mask = m.llm_inputs(speech, batch["tokens"], batch["attention_mask"])
        logits, _ = m.llm(embeds, positions_from_mask(mask), mask)
        Q = speech.shape[1]
        logits = logits[:, Q - 1:Q - 1 + T]
        w = batch["loss_mask"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"])
        return (ce * w).sum() / jnp.maximum(w.sum(), 1.0), {"tokens": w.sum()}

    def chunked_loss(m, batch):
        loss, aux = speech_loss(m, batch)
        return loss, {"tokens": aux["tokens"]}

    variants = {"(a) today": (model, today_loss, dict(mel=mel, **text)),
                "(b) + answer-only chunked loss": (model, chunked_loss, dict(mel=mel, **text)),
                "(c) + encoder cache": (model, chunked_loss, dict(enc=enc_out, **text)),
                "(d) + no attention to padding": (model_d, chunked_loss,
                                                  dict(enc=enc_out[:, :P], enc_frames=frames, **text))}
    opt = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=0, steps=1000))
    chunks = -(-int(loss_mask.sum()) // loss_chunk(1, B * T))  # trips of the answer-only loss's loop
    results = {}
    for name, (mdl, loss, data) in variants.items():
        bundle, _ = split_nnx(mdl, ("^adapter/", r"/lora_[ab]$"), lambda m, b, r, f=loss: f(m, b))
        step = jax.jit(make_train_step(bundle.loss_fn, opt), donate_argnums=(0, 1))
        batch = {k: jnp.asarray(v)[None] for k, v in data.items()}
        tr = jax.tree.map(jnp.copy, bundle.trainable)  # donated: keep the model's own arrays
        os_ = opt.init(tr)
        t0 = time.perf_counter()
        compiled = step.lower(tr, os_, bundle.frozen, batch, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        flops = hlo_dot_flops(compiled.as_text(), chunks)
        tr, os_, met = compiled(tr, os_, bundle.frozen, batch, jax.random.key(0))  # warm-up
        first = float(met["loss"])  # at the initial weights: the same for (a)-(c); (d) is another model
        t0 = time.perf_counter()
        for i in range(steps):
            tr, os_, met = compiled(tr, os_, bundle.frozen, batch, jax.random.key(i))
        jax.block_until_ready(met)
        results[name] = (steps / (time.perf_counter() - t0), compile_s, temp, first, flops)
        del tr, os_, compiled, step, bundle
        print(f"  {name}: done", flush=True)

    # ---- PyTorch reference step (AdamW on adapter + LoRA, encoder frozen every step, full logits)
    t_enc.requires_grad_(False)
    params = [p for p in list(t_proj.parameters()) + list(t_llm.parameters()) if p.requires_grad]
    topt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    tm, tt = torch.from_numpy(mel), torch.from_numpy(tokens).long()
    labels = torch.where(torch.from_numpy(loss_mask).bool(), tt, torch.full_like(tt, -100))
    t_attn = torch.cat([torch.ones(B, s["queries"], dtype=torch.long), torch.from_numpy(attn).long()], 1)
    Qs = s["queries"]

    def torch_step():
        with torch.no_grad():
            enc_out = t_enc(tm).last_hidden_state
        speech = t_proj.encoder_projector(enc_out)
        emb = torch.cat([speech, t_llm.get_input_embeddings()(tt)], 1)
        lab = torch.cat([torch.full((B, Qs), -100, dtype=torch.long), labels], 1)
        loss = t_llm(inputs_embeds=emb, attention_mask=t_attn, labels=lab).loss
        topt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        topt.step()
        return float(loss.detach())

    from torch.utils import flop_counter as fc
    count_cpu_sdpa(fc, torch.ops.aten)
    with fc.FlopCounterMode(display=False) as counter:
        t_loss = torch_step()  # warm-up (loss at the initial weights)
    t_flops = counter.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(steps):
        torch_step()
    ref = steps / (time.perf_counter() - t0)

    print(f"  load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) at the end of "
          f"the runs (started at {' / '.join(f'{x:.1f}' for x in load0)})")
    print(f"{'':30s} {'steps/s':>8s} {'ex/s':>7s} {'vs PyTorch':>10s} {'compile':>8s} {'temp mem':>9s} "
          f"{'loss@init':>9s} {'GFLOP/step':>10s} {'GFLOP/s':>8s}")
    print(f"{'PyTorch reference':30s} {ref:8.3f} {ref * B:7.2f} {'1.00x':>10s} {'-':>8s} {'-':>9s} "
          f"{t_loss:8.4f} {t_flops / 1e9:10.1f} {t_flops * ref / 1e9:8.1f}")
    for name, (sps, comp, temp, first, flops) in results.items():
        print(f"{name:30s} {sps:8.3f} {sps * B:7.2f} {sps / ref:9.2f}x {comp:7.1f}s {temp / 2**20:7.0f}MiB "
              f"{first:8.4f} {flops / 1e9:10.1f} {flops * sps / 1e9:8.1f}")
    for name in ("(c) + encoder cache", "(d) + no attention to padding"):
        r = results[name][0] / ref
        print(f"goal {name[:3]} >= 3x PyTorch examples/s: {r:.2f}x ({'met' if r >= 3 else 'NOT met'})",
              flush=True)


if __name__ == "__main__":
    main()
