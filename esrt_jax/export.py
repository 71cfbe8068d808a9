"""Back to Hugging Face: a trained stage checkpoint -> PyTorch-world files, and back again.

    python -m esrt_jax.export --run RUN_DIR [--stage srt] [--step N] --out OUT [--merge-lora | --peft]
    python -m esrt_jax.export --import OUT --run NEW_RUN_DIR

Export reads the run's config (`RUN_DIR/config.yaml`, or `--config`), rebuilds the speech LLM
from the base weights it was trained on, restores the stage's trainable params from Orbax
(`esrt_jax.infer.cloud.load_model`) and writes:

    OUT/llm/                 the LLM as a Hugging Face dir (sharded safetensors + index, config,
                             generation_config with the run's decoding settings and token ids,
                             tokenizer incl. any added language-tag tokens), LoRA merged;
                             with --peft: the untouched base (HF dir, or BASE_MODEL.json pointing
                             at the local base dir when its weights were frozen and unchanged)
                             plus OUT/llm/adapter/ (a PEFT LoRA adapter dir + tokenizer)
    OUT/adapter/             model.safetensors      Q-Former + projector, our key names (below)
                             config.json            our QFormerConfig + the HF Blip2QFormerConfig
                             llm_srt_adapter.safetensors  LLM-SRT state dict (`encoder_projector.*`)
                             llm_srt_adapter.pt     the same as a torch state dict (when torch is
                                                    importable), what LLM-SRT's code loads
    OUT/encoder/             the Whisper encoder as an HF dir (config.json + model.safetensors,
                             bare `WhisperEncoder` names), or BASE_MODEL.json pointing at the local
                             base Whisper dir (the encoder is frozen, so it is identical)
    OUT/esrt_config.json     everything needed to reassemble the model: query length, pooling,
                             split point, prompt format, languages, dims, tokenizer mode, the run
                             config, file layout
    OUT/README.md            a model card from the run config, dev metrics and eval summary

Adapter key names (`OUT/adapter/model.safetensors`, `esrt_jax.models.qformer.flat_params`):
`query` (1, Q, H); `qformer.layers.{i}.{attention,crossattention}.{query,key,value,out}.{kernel,bias}`,
`...norm.{scale,bias}`, `qformer.layers.{i}.{ffn_in,ffn_out}.{kernel,bias}`, `...ffn_norm.*`,
`qformer.layernorm.{scale,bias}`; projector `linear.*` or `linear1.*`/`linear2.*`; `norm.{scale,bias}`.
Kernels are stored (in, out) (the transpose of torch's Linear weight).

Import writes `NEW_RUN_DIR/config.yaml` (the original run config with the model paths pointing into
OUT) and `NEW_RUN_DIR/<stage>/checkpoints/<step>/`, an Orbax checkpoint in the training format
(trainable params, fresh optimizer state, meta, data-iterator state when the data can be opened):
`python -m esrt_jax.infer --config NEW_RUN_DIR/config.yaml --checkpoint NEW_RUN_DIR`, `eval.py` and
`train.py --config NEW_RUN_DIR/config.yaml --init-from NEW_RUN_DIR/<stage>/checkpoints` take it.
With a merged export the new run's LoRA factors (if LoRA is enabled) start fresh with B = 0, so the
model computes exactly the exported function.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT = "esrt-jax-export"
VERSION = 1
ESRT_CONFIG = "esrt_config.json"
POINTER = "BASE_MODEL.json"
CONFIG_NAMES = ("config.yaml", "config.yml", "run_config.yaml")


class ExportError(ValueError):
    """Bad export/import input: names the file or directory and the problem."""


# ----------------------------------------------------------------------------- run discovery

def find_run_config(run_dir: str | os.PathLike, config: str | os.PathLike | None = None,
                    stage: str | None = None) -> Path:
    """The YAML the run was trained with: `config`, else RUN_DIR/config.yaml (or RUN_DIR/<stage>/)."""
    if config is not None:
        p = Path(config)
        if not p.is_file():
            raise ExportError(f"--config {p}: file does not exist")
        return p
    run = Path(run_dir)
    cands = [run / n for n in CONFIG_NAMES] + ([run / stage / n for n in CONFIG_NAMES] if stage else [])
    for c in cands:
        if c.is_file():
            return c
    raise ExportError(f"{run}: no run config found (looked for {', '.join(str(c) for c in cands)}); "
                      f"pass the YAML the run was trained with: --config configs/X.yaml [--set ...]")


def stage_checkpoint(run_dir: str | os.PathLike, stage: str | None, step: int | None) -> Path:
    """RUN_DIR + stage/step -> the checkpoint path `load_model` takes (a checkpoints or step dir)."""
    from esrt_jax.infer.cloud import STAGE_ORDER, resolve_checkpoint

    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"--run {run}: directory does not exist")
    if stage is None:
        ck, stage, _ = resolve_checkpoint(run)
        if stage is None:
            raise ExportError(f"{run}: cannot tell the stage of {ck}; pass --stage")
    else:
        if stage not in STAGE_ORDER:
            raise ExportError(f"--stage {stage!r}: unknown stage; stages are {list(STAGE_ORDER[::-1])}")
        ck = run / stage / "checkpoints"
        if not ck.is_dir():
            raise ExportError(f"{run}: stage {stage} has no checkpoints ({ck} does not exist)")
    if step is not None:
        d = ck / str(step)
        if not d.is_dir():
            have = sorted(int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit())
            raise ExportError(f"{ck}: no checkpoint at step {step} (steps present: {have})")
        return d
    return ck


# ----------------------------------------------------------------------------- helpers

def _local_dir(spec: Any) -> Path | None:
    if not spec or not isinstance(spec, str):
        return None
    p = Path(spec).expanduser()
    return p.absolute() if (p / "config.json").is_file() else None


def _trainable_paths(bundle) -> list[str]:
    from esrt_jax.train.bundle import flat_paths

    return list(flat_paths(bundle.trainable))


def _tag_mode(tokenizer) -> str:
    """'added' when the language tags are single tokens of the tokenizer, else 'text'."""
    vocab = tokenizer.get_vocab()
    return "added" if "<|eng|>" in vocab and "<|deu|>" in vocab else "text"


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def _gen_settings(run_cfg) -> dict:
    m = run_cfg.model
    d = {**(m.get("decode", {}) or {}), **(m.get("infer", {}) or {})}
    from esrt_jax.infer.generate import GenerateConfig

    from esrt_jax.train.speech import max_answer_tokens

    # the same defaults as inference (esrt_jax.infer.cloud.translator_for)
    base = GenerateConfig(eos_ids=(0,), max_new_tokens=max_answer_tokens(run_cfg))
    return {k: d[k] if d.get(k) is not None else getattr(base, k)
            for k in ("max_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")}


def _fix_generation_config(llm_dir: Path, task_tok, gen: dict, keep_source: bool) -> None:
    """generation_config.json with the run's token ids and decoding settings, so that
    `model.generate(inputs_embeds=...)` decodes like our Translator."""
    f = llm_dir / "generation_config.json"
    g = json.loads(f.read_text()) if f.is_file() else {}
    if not keep_source or "eos_token_id" not in g:
        g["eos_token_id"] = task_tok.eos_id
    else:
        eos = g["eos_token_id"] if isinstance(g["eos_token_id"], list) else [g["eos_token_id"]]
        if task_tok.eos_id not in eos:
            g["eos_token_id"] = [task_tok.eos_id, *eos]
    g["pad_token_id"] = task_tok.pad_id
    if task_tok.bos_id is not None:
        g["bos_token_id"] = task_tok.bos_id
    g.update(do_sample=False, num_beams=gen["num_beams"], max_new_tokens=gen["max_new_tokens"],
             no_repeat_ngram_size=gen["no_repeat_ngram_size"], length_penalty=gen["length_penalty"],
             min_new_tokens=gen["min_new_tokens"])
    if gen["num_beams"] > 1:
        g["early_stopping"] = True
    _write_json(f, g)


# ----------------------------------------------------------------------------- export

@dataclasses.dataclass
class ExportResult:
    out: Path
    stage: str
    step: int
    llm_format: str            # "merged" | "peft"
    encoder_format: str        # "weights" | "pointer"
    files: dict


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), stage: str | None = None, step: int | None = None,
               peft: bool = False, dtype: str = "float32", eval_summary: str | os.PathLike | None = None,
               max_shard_bytes: int = 2 * 1024**3) -> ExportResult:
    """Write OUT/{llm,adapter,encoder}/, OUT/esrt_config.json and OUT/README.md (module docstring)."""
    import jax.numpy as jnp

    from esrt_jax.config import ConfigError, to_dict
    from esrt_jax.convert.llm import export_hf
    from esrt_jax.convert.llm_srt import save_llm_srt_adapter
    from esrt_jax.data.tasks import TaskTokenizer
    from esrt_jax.infer.cloud import load_model
    from esrt_jax.models.qformer import flat_params
    from esrt_jax.models.whisper import save_whisper_encoder
    from esrt_jax.train.bundle import import_object
    from esrt_jax.train.config import load_run_config
    from esrt_jax.train.run import DEFAULT_MODEL_BUILDER

    run = Path(run_dir)
    ckpt = stage_checkpoint(run, stage, step)
    cfg_path = find_run_config(run, config, ckpt.parent.name if ckpt.name == "checkpoints" else ckpt.parent.parent.name)
    try:
        full_cfg = load_run_config(cfg_path, overrides)
        loaded = load_model(cfg_path, ckpt, overrides)
    except ConfigError as e:
        raise ExportError(f"{cfg_path}: {e}") from None
    if loaded.step is None:
        raise ExportError(f"{ckpt}: no trained params were restored")
    cfg, model, tok = loaded.run_config, loaded.model, loaded.tokenizer
    scfg = model.config
    builder = import_object(cfg.model.get("builder", DEFAULT_MODEL_BUILDER), "model.builder")
    trained = _trainable_paths(builder(cfg, abstract=True))
    task_tok = TaskTokenizer(tok, add_bos=cfg.data.get("add_bos"))
    gen = _gen_settings(cfg)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / ESRT_CONFIG).is_file():
            raise ExportError(f"--out {out}: exists, is not empty and is not a previous export; "
                              f"choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = jnp.dtype(dtype)
    files: dict[str, Any] = {}

    # -- LLM -----------------------------------------------------------------------------------
    llm_src = _local_dir(cfg.model.get("llm"))
    llm_trained = any(p.startswith("llm/") and not p.endswith(("lora_a", "lora_b")) for p in trained)
    llm_dir = out / "llm"
    if llm_dir.exists():
        import shutil

        shutil.rmtree(llm_dir)
    lora_cfg = None
    if not peft:
        export_hf(model.llm, llm_dir, source_dir=llm_src, tokenizer=tok, dtype=np_dtype, merge_lora=True,
                  max_shard_bytes=max_shard_bytes)
        _fix_generation_config(llm_dir, task_tok, gen, keep_source=llm_src is not None)
        llm_info = {"format": "merged", "path": "llm", "lora_merged": model.llm.lora is not None}
        files["llm"] = sorted(p.name for p in llm_dir.iterdir())
    else:
        from esrt_jax.convert.peft import export_peft_adapter

        if model.llm.lora is None:
            raise ExportError(f"--peft: the run in {run} was trained without LoRA (lora.enabled is false); "
                              f"export with --merge-lora")
        vocab_same = llm_src is not None and json.loads((llm_src / "config.json").read_text()).get(
            "vocab_size") == scfg.llm.vocab_size
        if llm_src is not None and not llm_trained and vocab_same:
            _write_json(llm_dir / POINTER, {"base_model": str(llm_src), "reason":
                        "the LLM base weights were frozen during training: identical to this directory"})
            base_ref, base_info = llm_src, {"format": "pointer", "path": str(llm_src)}
        else:
            export_hf(model.llm, llm_dir, source_dir=llm_src, tokenizer=tok, dtype=np_dtype, merge_lora=False,
                      max_shard_bytes=max_shard_bytes)
            _fix_generation_config(llm_dir, task_tok, gen, keep_source=llm_src is not None)
            base_ref, base_info = llm_dir.absolute(), {"format": "weights", "path": "llm",
                                                       "trained": llm_trained}
        adapter_dir = llm_dir / "adapter"
        export_peft_adapter(model.llm, adapter_dir, base_model_name_or_path=str(base_ref))
        tok.save_pretrained(str(adapter_dir))
        lora_cfg = model.llm.lora
        llm_info = {"format": "peft", "path": "llm", "base": base_info, "adapter": "llm/adapter",
                    "lora": {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "dropout": lora_cfg.dropout,
                             "targets": list(lora_cfg.targets)}}
        files["llm"] = sorted(p.name for p in llm_dir.iterdir())
        files["llm/adapter"] = sorted(p.name for p in adapter_dir.iterdir())
    llm_info.update(model_type=scfg.llm.to_hf_config().get("model_type"), hidden_size=scfg.llm.hidden_size,
                    vocab_size=scfg.llm.vocab_size, base=llm_info.get("base", str(llm_src) if llm_src else None),
                    base_weights_trained=llm_trained, dtype=np_dtype.name)

    # -- adapter -------------------------------------------------------------------------------
    from safetensors.numpy import save_file

    ad_dir = out / "adapter"
    ad_dir.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(v) for k, v in flat_params(model.adapter).items()}
    save_file(flat, str(ad_dir / "model.safetensors"), metadata={"format": "esrt-jax-adapter",
                                                                 "layout": "kernels (in, out)"})
    _write_json(ad_dir / "config.json", {**to_dict(scfg.adapter),
                                         "hf_qformer_config": scfg.adapter.to_hf_config()})
    save_llm_srt_adapter(model.adapter, ad_dir / "llm_srt_adapter.safetensors")
    if importlib.util.find_spec("torch") is not None:
        save_llm_srt_adapter(model.adapter, ad_dir / "llm_srt_adapter.pt")
    files["adapter"] = sorted(p.name for p in ad_dir.iterdir())

    # -- encoder -------------------------------------------------------------------------------
    enc_src = _local_dir(cfg.model.get("whisper"))
    enc_trained = any(p.startswith("encoder/") for p in trained)
    enc_dir = out / "encoder"
    if enc_dir.exists():
        import shutil

        shutil.rmtree(enc_dir)
    if enc_src is not None and not enc_trained:
        _write_json(enc_dir / POINTER, {"base_model": str(enc_src), "reason":
                    "the Whisper encoder is frozen: identical to the encoder of this directory"})
        enc_info = {"format": "pointer", "path": str(enc_src)}
    else:
        save_whisper_encoder(model.encoder, scfg.encoder, enc_dir, dtype=np.float32,
                             max_shard_bytes=max_shard_bytes)
        enc_info = {"format": "weights", "path": "encoder", "trained": enc_trained}
    enc_info.update(hf_config=scfg.encoder.to_hf_config(), num_mel_bins=scfg.encoder.num_mel_bins,
                    d_model=scfg.encoder.d_model, frames=2 * scfg.encoder.max_source_positions)
    files["encoder"] = sorted(p.name for p in enc_dir.iterdir())

    # -- esrt_config.json + README -------------------------------------------------------------
    from esrt_jax import languages as L

    langs = list(cfg.data.get("languages") or L.ESRT_LANGS)
    a = scfg.adapter
    ec = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run_dir": str(run.absolute()), "config": str(Path(cfg_path).absolute()),
                   "overrides": list(overrides), "stage": loaded.stage, "step": int(loaded.step)},
        "model": {
            "split": scfg.split, "num_queries": a.num_queries, "pool_k": a.pool_k,
            "num_speech_tokens": a.num_output_tokens, "qformer_hidden": a.hidden_size,
            "encoder_dim": scfg.encoder.d_model, "llm_dim": a.llm_dim,
            "projector": ("linear" if a.projector_mid is None else f"linear1({a.projector_mid})-relu-linear2")
                         + "-layernorm", "llm_dtype": scfg.llm_dtype,
        },
        "encoder": enc_info, "adapter": {"path": "adapter", "config": to_dict(a),
                                         "files": {"ours": "adapter/model.safetensors",
                                                   "llm_srt": "adapter/llm_srt_adapter.safetensors"}},
        "llm": llm_info,
        "prompt": {
            "layout": "[speech embeddings][bos?][prompt][answer][eos]; decoding: [pad][speech][bos?][prompt]",
            "speech_scaled": False, "add_bos": task_tok.add_bos, "bos_token_id": task_tok.bos_id,
            "eos_token_id": task_tok.eos_id, "pad_token_id": task_tok.pad_id,
            "tasks": {"asr": {"prompt": "<|src|>", "target": "transcription"},
                      "smt": {"prompt": "transcription<|src|><|tgt|>", "target": "translation"},
                      "srt": {"prompt": "<|src|><|tgt|>",
                              "target": "transcription<|src|><|tgt|>translation"}},
            "srt_split_marker": "<|src|><|tgt|>",
        },
        "tokenizer": {"path": "llm" if not peft else "llm/adapter", "language_tags": _tag_mode(tok),
                      "source": cfg.model.get("tokenizer") or cfg.model.get("llm"), "size": len(tok)},
        "languages": langs,
        "decode": gen,
        "run_config": to_dict(full_cfg),
    }
    _write_json(out / ESRT_CONFIG, ec)
    summary = _find_eval_summary(run, eval_summary)
    (out / "README.md").write_text(model_card(ec, cfg, _dev_metrics(run / loaded.stage), summary),
                                   encoding="utf-8")
    files["top"] = [ESRT_CONFIG, "README.md"]
    return ExportResult(out, loaded.stage, int(loaded.step), llm_info["format"], enc_info["format"], files)


def _dev_metrics(stage_dir: Path) -> dict:
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


def _find_eval_summary(run: Path, explicit: str | os.PathLike | None) -> dict | None:
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
    from esrt_jax import languages as L

    m, llm, enc = ec["model"], ec["llm"], ec["encoder"]
    src = ec["source"]
    tc = cfg.train
    names = ", ".join(f"{c} ({L.get(c).name})" for c in ec["languages"])
    base_llm = llm.get("base") if isinstance(llm.get("base"), str) else (cfg.model.get("llm") or "tiny random "
                                                                         f"{llm['model_type']} (from the config)")
    base_enc = enc["path"] if enc["format"] == "pointer" else (cfg.model.get("whisper") or
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


# ----------------------------------------------------------------------------- import

def read_export(out: str | os.PathLike) -> dict:
    out = Path(out)
    f = out / ESRT_CONFIG
    if not f.is_file():
        raise ExportError(f"--import {out}: no {ESRT_CONFIG} (not an esrt-jax export directory)")
    try:
        ec = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{f}: not valid JSON ({e})") from None
    if ec.get("format") != FORMAT:
        raise ExportError(f"{f}: format {ec.get('format')!r} is not {FORMAT!r}")
    if ec.get("version") != VERSION:
        raise ExportError(f"{f}: version {ec.get('version')!r} is not supported (this code reads {VERSION})")
    for key in ("run_config", "llm", "encoder", "adapter", "source"):
        if key not in ec:
            raise ExportError(f"{f}: missing key {key!r}")
    return ec


def import_config(out: str | os.PathLike, new_run_dir: str | os.PathLike) -> dict:
    """The run config of an export with the model paths pointing into OUT (a plain dict)."""
    out = Path(out).absolute()
    ec = read_export(out)
    cfg = copy.deepcopy(ec["run_config"])
    m = cfg.setdefault("model", {})
    enc = ec["encoder"]
    m["whisper"] = str(out / "encoder") if enc["format"] == "weights" else enc["path"]
    m.pop("whisper_config", None)
    llm = ec["llm"]
    if llm["format"] == "merged":
        m["llm"], m["tokenizer"] = str(out / "llm"), str(out / "llm")
    else:
        b = llm["base"]
        m["llm"] = str(out / "llm") if b["format"] == "weights" else b["path"]
        m["tokenizer"] = str(out / "llm" / "adapter")
        lo = llm["lora"]
        cfg["lora"] = {**cfg.get("lora", {}), "enabled": True, "rank": lo["rank"], "alpha": lo["alpha"],
                       "targets": list(lo["targets"])}
    m.pop("llm_config", None)
    m.pop("tokenizer_vocab", None)
    for st in (cfg.get("stages") or {}).values():  # stage overrides must not point elsewhere
        for k in ("whisper", "whisper_config", "llm", "llm_config", "tokenizer", "tokenizer_vocab"):
            (st.get("model") or {}).pop(k, None)
    cfg["run_dir"] = str(Path(new_run_dir).absolute())
    cfg.pop("stage", None)
    return cfg


def import_export(out: str | os.PathLike, new_run_dir: str | os.PathLike, *, data_state: bool = True,
                  log=print) -> Path:
    """OUT -> NEW_RUN_DIR/config.yaml + NEW_RUN_DIR/<stage>/checkpoints/<step>/ (Orbax). Returns the
    step dir."""
    import jax
    import jax.numpy as jnp
    import yaml
    from flax import nnx

    from esrt_jax.config import ConfigError
    from esrt_jax.convert.peft import load_peft_adapter
    from esrt_jax.models.qformer import load_flat_params
    from esrt_jax.train.bundle import import_object, path_str
    from esrt_jax.train.checkpoint import Checkpointer
    from esrt_jax.train.config import load_run_config
    from esrt_jax.train.optimizer import make_optimizer
    from esrt_jax.train.run import DEFAULT_DATA_BUILDER, DEFAULT_MODEL_BUILDER

    out = Path(out).absolute()
    ec = read_export(out)
    new = Path(new_run_dir).absolute()
    stage, step = ec["source"]["stage"], int(ec["source"]["step"])
    ck_dir = new / stage / "checkpoints"
    if ck_dir.is_dir() and any(p.name.isdigit() for p in ck_dir.iterdir()):
        raise ExportError(f"--run {new}: {ck_dir} already holds checkpoints; import into a new run dir")
    cfg_dict = import_config(out, new)
    new.mkdir(parents=True, exist_ok=True)
    cfg_path = new / "config.yaml"
    cfg_path.write_text("# written by `python -m esrt_jax.export --import " + str(out) + "`\n"
                        + yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        cfg = load_run_config(cfg_path).for_stage(stage)
    except ConfigError as e:
        raise ExportError(f"{cfg_path}: {e}") from None

    builder = import_object(cfg.model.get("builder", DEFAULT_MODEL_BUILDER), "model.builder")
    module = sys.modules[builder.__module__]
    model, _tok = module.build_inference(cfg)
    from safetensors.numpy import load_file

    ad_file = out / "adapter" / "model.safetensors"
    if not ad_file.is_file():
        raise ExportError(f"{out}: missing {ad_file.relative_to(out)}")
    load_flat_params(model.adapter, load_file(str(ad_file)), source=str(ad_file))
    if ec["llm"]["format"] == "peft":
        load_peft_adapter(model.llm, out / "llm" / "adapter")

    # The checkpoint holds exactly the trainable tree train.py builds for this config.
    abstract = builder(cfg, abstract=True).trainable
    flat_state = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(model))}

    def value(path, leaf):
        key = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        var = flat_state.get(key)
        if var is None:
            raise ExportError(f"trainable param {'/'.join(key)} of the config is not in the model")
        arr = jnp.asarray(var.get_value(), leaf.dtype)
        if arr.shape != tuple(leaf.shape):
            raise ExportError(f"trainable param {'/'.join(key)}: shape {arr.shape}, expected {leaf.shape}")
        return arr

    trainable = jax.tree_util.tree_map_with_path(value, abstract)
    opt_state = make_optimizer(cfg.train).init(trainable)
    data_iter = None
    if data_state:
        try:
            data_builder = import_object(cfg.data.get("builder", DEFAULT_DATA_BUILDER), "data.builder")
            it = data_builder(cfg, "train", process_index=0, process_count=1)
            data_iter = it if hasattr(it, "get_state") else None
        except Exception as e:  # noqa: BLE001 - the data may live elsewhere; the params still import
            log(f"note: no data-iterator state saved ({type(e).__name__}: {e}); resume with "
                f"--init-from {ck_dir} instead of rerunning the stage")
    ck = Checkpointer(ck_dir, keep=max(cfg.train.keep, 1), async_save=False)
    try:
        ck.save(step, trainable, opt_state, rng=jax.random.key(cfg.train.seed), data_iter=data_iter,
                meta={"stage": stage, "imported_from": str(out)})
        ck.wait()
    finally:
        ck.close()
    _write_json(new / "IMPORTED_FROM.json", {"export": str(out), "source": ec["source"],
                                             "trainable": sorted(path_str(p) for p, _ in
                                                                 jax.tree_util.tree_flatten_with_path(trainable)[0])})
    return ck_dir / str(step)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m esrt_jax.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir to export (or, with --import, the new run dir)")
    p.add_argument("--out", default=None, help="export directory (created)")
    p.add_argument("--import", dest="import_dir", default=None, metavar="OUT",
                   help="turn an export directory back into an Orbax checkpoint in --run")
    p.add_argument("--stage", default=None, choices=("asr", "smt", "srt"),
                   help="stage to export (default: the last one with a checkpoint)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merge-lora", action="store_true", help="fold LoRA into the LLM weights (default)")
    g.add_argument("--peft", action="store_true", help="write the base LLM + a PEFT LoRA adapter")
    p.add_argument("--config", default=None, help="the run's YAML (default: RUN_DIR/config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides the run was trained with (repeatable)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="storage dtype of the exported LLM weights")
    p.add_argument("--eval-summary", default=None, help="eval summary.json for the model card "
                   "(default: the newest summary.json under the run dir)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    p.add_argument("--no-data-state", action="store_true",
                   help="import: do not open the training data to store an iterator state")
    args = p.parse_args(argv)
    if args.import_dir is None and args.out is None:
        p.error("give --out OUT (export) or --import OUT (import)")
    if args.import_dir is not None and (args.out or args.peft or args.merge_lora or args.step or args.stage):
        p.error("--import takes only --run (the new run dir)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from esrt_jax.config import ConfigError
    from esrt_jax.convert.hf_io import CheckpointError

    try:
        if args.import_dir is not None:
            step_dir = import_export(args.import_dir, args.run, data_state=not args.no_data_state)
            run = Path(args.run).absolute()
            print(f"imported {args.import_dir} -> {step_dir}\n"
                  f"  config: {run / 'config.yaml'}\n"
                  f"  infer:  python -m esrt_jax.infer --config {run / 'config.yaml'} --checkpoint {run} ...\n"
                  f"  train:  python train.py --config {run / 'config.yaml'} --stage STAGE "
                  f"--init-from {step_dir.parent} --run-dir NEXT_RUN")
            return 0
        res = export_run(args.run, args.out, config=args.config, overrides=args.overrides, stage=args.stage,
                         step=args.step, peft=args.peft, dtype=args.dtype, eval_summary=args.eval_summary,
                         max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (ExportError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported stage {res.stage} step {res.step} to {res.out} (llm: {res.llm_format}, "
          f"encoder: {res.encoder_format})")
    for k, v in res.files.items():
        print(f"  {k}/: {', '.join(v)}" if k != "top" else f"  {', '.join(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
