"""Task formats (docs/design.md) and their tokenisation: the TEXT part of the LLM input.

| task | prompt                         | target                                 |
|------|--------------------------------|----------------------------------------|
| asr  | `<|src|>`                      | transcription                          |
| smt  | `transcription<|src|><|tgt|>`  | translation                            |
| srt  | `<|src|><|tgt|>`               | `transcription<|src|><|tgt|>translation` |

The model puts Q' speech embeddings in front of these tokens; nothing here knows about speech.
Per example the text is `[bos?][prompt][answer][eos]`:

- `bos`: LLM-SRT encodes the prompt with `tokenizer.encode(prompt)`, i.e. with the tokenizer's
  default special tokens, so Gemma/Llama get their BOS *after the speech* and Qwen (no BOS) gets
  none. `add_bos=None` reproduces that: BOS iff the tokenizer itself prepends one. Prompt and
  answer are then encoded with `add_special_tokens=False` so no second BOS appears.
- Prompt and answer are tokenised separately (the reference tokenises `prompt + answer` in one
  go and masks `len(encode(prompt))` tokens). Separate encoding makes the labels exactly the
  tokens generation must produce after the prompt; the two agree whenever no BPE merge crosses
  the prompt/answer boundary, which holds for these prompts (they end in `|>`).
- `eos`: `tokenizer.eos_token_id` (overridable), appended to the answer; it is a label.

Training batch layout (right padding, `collate`), all numpy, B rows, T a bucket length:

    tokens          (B, T) int32  [bos?][prompt][answer][eos][pad ...]
    loss_mask       (B, T) int32  1 where tokens[b, t] is an answer or eos token, i.e. a token the
                                  model must PREDICT; 0 on bos/prompt/pad
    attention_mask  (B, T) int32  1 on real tokens (bos, prompt, answer, eos)
    prompt_len      (B,)   int32  number of bos+prompt tokens (answer starts at this index)
    length          (B,)   int32  number of real tokens

Next-token loss with Q' speech positions in front: the LLM input is
`concat(speech (B, Q', D), embed(tokens))`; the logit that predicts `tokens[:, t]` is the output
at LLM position `Q' + t - 1`. So take `logits[:, Q'-1 : Q'-1+T]` as the predictions of
`tokens[:, 0:T]` and weight the cross-entropy with `loss_mask` (t = 0 is never a label, so
the last speech position is never scored in practice). Loss = sum(CE * loss_mask) /
sum(loss_mask).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from esrt_jax import languages

from esrt_jax import languages

__all__ = [
    "TASKS",
    "TASK_IDS",
    "TaskError",
    "TextExample",
    "TaskTokenizer",
    "format_task",
    "marker",
    "tokenizer_adds_bos",
    "bucket_for",
    "collate",
    "split_srt_output",
]

TASKS = ("asr", "smt", "srt")
TASK_IDS = {t: i for i, t in enumerate(TASKS)}


class TaskError(ValueError):
    """An example that cannot be formatted: unknown task or language, empty text."""


def _tag(code: str) -> str:
    try:
        return languages.tag(code)
    except languages.LanguageError as e:
        raise TaskError(str(e)) from None


def marker(src: str, tgt: str) -> str:
    """`<|src|><|tgt|>`: the SRT separator and the SMT/SRT prompt tail."""
    return _tag(src) + _tag(tgt)


def format_task(task: str, src: str, tgt: str, transcription: str, translation: str = ""
                ) -> tuple[str, str]:
    """(prompt, target) strings of `task` per the table above.

    Raises TaskError for an unknown task/language or text the task needs that is empty.
    """
    if task not in TASK_IDS:
        raise TaskError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    transcription = transcription.strip()
    translation = translation.strip()
    if not transcription:
        raise TaskError("empty transcription")
    if task == "asr":
        return _tag(src), transcription
    if not translation:
        raise TaskError(f"empty translation (needed by {task})")
    m = marker(src, tgt)
    if task == "smt":
        return transcription + m, translation
    return m, transcription + m + translation


def tokenizer_adds_bos(tokenizer) -> bool:
    """True if `tokenizer.encode(text)` starts with the tokenizer's BOS (Gemma, Llama)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return len(ids) > 0 and ids[0] == bos


@dataclasses.dataclass(frozen=True)
class TextExample:
    """Token ids of one example: `prompt` (with BOS if any) and `answer` (ending in EOS)."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    task: str

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


class TaskTokenizer:
    """Formats and tokenises task examples with a Hugging Face tokenizer.

    add_bos: None -> BOS iff the tokenizer adds one by itself (`tokenizer_adds_bos`).
    eos_id / pad_id: default to the tokenizer's eos / pad (pad falls back to eos, then 0).
    """

    def __init__(self, tokenizer, add_bos: bool | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.add_bos = tokenizer_adds_bos(tokenizer) if add_bos is None else bool(add_bos)
        self.bos_id = tokenizer.bos_token_id
        if self.add_bos and self.bos_id is None:
            raise TaskError("add_bos=True but the tokenizer has no bos_token")
        self.eos_id = tokenizer.eos_token_id if eos_id is None else int(eos_id)
        if self.eos_id is None:
            raise TaskError("the tokenizer has no eos_token; pass eos_id")
        if pad_id is None:
            pad_id = tokenizer.pad_token_id
        self.pad_id = int(pad_id if pad_id is not None else self.eos_id)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, task: str, src: str, tgt: str, transcription: str = "") -> list[int]:
        """Prompt ids for inference: `[bos?] prompt` (SMT needs the transcription)."""
        if task == "smt":
            prompt, _ = format_task(task, src, tgt, transcription, "x")
        elif task == "asr":
            prompt = _tag(src)
        elif task == "srt":
            prompt = marker(src, tgt)
        else:
            raise TaskError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        return ([self.bos_id] if self.add_bos else []) + self._encode(prompt)

    def encode(self, task: str, src: str, tgt: str, transcription: str, translation: str = ""
               ) -> TextExample:
        prompt, target = format_task(task, src, tgt, transcription, translation)
        p = ([self.bos_id] if self.add_bos else []) + self._encode(prompt)
        a = self._encode(target) + [self.eos_id]
        return TextExample(prompt=tuple(p), answer=tuple(a), task=task)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length; ValueError if none is."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest text bucket {max(buckets)}")


def collate(examples: Sequence[TextExample | None], buckets: Sequence[int], pad_id: int
            ) -> dict[str, np.ndarray]:
    """Right-padded text arrays (see the module docstring) at the smallest bucket that fits.

    A `None` example is an empty row (all masks 0, tokens pad) so batch shapes stay static.
    """
    longest = max((len(e) for e in examples if e is not None), default=1)
    T = bucket_for(longest, buckets)
    B = len(examples)
    tokens = np.full((B, T), pad_id, np.int32)
    loss_mask = np.zeros((B, T), np.int32)
    attn = np.zeros((B, T), np.int32)
    prompt_len = np.zeros((B,), np.int32)
    length = np.zeros((B,), np.int32)
    for b, e in enumerate(examples):
        if e is None:
            continue
        p, n = len(e.prompt), len(e)
        tokens[b, :p] = e.prompt
        tokens[b, p:n] = e.answer
        loss_mask[b, p:n] = 1
        attn[b, :n] = 1
        prompt_len[b], length[b] = p, n
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attn,
            "prompt_len": prompt_len, "length": length}


def split_srt_output(text: str, src: str, tgt: str) -> tuple[str, str]:
    """Split a decoded SRT output into (transcription, translation), both stripped.

    As LLM-SRT's evaluation (`eval/test_metric_n.py`) does it: split at `<|src|><|tgt|>`; if
    that gives exactly two parts they are the answer. Otherwise (marker absent, or present more
    than once) the transcription is the whole text and the translation is what follows the last
    `|>` (the whole text when there is no `|>` at all).
    """
    m = languages.srt_marker(src.strip().lower(), tgt.strip().lower())
    parts = text.split(m)
    if len(parts) == 2:
        return parts[0].strip(), parts[1].strip()
    return text.strip(), text.split("|>")[-1].strip()
