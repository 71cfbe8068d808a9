"""Q-Former checkpoints: a local HF `Blip2QFormerModel` directory <-> our `QFormer`.

The name mapping (`hf_to_ours` / `ours_to_hf` tables, `qformer_from_hf`, `qformer_to_hf`) is pure
and lives with the model in `esrt_jax.models.qformer`; this module only reads and writes directories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from esrt_jax.convert import hf_io
from esrt_jax.models import qformer as Q


def load_hf_qformer(qformer: Q.QFormer, model_dir_or_tensors: Any, *, prefix: str | None = None) -> None:
    """Load a local HF `Blip2QFormerModel` directory (or a tensor mapping) into `qformer`.

    `prefix` defaults to '' or, for a full BLIP-2 / InstructBLIP checkpoint, 'qformer.'.
    """
    if isinstance(model_dir_or_tensors, Mapping):
        tensors, source = model_dir_or_tensors, "HF Blip2QFormerModel tensors"
    else:
        names = list(hf_io.weight_files(model_dir_or_tensors))
        tensors, source = dict(hf_io.iter_tensors(model_dir_or_tensors, names)), str(model_dir_or_tensors)
    if prefix is None:
        prefix = "qformer." if any(k.startswith("qformer.") for k in tensors) else ""
    flat = Q.qformer_from_hf(qformer.config, tensors, prefix=prefix, source=source)
    Q.load_flat_params(qformer, flat, source=source)


def save_hf_qformer(qformer: Q.QFormer, out_dir: Any) -> None:
    """Write `qformer` as a HF `Blip2QFormerModel` directory (config.json + model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = Q.qformer_to_hf(qformer.config, Q.flat_params(qformer))
    hf_io.save_sharded(tensors, out)
    cfg = qformer.config.to_hf_config()
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
