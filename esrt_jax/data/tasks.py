"""Tasks (docs/design.md): each one `Task` object in one table, `TASKS`, and their tokenisation.

| task | prompt                         | target                                 |
|------|--------------------------------|----------------------------------------|
| asr  | `<|src|>`                      | transcription                          |
| smt  | `transcription<|src|><|tgt|>`  | translation                            |
| srt  | `<|src|><|tgt|>`               | `transcription<|src|><|tgt|>translation` |

A `Task` is its name and these two templates (placeholders `<|src|>`, `<|tgt|>`: the language tags;
`transcription`, `translation`: the record's texts). Everything else the code needs is read off
them, so a new task is one `register(Task(...))` line here:

- prompt / target strings (`Task.format`, `Task.format_prompt`), hence the loss mask: the target's
  tokens and EOS are the labels, the bos/prompt tokens are not (`TaskTokenizer.encode`, `collate`);
- which records it trains on (`Task.translates`: a src->tgt direction with tgt != src, else one item
  per utterance and language) and which texts must be non-empty (`Task.needs`);
- how a decoded output is parsed into the two text fields (`Task.parse`: a one-field target is the
  whole text; a two-field target is split at its separator, with LLM-SRT's fallbacks);
- what is scored (`Task.outputs`: WER/CER on a produced transcription, BLEU/chrF on a produced
  translation) and what is given (`Task.given`: a prompt holding the reference transcription is
  never cut into segments, and its transcription is not scored);
- its model-card entry (`Task.card`: the templates, as an export's `esrt_config.json` lists them).

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
import re
from typing import Sequence

import numpy as np

from esrt_jax import languages

__all__ = [
    "TEXT_FIELDS",
    "Task",
    "TASKS",
    "DEFAULT_TASK",
    "register",
    "card_table",
    "get_task",
    "task_id",
    "task_name",
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

TEXT_FIELDS = ("transcription", "translation")  # a record's two texts, in this order everywhere
_PLACEHOLDER = re.compile(r"(<\|src\|>|<\|tgt\|>|transcription|translation)")


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


def _pieces(template: str) -> list[str]:
    """'transcription<|src|><|tgt|>' -> ['', 'transcription', '', '<|src|>', '', '<|tgt|>', '']:
    literals at even, placeholders at odd positions."""
    return _PLACEHOLDER.split(template)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task, all of it (see the module docstring): `name`, the `prompt` and `target`
    templates, and `help` (one line for command-line help)."""

    name: str
    prompt: str
    target: str
    help: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"task name {self.name!r}: lower-case letters, digits and _ only")
        fields = self.given + self.outputs
        if len(fields) != len(set(fields)):
            raise ValueError(f"task {self.name}: each text appears once in prompt + target")
        if "translation" in self.given:
            raise ValueError(f"task {self.name}: a prompt may hold the transcription, not the "
                             f"translation (inference has no reference translation)")
        if not self.outputs:
            raise ValueError(f"task {self.name}: the target must hold a text (transcription / translation)")
        if len(self.outputs) == 2 and not (self.target.startswith(self.outputs[0])
                                           and self.target.endswith(self.outputs[1]) and self.separator()):
            raise ValueError(f"task {self.name}: a two-text target is `text SEPARATOR text` "
                             f"(the separator tags or literal text), got {self.target!r}")
        if len(self.outputs) == 1 and self.target != self.outputs[0]:
            raise ValueError(f"task {self.name}: a one-text target is the text alone, got {self.target!r}")

    # -- read off the templates -------------------------------------------------------------
    def _fields(self, template: str) -> tuple[str, ...]:
        return tuple(x for x in _pieces(template)[1::2] if x in TEXT_FIELDS)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The texts the model produces, in output order (what is scored)."""
        return self._fields(self.target)

    @property
    def given(self) -> tuple[str, ...]:
        """The reference texts the prompt holds (SMT: the transcription)."""
        return self._fields(self.prompt)

    @property
    def needs(self) -> tuple[str, ...]:
        """The texts an example must have (non-empty), in `TEXT_FIELDS` order."""
        used = self.given + self.outputs
        return tuple(f for f in TEXT_FIELDS if f in used)

    @property
    def translates(self) -> bool:
        """True: one item per src->tgt direction (tgt != src); False: one per utterance and
        source language (tgt = src), the target language unused."""
        return "<|tgt|>" in self.prompt + self.target

    def card(self) -> dict[str, str]:
        """Its model-card entry (`esrt_config.json` "prompt" -> "tasks")."""
        return {"prompt": self.prompt, "target": self.target}

    # -- format and parse -------------------------------------------------------------------
    def _fill(self, template: str, src: str, tgt: str, texts: dict[str, str]) -> str:
        parts = _pieces(template)
        for i in range(1, len(parts), 2):
            p = parts[i]
            parts[i] = _tag(src) if p == "<|src|>" else _tag(tgt) if p == "<|tgt|>" else texts[p]
        return "".join(parts)

    def _texts(self, fields: Sequence[str], transcription: str, translation: str) -> dict[str, str]:
        texts = {"transcription": transcription.strip(), "translation": translation.strip()}
        for f in TEXT_FIELDS:
            if f in fields and not texts[f]:
                raise TaskError("empty transcription" if f == "transcription" else
                                f"empty translation (needed by {self.name})")
        return texts

    def format_prompt(self, src: str, tgt: str, transcription: str = "") -> str:
        """The prompt string alone (inference). Raises TaskError as `format`."""
        return self._fill(self.prompt, src, tgt, self._texts(self.given, transcription, ""))

    def format(self, src: str, tgt: str, transcription: str, translation: str = "") -> tuple[str, str]:
        """(prompt, target) strings. Raises TaskError for an unknown language or a needed text
        that is empty."""
        texts = self._texts(self.needs, transcription, translation)
        return self._fill(self.prompt, src, tgt, texts), self._fill(self.target, src, tgt, texts)

    def parse(self, text: str, src: str, tgt: str) -> dict[str, str]:
        """A decoded output -> {"transcription", "translation"} (stripped; "" for a text the
        task does not produce). Never raises: codes are spelled into the separator unchecked.

        A two-text target is split as LLM-SRT's evaluation (`eval/test_metric_n.py`) splits SRT:
        at the separator; if that gives exactly two parts they are the answer. Otherwise (separator
        absent, or present more than once) the first text is the whole output and the second what
        follows the last `|>` (the whole output when there is no `|>` at all)."""
        out = dict.fromkeys(TEXT_FIELDS, "")
        if len(self.outputs) == 1:
            out[self.outputs[0]] = text.strip()
            return out
        code = {"<|src|>": src.strip().lower(), "<|tgt|>": tgt.strip().lower()}
        sep = "".join(languages.tag_text(code[p]) if p in code else p for p in _pieces(self.separator()))
        first, second = self.outputs
        parts = text.split(sep)
        if len(parts) == 2:
            out[first], out[second] = parts[0].strip(), parts[1].strip()
        else:
            out[first], out[second] = text.strip(), text.split("|>")[-1].strip()
        return out

    def separator(self) -> str:
        """The template between the two texts of a two-text target (SRT: `<|src|><|tgt|>`); ""
        for a one-text target."""
        if len(self.outputs) != 2:
            return ""
        a, b = self.outputs
        return self.target[len(a):len(self.target) - len(b)]


TASKS: dict[str, Task] = {}  # the one table: name -> Task, in registration order (= task ids)
DEFAULT_TASK = "srt"


def register(task: Task) -> Task:
    """Add `task` to `TASKS` (its id is its position). A name is registered once."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


register(Task("asr", "<|src|>", "transcription", help="transcribe each utterance once"))
register(Task("smt", "transcription<|src|><|tgt|>", "translation",
              help="translate given the reference transcription"))
register(Task("srt", "<|src|><|tgt|>", "transcription<|src|><|tgt|>translation",
              help="transcribe, then translate"))


def get_task(name: str) -> Task:
    """The registered task `name`; TaskError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise TaskError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}") from None


def card_table() -> dict[str, dict[str, str]]:
    """Every task's model-card entry, as an export's `esrt_config.json` lists them."""
    return {name: t.card() for name, t in TASKS.items()}


def task_id(name: str) -> int:
    """The int a batch's `task` column holds for `name` (its position in `TASKS`)."""
    get_task(name)
    return list(TASKS).index(name)


def task_name(i: int) -> str:
    """Inverse of `task_id`."""
    return list(TASKS)[int(i)]


def format_task(task: str, src: str, tgt: str, transcription: str, translation: str = ""
                ) -> tuple[str, str]:
    """(prompt, target) strings of `task` (`Task.format`).

    Raises TaskError for an unknown task/language or text the task needs that is empty.
    """
    return get_task(task).format(src, tgt, transcription, translation)


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
        # ids a decoded answer drops: pad and the special tokens (BOS, <end_of_turn>, <|im_start|>...)
        # a model can emit mid-answer; language tags stay even where a tokenizer marks them special
        # (the SRT split reads them), so `skip_special_tokens` is not used
        tags = {languages.tag_text(c) for c in (*languages.ESRT_LANGS, *languages.ALIASES)}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {int(i): str(t) for i, t in added.items() if getattr(t, "special", False)}
        special.update(zip(getattr(tokenizer, "all_special_ids", ()), getattr(tokenizer, "all_special_tokens", ())))
        self.dropped_ids = frozenset({i for i, t in special.items() if t not in tags} | {self.pad_id})

    def answer_text(self, ids: Sequence[int]) -> str:
        """Generated ids (cut at EOS) -> the answer's text, without pad and special tokens."""
        return self.tokenizer.decode([int(x) for x in ids if int(x) not in self.dropped_ids],
                                     skip_special_tokens=False)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, task: str, src: str, tgt: str, transcription: str = "") -> list[int]:
        """Prompt ids for inference: `[bos?] prompt` (SMT needs the transcription)."""
        prompt = get_task(task).format_prompt(src, tgt, transcription)
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
    """Split a decoded SRT output into (transcription, translation), both stripped (`Task.parse`
    of srt: at `<|src|><|tgt|>`, with LLM-SRT's fallbacks)."""
    out = TASKS["srt"].parse(text, src, tgt)
    return out["transcription"], out["translation"]
