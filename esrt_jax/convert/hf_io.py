"""Reading and writing Hugging Face checkpoint directories (safetensors, sharded with index).

Everything is local: a path that is not a directory (e.g. a hub id) is an error explaining how
to fetch the files elsewhere. Tensors are read lazily one at a time so that loading never
needs the whole checkpoint twice in host memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from esrt_jax.config import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


__all__ = ["CheckpointError", "INDEX", "SINGLE", "iter_tensors", "read_config", "resolve_local_dir",
           "save_sharded", "weight_files"]


def resolve_local_dir(path_or_id: str | os.PathLike) -> Path:
    """Return the local directory; a non-existent path (e.g. a hub id) gets a how-to error."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a Hugging Face model directory "
                              f"(config.json + *.safetensors)")
    raise CheckpointError(
        f"{path_or_id!s} is not a local directory. esrt-jax never downloads weights at run time. "
        f"On a machine with internet access run (huggingface_hub's CLI)\n"
        f"  hf download {path_or_id} --local-dir /path/to/{Path(str(path_or_id)).name}\n"
        f"(or `git clone https://huggingface.co/{path_or_id}`), copy the directory here and "
        f"point the config at that path.")


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a local HF directory as a dict."""
    d = resolve_local_dir(model_dir)
    f = d / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{d} has no config.json")
    return json.loads(f.read_text())


def weight_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Map tensor name -> safetensors file, for single-file or index-sharded checkpoints."""
    d = resolve_local_dir(model_dir)
    index = d / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        out = {}
        for name, fname in weight_map.items():
            f = d / fname
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {fname} for {name}, but {f} is missing")
            out[name] = f
        return out
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} holds no *.safetensors weights (nor {INDEX}); "
                              f"convert .bin checkpoints with transformers' save_pretrained first")
    out = {}
    for f in files:
        with safe_open(f, framework="numpy") as sf:
            for name in sf.keys():
                out[name] = f
    return out


def iter_tensors(model_dir: str | os.PathLike, names: list[str] | None = None
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one at a time, opening each shard once; bf16 arrives as ml_dtypes.bfloat16."""
    files = weight_files(model_dir)
    wanted = list(files) if names is None else names
    missing = [n for n in wanted if n not in files]
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor(s) {missing[:10]}")
    by_file: dict[Path, list[str]] = {}
    for n in wanted:
        by_file.setdefault(files[n], []).append(n)
    for f, ns in by_file.items():
        with safe_open(f, framework="numpy") as sf:
            for n in ns:
                yield n, sf.get_tensor(n)


def save_sharded(tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                 out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
                 metadata: dict | None = None) -> list[Path]:
    """Write tensors as `model.safetensors`, or as shards + index when over `max_shard_bytes`.

    Accepts a mapping or an iterator of (name, array) so that callers can stream.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    tmp_files: list[Path] = []

    def flush():
        nonlocal size
        if shards[-1]:
            f = out / f".shard-{len(tmp_files):05d}.tmp"
            save_file(shards[-1], str(f), metadata={"format": "pt", **(metadata or {})})
            tmp_files.append(f)
            shards.append({})
            size = 0

    names_per_shard: list[list[str]] = []
    total = 0
    for name, arr in items:
        arr = np.ascontiguousarray(arr)
        if size and size + arr.nbytes > max_shard_bytes:
            names_per_shard.append(list(shards[-1]))
            flush()
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if shards[-1]:
        names_per_shard.append(list(shards[-1]))
        flush()
    for stale in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(tmp_files) == 1:
        final = [out / SINGLE]
        tmp_files[0].rename(final[0])
        return final
    n = len(tmp_files)
    final = [out / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for tmp, dst, names in zip(tmp_files, final, names_per_shard):
        tmp.rename(dst)
        weight_map.update({k: dst.name for k in names})
    (out / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return final
