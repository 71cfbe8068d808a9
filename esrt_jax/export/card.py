"""The model card (OUT/README.md) of an export, from the run config, dev metrics and eval summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from esrt_jax import languages as L
from esrt_jax.export.common import ESRT_CONFIG, POINTER, ExportError
from esrt_jax.speech.config import SpeechModelConfig

def dev_metrics(stage_dir: Path) -> dict:
    """Last dev_* values logged by training (metrics.jsonl) and the last train loss."""
    f = stage_dir / "metrics.jsonl"
    out: dict = {}
    if not f.is_file():
        return out
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in rec.items():
            if (k.startswith("dev_") or k == "loss") and isinstance(v, (int, float)):
                out[k] = (rec.get("step"), v)
    return out


def find_eval_summary(run: Path, explicit: str | os.PathLike | None) -> dict | None:
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise ExportError(f"--eval-summary {p}: file does not exist")
        return {"path": str(p), **json.loads(p.read_text())}
    found = sorted(run.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    try:
        return {"path": str(found[-1]), **json.loads(found[-1].read_text())}
    except (json.JSONDecodeError, OSError):
        return None


def model_card(ec: dict, cfg, dev: dict, summary: dict | None) -> str:
    """OUT/README.md: what the model is, how it was trained, how to load it."""
    m, llm, enc = ec["model"], ec["llm"], ec["encoder"]
    src = ec["source"]
    tc = cfg.train
    names = ", ".join(f"{c} ({L.get(c).name})" for c in ec["languages"])
    mc = SpeechModelConfig.of(cfg)
    base_llm = llm.get("base") if isinstance(llm.get("base"), str) else (mc.llm or "tiny random "
                                                                         f"{llm['model_type']} (from the config)")
    base_enc = enc["path"] if enc["format"] == "pointer" else (mc.whisper or
                                                               "tiny random Whisper encoder (from the config)")
    lines = [
        "---", "library_name: transformers", "tags: [speech-translation, esrt, llm-srt, jax]", "---", "",
        f"# Speech LLM exported from esrt-jax (stage `{src['stage']}`, step {src['step']})", "",
        "Whisper encoder (frozen) -> Q-Former adapter -> decoder LLM, trained with "
        "esrt-jax (JAX/Flax) on the LLM-SRT / ESRT recipe. Input to the LLM: "
        "`[speech embeddings][prompt][answer][eos]` via `inputs_embeds` (speech first, no markers).", "",
        "## Model", "",
        f"- Speech encoder: {base_enc} (d_model {m['encoder_dim']}, {enc['num_mel_bins']} mel bins)",
        f"- Adapter: Q-Former, {m['num_queries']} queries, hidden {m['qformer_hidden']}"
        + (f", mean-pooled in windows of {m['pool_k']}" if m["pool_k"] else "")
        + f" -> {m['num_speech_tokens']} speech tokens; projector {m['projector']} to {m['llm_dim']}",
        f"- LLM: {base_llm} ({llm['model_type']}, hidden {llm['hidden_size']}, vocab {llm['vocab_size']}); "
        + ("LoRA merged into the weights" if llm["format"] == "merged" and llm.get("lora_merged") else
           "PEFT LoRA adapter in `llm/adapter/`" if llm["format"] == "peft" else "no LoRA"),
        f"- Edge/cloud split point: `{m['split']}`",
        f"- Languages ({len(ec['languages'])}): {names}",
        f"- Language tags: `<|xxx|>` as {ec['tokenizer']['language_tags']} tokens", "",
        "## Prompts", "",
        "| task | prompt | target |", "|---|---|---|",
        *[f"| {t} | `{v['prompt']}` | `{v['target']}` |" for t, v in ec["prompt"]["tasks"].items()], "",
        "The SRT output is split at `<|src|><|tgt|>` into transcription and translation.", "",
        "## Training", "",
        f"- Run: `{src['run_dir']}`, config `{src['config']}`"
        + (f" with overrides `{' '.join(src['overrides'])}`" if src["overrides"] else ""),
        f"- Stage `{src['stage']}`: {tc.steps} steps, batch {tc.batch_size}, lr {tc.lr} ({tc.schedule}, "
        f"{tc.warmup_steps} warm-up), weight decay {tc.weight_decay}; tasks "
        f"{cfg.data.get('tasks', {})}",
        "- LoRA: " + (f"r {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {list(cfg.lora.targets)}"
                       if cfg.lora.enabled else "off"),
    ]
    if dev:
        lines += ["", "## Dev metrics (logged by training)", "", "| metric | step | value |", "|---|---|---|"]
        lines += [f"| {k} | {s} | {v:.4f} |" for k, (s, v) in sorted(dev.items())]
    if summary:
        av = summary.get("averages", {})
        lines += ["", f"## Evaluation (`{summary['path']}`)", "",
                  f"{summary.get('records', '?')} records, {summary.get('n_directions', '?')} directions.", "",
                  "| metric | average |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in av.items() if v is not None]
    lines += [
        "", "## Files", "",
        "- `llm/`: " + ("Hugging Face causal LM (LoRA merged), tokenizer, generation config"
                        if llm["format"] == "merged" else
                        "base LLM (" + ("weights" if llm["base"]["format"] == "weights" else
                                        f"pointer `{POINTER}` to the local base dir") + ") and `adapter/` (PEFT)"),
        "- `adapter/model.safetensors`: Q-Former + projector, esrt-jax key names (kernels (in, out)); "
        "`adapter/llm_srt_adapter.{safetensors,pt}`: the LLM-SRT `encoder_projector.*` state dict",
        "- `encoder/`: " + ("Whisper encoder (`transformers` WhisperEncoder layout)" if enc["format"] == "weights"
                            else f"pointer `{POINTER}` to the base Whisper dir (frozen, identical)"),
        f"- `{ESRT_CONFIG}`: everything needed to reassemble the model", "",
        "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    if llm["format"] == "merged":
        lines += ["llm = AutoModelForCausalLM.from_pretrained('OUT/llm')",
                  "tok = AutoTokenizer.from_pretrained('OUT/llm')"]
    else:
        base_path = "'OUT/llm'" if llm["base"]["format"] == "weights" else repr(llm["base"]["path"])
        lines += ["from peft import PeftModel",
                  f"llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_path}), "
                  "'OUT/llm/adapter')",
                  "tok = AutoTokenizer.from_pretrained('OUT/llm/adapter')"]
    lines += [
        "# speech = projector(qformer(whisper_encoder(mel)))  -> (B, Q', D); see adapter/llm_srt_adapter.pt",
        "embeds = torch.cat([speech, llm.get_input_embeddings()(prompt_ids)], 1)",
        "out = llm.generate(inputs_embeds=embeds, attention_mask=mask)  # generation_config holds the settings",
        "```", "",
        "Back to JAX: `python -m esrt_jax.export --import OUT --run NEW_RUN_DIR`.", "",
    ]
    return "\n".join(lines)
