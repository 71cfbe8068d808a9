"""Tokenizers from local Hugging Face directories, and the `<|xxx|>` language tags.

Two ways to write language tags (config `language_tags`):

- ``"text"`` (LLM-SRT behaviour): tags stay plain text; `<|deu|>` is tokenized into several
  ordinary sub-word tokens. Nothing about the model changes.
- ``"added"``: every tag of the language table becomes one added (non-special) token, so it is
  a single id that decoding keeps (the SRT output is split at `<|src|><|tgt|>`). The rows of the
  new ids in the embedding table (and an untied output head) are set to the mean of the rows of
  the existing tokens; the table grows only when the tokenizer outgrows it (Qwen checkpoints
  carry spare padded rows, which are reused).

    tok = load_tokenizer(model_dir)
    new_ids = add_language_tags(tok, mode="added")          # [] for mode="text"
    model = resize_token_embeddings(model, tok, new_ids)
    check_vocab(tok, model.config.vocab_size, where=model_dir) # clear error on a mismatch
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Iterable, Literal, Sequence

import jax
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from esrt_jax import languages
from esrt_jax.convert.hf_io import resolve_local_dir
from esrt_jax.models.llm import abstract_model
from esrt_jax.sharding import fit_spec, variable_axes

TagMode = Literal["text", "added"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer is missing or does not fit the model it is used with."""


def load_tokenizer(model_dir: str | os.PathLike, **kwargs):
    """`transformers.AutoTokenizer` from a local directory (never the hub)."""
    d = resolve_local_dir(model_dir)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{d} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; name the directory
        raise TokenizerError(f"{d}: cannot load the tokenizer: {type(e).__name__}: {e}") from e


def check_vocab(tokenizer, vocab_size: int, where: str | os.PathLike = "model") -> None:
    """Raise unless every id the tokenizer can produce indexes the embedding table.

    A table larger than the tokenizer is normal (Qwen pads to a multiple of 128/256); a smaller
    one means the tokenizer and checkpoint do not belong together (or tags were added without
    `resize_token_embeddings`).
    """
    n = len(tokenizer)
    special_ids = [i for i in (tokenizer.all_special_ids or []) if i is not None]
    top = max([n - 1, *special_ids])
    if top >= vocab_size:
        raise TokenizerError(
            f"{where}: tokenizer/vocab-size mismatch: the tokenizer has {n} tokens (largest id "
            f"{top}) but the model's embedding table has only {vocab_size} rows; use the tokenizer "
            f"that belongs to this checkpoint, or call resize_token_embeddings after adding tokens")


def language_tags(codes: Iterable[str] | None = None) -> list[str]:
    """`<|xxx|>` strings for `codes` (default: every ESRT language)."""
    codes = list(languages.ESRT_LANGS if codes is None else codes)
    return [languages.tag(c) for c in codes]


def add_language_tags(tokenizer, mode: TagMode = "text", codes: Iterable[str] | None = None
                      ) -> list[int]:
    """Make the language tags single tokens (`mode="added"`) or leave them text (`"text"`).

    Returns the ids of tokens that were newly added (already-known tags are not re-added), in
    order; these rows need `resize_token_embeddings`. Mutates `tokenizer`.
    """
    if mode == "text":
        return []
    if mode != "added":
        raise TokenizerError(f"language_tags: unknown mode {mode!r}; use 'text' or 'added'")
    tags = language_tags(codes)
    vocab = tokenizer.get_vocab()
    new = [t for t in tags if t not in vocab]
    if new:
        # Not special: decoding with skip_special_tokens must keep them (SRT output split).
        tokenizer.add_tokens(new, special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(new)
    for t, i in zip(new, ids):
        if i is None or i == tokenizer.unk_token_id:
            raise TokenizerError(f"adding language tag {t} to the tokenizer failed")
    return list(ids)


def tag_ids(tokenizer, codes: Sequence[str]) -> list[list[int]]:
    """Token ids of each code's tag as the tokenizer writes it (one id when tags were added)."""
    return [tokenizer.encode(languages.tag(c), add_special_tokens=False) for c in codes]


def _resized(arr: np.ndarray, axis: int, vocab: int, new_ids: Sequence[int], mean_rows: int,
             fill_mean: bool) -> np.ndarray:
    """Grow `arr` along `axis` to `vocab` and set the `new_ids` slices to the mean of the first
    `mean_rows` slices (or zeros when `fill_mean` is False, e.g. for LoRA factors)."""
    arr = np.array(np.moveaxis(np.asarray(arr), axis, 0))  # writable copy
    if vocab > arr.shape[0]:
        pad = np.zeros((vocab - arr.shape[0], *arr.shape[1:]), arr.dtype)
        arr = np.concatenate([arr, pad], 0)
    if len(new_ids):
        idx = np.asarray(new_ids)
        if fill_mean:
            arr[idx] = arr[:mean_rows].astype(np.float64).mean(0).astype(arr.dtype)
        else:
            arr[idx] = 0
    return np.moveaxis(arr, 0, axis)


def resize_token_embeddings(model, tokenizer, new_ids: Sequence[int] = (),
                            pad_to_multiple_of: int = 1):
    """Fit a `CausalLM` to `tokenizer` after tokens were added (see `add_language_tags`).

    Every parameter with a `vocab` logical axis (the embedding table, an untied output head) is
    grown to `max(cfg.vocab_size, len(tokenizer))` rounded up to `pad_to_multiple_of`, and the
    rows of `new_ids` are set to the mean of the rows of the tokens that existed before (ids
    `< min(new_ids)`), so a new tag starts as an "average token" rather than noise. Returns a
    new model (`model.config.vocab_size` is the new size); the input model is left unchanged.
    """
    cfg = model.config
    need = max(cfg.vocab_size, len(tokenizer))
    if pad_to_multiple_of > 1:
        need = -(-need // pad_to_multiple_of) * pad_to_multiple_of
    new_ids = sorted(int(i) for i in new_ids)
    if any(i >= need or i < 0 for i in new_ids):
        raise TokenizerError(f"new token ids {new_ids} do not fit a vocab of {need}")
    mean_rows = new_ids[0] if new_ids else 0
    if new_ids and mean_rows == 0:
        raise TokenizerError("cannot initialise new rows from the mean: no existing tokens")

    graphdef, state = nnx.split(model)
    if need != cfg.vocab_size:
        new_cfg = dataclasses.replace(cfg, vocab_size=need)
        graphdef, _ = nnx.split(abstract_model(new_cfg, lora=model.lora, dtype=model.dtype,
                                               param_dtype=model.param_dtype,
                                               scan_layers=model.scan_layers, remat=model.remat))
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        axes = variable_axes(var)
        if not axes or "vocab" not in axes:
            continue
        old = var.get_value()
        arr = _resized(np.asarray(jax.device_get(old)), axes.index("vocab"), need, new_ids,
                       mean_rows, fill_mean=type(var) is nnx.Param)
        sh = getattr(old, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):  # keep mesh placement
            sh = jax.sharding.NamedSharding(sh.mesh, fit_spec(sh.spec, arr.shape, sh.mesh))
            flat[path] = var.replace(jax.device_put(arr, sh))
        else:
            flat[path] = var.replace(jax.numpy.asarray(arr))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[Path]:
    """Copy the tokenizer files of `src_dir` (whatever of them exist) into `dst_dir`."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
             "chat_template.json")
    out = []
    for n in names:
        f = Path(src_dir) / n
        if f.is_file():
            dst = Path(dst_dir) / n
            shutil.copyfile(f, dst)
            out.append(dst)
    return out


def unit_token_ids(tokenizer, units: Sequence[str]) -> tuple[int, ...]:
    """The token id of each one-character unit (the align stage's CTC units), e.g. Gemma's id of
    ' ' or 'ř'. A unit the tokenizer does not write as one token is a `TokenizerError` naming it."""
    ids = []
    for u in units:
        got = tokenizer.encode(u, add_special_tokens=False)
        if len(got) != 1 or got[0] == tokenizer.unk_token_id:
            raise TokenizerError(f"CTC unit {u!r} is not one token of this tokenizer (it writes it as {got}): "
                                 "model.interface ctc_chars needs a token per character")
        ids.append(int(got[0]))
    return tuple(ids)
