"""Whisper encoder checkpoints: local Hugging Face directory <-> our `WhisperEncoder`.

`load_whisper_encoder(dir)` reads a local HF Whisper directory (`WhisperModel`,
`WhisperForConditionalGeneration` or a bare `WhisperEncoder`; single file or sharded with index)
one tensor at a time; `write_whisper_encoder_checkpoint` puts our encoder into a copy of a full
Whisper checkpoint (decoder kept) and `save_whisper_encoder` writes a stand-alone `WhisperEncoder`
directory. The name mapping itself is pure and lives with the model (`esrt_jax.models.whisper`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from esrt_jax.config import CheckpointError, ConfigError
from esrt_jax.convert import hf_io
from esrt_jax.models import whisper as W


def load_whisper_encoder(model_dir: str | os.PathLike, **runtime: Any) -> W.WhisperEncoder:
    """A local HF Whisper directory (config.json + safetensors, single or sharded with index)
    -> `WhisperEncoder` (config from config.json; `runtime` sets dtype, param_dtype, remat,
    scan_layers, attention). Decoder tensors are ignored; tensors are read one at a time and
    cast to `param_dtype`. A hub id gets an error explaining how to fetch the files elsewhere."""
    d = hf_io.resolve_local_dir(model_dir)
    try:
        cfg = W.WhisperEncoderConfig.from_hf_config(hf_io.read_config(d), **runtime)
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    files = hf_io.weight_files(d)
    prefix = W.detect_prefix(files, where=str(d))
    enc = W.encoder_names(files, prefix)
    params = W.params_from_hf(hf_io.iter_tensors(d, enc), cfg, prefix=prefix, names=files,
                            where=str(d))
    return W.encoder_from_params(cfg, params)


def _check_same_encoder(cfg: W.WhisperEncoderConfig, hf_config: Mapping, where: str) -> None:
    diff = {k: (getattr(cfg, k), hf_config.get(k)) for k in W.HF_ENCODER_KEYS
            if hf_config.get(k) != getattr(cfg, k)}
    if diff:
        raise CheckpointError(f"{where}: encoder config differs from ours (ours, theirs): {diff}")


def write_whisper_encoder_checkpoint(model_or_params: W.WhisperEncoder | Any,
                                     cfg: W.WhisperEncoderConfig, src_dir: str | os.PathLike,
                                     out_dir: str | os.PathLike, *,
                                     max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Copy the full Whisper checkpoint `src_dir` to `out_dir` with our encoder tensors in place
    of its encoder (decoder, configs, tokenizer files kept; each tensor keeps its source dtype).
    `WhisperModel` / `WhisperForConditionalGeneration.from_pretrained(out_dir)` loads it."""
    src = hf_io.resolve_local_dir(src_dir)
    out = Path(out_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: write into a new directory, not over the source checkpoint")
    _check_same_encoder(cfg, hf_io.read_config(src), str(src / "config.json"))
    files = hf_io.weight_files(src)
    prefix = W.detect_prefix(files, where=str(src))
    ours = W.export_whisper_encoder(model_or_params, cfg, prefix=prefix, dtype=None)
    extra = sorted(set(W.encoder_names(files, prefix)) - set(ours))
    if extra:
        raise CheckpointError(f"{src}: unexpected Whisper encoder tensor(s) {extra[:10]}")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (f.name.endswith(".safetensors") or f.name == hf_io.INDEX):
            shutil.copy2(f, out / f.name)

    def stream():
        for name, arr in hf_io.iter_tensors(src):
            yield name, (ours[name].astype(arr.dtype) if name in ours else arr)

    return hf_io.save_sharded(stream(), out, max_shard_bytes=max_shard_bytes)


def save_whisper_encoder(model_or_params: W.WhisperEncoder | Any, cfg: W.WhisperEncoderConfig,
                         out_dir: str | os.PathLike, *, dtype: Any = np.float32,
                         max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """A stand-alone HF directory (config.json + safetensors, bare names) that transformers'
    `WhisperEncoder.from_pretrained(out_dir)` (`transformers.models.whisper.modeling_whisper`) loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = {**cfg.to_hf_config(), "architectures": ["WhisperEncoder"]}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return hf_io.save_sharded(W.export_whisper_encoder(model_or_params, cfg, prefix="", dtype=dtype),
                              out, max_shard_bytes=max_shard_bytes)
