"""Export: a trained stage checkpoint -> OUT/{llm,adapter,encoder}/, OUT/esrt_config.json and the
model card (the layout is described in `esrt_jax.export`)."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from esrt_jax import languages as L
from esrt_jax.audio import REAL_WINDOW_BUCKET
from esrt_jax.config import ConfigError, to_dict
from esrt_jax.convert.llm import export_hf
from esrt_jax.convert.llm_srt import save_llm_srt_adapter
from esrt_jax.convert.peft import export_peft_adapter
from esrt_jax.convert.whisper import save_whisper_encoder
from esrt_jax.data.tasks import TaskTokenizer, card_table
from esrt_jax.files import os_error_line, rust_os_error, staged_dir
from esrt_jax.export.card import dev_metrics, find_eval_summaries, model_card
from esrt_jax.export.common import (ESRT_CONFIG, FORMAT, POINTER, VERSION, ExportError, find_run_config,
                                    local_dir, stage_checkpoint, write_json)
from esrt_jax.models.qformer import flat_params
from esrt_jax.speech.config import GENERATION_KEYS, SpeechModelConfig, generation_config
from esrt_jax.speech.load import load_model
from esrt_jax.train.bundle import flat_paths
from esrt_jax.train.checkpoint import UnreadableCheckpoint
from esrt_jax.train.config import load_run_config

def _trainable_paths(bundle) -> list[str]:
    return list(flat_paths(bundle.trainable))


def _tag_mode(tokenizer) -> str:
    """'added' when the language tags are single tokens of the tokenizer, else 'text'."""
    vocab = tokenizer.get_vocab()
    return "added" if "<|eng|>" in vocab and "<|deu|>" in vocab else "text"


def _gen_settings(run_cfg, task_tok) -> dict:
    """The decoding settings of inference (`speech.config.generation_config`) as a dict."""
    gen = generation_config(run_cfg, task_tok.eos_id, task_tok.pad_id, inference=True)
    return {k: getattr(gen, k) for k in GENERATION_KEYS}


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
    write_json(f, g)


def _adapter_kind(a) -> dict:
    """esrt_config.json's description of the adapter: a Q-Former, or the window-means MLP (no Q-Former)."""
    if a.window_means:
        return {"adapter": "window_means", "num_windows": a.num_queries, "window_parts": a.window_means,
                "window_mlp": f"gelu(dense({a.window_means} x {a.encoder_hidden_size} -> {a.hidden_size}))"}
    return {"adapter": "qformer", "num_queries": a.num_queries, "qformer_hidden": a.hidden_size}


def _adapter_files(a) -> dict:
    if a.window_means:
        return {"ours": "adapter/model.safetensors", "llm_srt": None,
                "llm_srt_absent": "LLM-SRT's adapter format is its Q-Former module (EncoderProjectorQFormer); "
                                  "this adapter is window means (no Q-Former): only our layout holds it"}
    return {"ours": "adapter/model.safetensors", "llm_srt": "adapter/llm_srt_adapter.safetensors"}


def _window_info(window: str) -> dict:
    """How the encoder's input window is cut (`model.encoder_window`), for esrt_config.json's encoder block."""
    if window == "real":
        return {"window": "real", "window_bucket": REAL_WINDOW_BUCKET,
                "window_note": f"each clip's mel cut to its real length rounded up to {REAL_WINDOW_BUCKET} mel "
                               f"frames (1 s), at most `frames`; not Whisper's 30 s window"}
    return {"window": "padded", "window_note": "Whisper's 30 s window (`frames` mel frames), padding included"}


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
    run = Path(run_dir)
    ckpt = stage_checkpoint(run, stage, step)
    cfg_path = find_run_config(run, config, ckpt.parent.name if ckpt.name == "checkpoints" else ckpt.parent.parent.name)
    try:
        full_cfg = load_run_config(cfg_path, overrides)
        loaded = load_model(cfg_path, ckpt, overrides)
    except ConfigError as e:
        raise ExportError(f"{cfg_path}: {e}") from None
    except UnreadableCheckpoint as e:  # a damaged step (NaN/Inf weights, unreadable files): nothing written
        raise ExportError(str(e)) from None
    if loaded.step is None:
        raise ExportError(f"{ckpt}: no trained params were restored")
    cfg, model, tok = loaded.run_config, loaded.model, loaded.tokenizer
    scfg = model.config
    if scfg.speech_units:
        raise ExportError(f"{cfg_path}: model.interface ctc_chars (the LLM reads CTC character posteriors) has no "
                          "Hugging Face export yet; export a run with model.interface: vectors")
    trained = _trainable_paths(cfg.model_builder()(cfg, abstract=True))
    task_tok = TaskTokenizer(tok, add_bos=cfg.data.get("add_bos"))
    gen = _gen_settings(cfg, task_tok)
    final = Path(out)
    if final.exists() and any(final.iterdir()):
        if not (final / ESRT_CONFIG).is_file():
            raise ExportError(f"--out {final}: exists, is not empty and is not a previous export; "
                              f"choose a new directory")
    try:  # written beside OUT, then swapped in: a failure leaves the previous export (or none)
        with staged_dir(final) as out:
            np_dtype = jnp.dtype(dtype)
            files: dict[str, Any] = {}

            # -- LLM -----------------------------------------------------------------------------------
            m = SpeechModelConfig.of(cfg)
            llm_src = local_dir(m.llm)
            llm_trained = any(p.startswith("llm/") and not p.endswith(("lora_a", "lora_b")) for p in trained)
            llm_dir = out / "llm"
            lora_cfg = None
            if not peft:
                export_hf(model.llm, llm_dir, source_dir=llm_src, tokenizer=tok, dtype=np_dtype, merge_lora=True,
                          max_shard_bytes=max_shard_bytes)
                _fix_generation_config(llm_dir, task_tok, gen, keep_source=llm_src is not None)
                llm_info = {"format": "merged", "path": "llm", "lora_merged": model.llm.lora is not None}
                files["llm"] = sorted(p.name for p in llm_dir.iterdir())
            else:
                if model.llm.lora is None:
                    raise ExportError(f"--peft: the run in {run} was trained without LoRA (lora.enabled is false); "
                                      f"export with --merge-lora")
                vocab_same = llm_src is not None and json.loads((llm_src / "config.json").read_text()).get(
                    "vocab_size") == scfg.llm.vocab_size
                if llm_src is not None and not llm_trained and vocab_same:
                    write_json(llm_dir / POINTER, {"base_model": str(llm_src), "reason":
                                "the LLM base weights were frozen during training: identical to this directory"})
                    base_ref, base_info = llm_src, {"format": "pointer", "path": str(llm_src)}
                else:
                    export_hf(model.llm, llm_dir, source_dir=llm_src, tokenizer=tok, dtype=np_dtype, merge_lora=False,
                              max_shard_bytes=max_shard_bytes)
                    _fix_generation_config(llm_dir, task_tok, gen, keep_source=llm_src is not None)
                    base_ref, base_info = (final / "llm").absolute(), {"format": "weights", "path": "llm",
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
                            vocab_size=scfg.llm.vocab_size,
                            base=llm_info.get("base", str(llm_src) if llm_src else None),
                            base_weights_trained=llm_trained, dtype=np_dtype.name)

            # -- adapter -------------------------------------------------------------------------------
            ad_dir = out / "adapter"
            ad_dir.mkdir(parents=True, exist_ok=True)
            flat = {k: np.ascontiguousarray(v) for k, v in flat_params(model.adapter).items()}
            save_file(flat, str(ad_dir / "model.safetensors"), metadata={"format": "esrt-jax-adapter",
                                                                         "layout": "kernels (in, out)"})
            a = scfg.adapter
            write_json(ad_dir / "config.json", {**to_dict(a), "hf_qformer_config": None if a.window_means
                                                 else a.to_hf_config()})
            if not a.window_means:  # LLM-SRT's format is its Q-Former module
                save_llm_srt_adapter(model.adapter, ad_dir / "llm_srt_adapter.safetensors")
                if importlib.util.find_spec("torch") is not None:
                    save_llm_srt_adapter(model.adapter, ad_dir / "llm_srt_adapter.pt")
            files["adapter"] = sorted(p.name for p in ad_dir.iterdir())

            # -- encoder -------------------------------------------------------------------------------
            enc_src = local_dir(m.whisper)
            enc_trained = any(p.startswith("encoder/") for p in trained)
            enc_dir = out / "encoder"
            if enc_src is not None and not enc_trained:
                write_json(enc_dir / POINTER, {"base_model": str(enc_src), "reason":
                            "the Whisper encoder is frozen: identical to the encoder of this directory"})
                enc_info = {"format": "pointer", "path": str(enc_src)}
            else:
                save_whisper_encoder(model.encoder, scfg.encoder, enc_dir, dtype=np.float32,
                                     max_shard_bytes=max_shard_bytes)
                enc_info = {"format": "weights", "path": "encoder", "trained": enc_trained}
            enc_info.update(hf_config=scfg.encoder.to_hf_config(), num_mel_bins=scfg.encoder.num_mel_bins,
                            d_model=scfg.encoder.d_model, frames=2 * scfg.encoder.max_source_positions,
                            **_window_info(scfg.encoder_window))
            files["encoder"] = sorted(p.name for p in enc_dir.iterdir())

            # -- esrt_config.json + README -------------------------------------------------------------
            langs = list(cfg.data.get("languages") or L.ESRT_LANGS)
            ec = {
                "format": FORMAT, "version": VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": {"run_dir": str(run.absolute()), "config": str(Path(cfg_path).absolute()),
                           "overrides": list(overrides), "stage": loaded.stage, "step": int(loaded.step)},
                "model": {
                    "split": scfg.split, **_adapter_kind(a), "pool_k": a.pool_k,
                    "num_speech_tokens": a.num_output_tokens, "encoder_dim": scfg.encoder.d_model, "llm_dim": a.llm_dim,
                    "projector": ("linear" if a.projector_mid is None else f"linear1({a.projector_mid})-relu-linear2")
                                 + "-layernorm", "llm_dtype": scfg.llm_dtype, "encoder_window": scfg.encoder_window,
                },
                "encoder": enc_info, "adapter": {"path": "adapter", "config": to_dict(a), "files": _adapter_files(a)},
                "llm": llm_info,
                "prompt": {
                    "layout": "[speech embeddings][bos?][prompt][answer][eos]; decoding: [pad][speech][bos?][prompt]",
                    "speech_scaled": False, "add_bos": task_tok.add_bos, "bos_token_id": task_tok.bos_id,
                    "eos_token_id": task_tok.eos_id, "pad_token_id": task_tok.pad_id,
                    "tasks": card_table(),
                    "srt_split_marker": "<|src|><|tgt|>",
                },
                "tokenizer": {"path": "llm" if not peft else "llm/adapter", "language_tags": _tag_mode(tok),
                              "source": m.tokenizer or m.llm, "size": len(tok)},
                "languages": langs,
                "decode": gen,
                "run_config": to_dict(full_cfg),
            }
            write_json(out / ESRT_CONFIG, ec)
            summaries = find_eval_summaries(run, eval_summary)
            card = model_card(ec, cfg, dev_metrics(run / loaded.stage), summaries, out=str(final))
            (out / "README.md").write_text(card, encoding="utf-8")
            files["top"] = [ESRT_CONFIG, "README.md"]
    except SafetensorError as e:  # the Rust writer: "I/O error: No space left on device (os error 28)"
        cause = rust_os_error(e)
        raise ExportError(f"writing the export: {os_error_line(cause, final)}" if cause else
                          f"writing the export to {final}: {str(e).splitlines()[0]}") from None
    return ExportResult(final, loaded.stage, int(loaded.step), llm_info["format"], enc_info["format"], files)
