"""docs/architecture.md "Where to add things", each recipe followed at test time: a toy task is one
`Task` registered in `tasks.TASKS` and then trains (pipeline batches), is read and prompted by eval,
decoded by a (tiny, untrained) model and parsed into results, offered by both CLIs and listed in the model card; a toy source
is one `RecordSource` subclass plus one `records.SOURCE_KINDS` entry and then feeds training; and
a JSONL manifest is read by the one reader for training, eval and inference, whose errors name
file:line. (The family recipe is backed by the fused-layout family test.)"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from esrt_jax.audio import mel_from_file
from esrt_jax.cli import eval as eval_cli
from esrt_jax.cli import infer as infer_cli
from esrt_jax.data import pipeline as P
from esrt_jax.data import records as R
from esrt_jax.data import tasks as T
from esrt_jax.eval import decode as dec
from esrt_jax.export.card import prompt_lines
from esrt_jax.infer.batch import InferError, utterances
from helpers_sllm import tiny_translator
from helpers_tokenizer import tiny_tokenizer
from test_data_helpers import write_corpus

# translate first, then transcribe: both texts, in the other order, the other separator
TOY = T.Task("tsr", "<|tgt|><|src|>", "translation<|tgt|><|src|>transcription", help="translate, then transcribe")


@pytest.fixture
def toy_task():
    T.register(TOY)  # the whole recipe
    yield TOY
    del T.TASKS[TOY.name]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("recipes"), n_sent=2)  # 12 records, eng/deu/fra


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _cfg(source: str, tasks: dict) -> P.DataConfig:
    return P.DataConfig(train=(source,), tasks=tasks, batch_size=4, n_mels=80, features="audio",
                        text_buckets=(32, 64, 128), shard_index=0, shard_count=1, seed=3)


def _rows(batch, tok):
    """(record index, prompt text, answer text) per valid row: the answer is the loss-masked tokens
    without the EOS."""
    out = []
    for i in np.nonzero(batch["valid"])[0]:
        toks, mask = batch["tokens"][i], batch["loss_mask"][i]
        p = int(batch["prompt_len"][i])
        answer = toks[mask == 1][:-1]
        assert toks[mask == 1][-1] == tok.eos_token_id
        out.append((int(batch["record"][i]), tok.decode(toks[:p]), tok.decode(answer)))
    return out


def test_toy_task_registered_once_trains_evaluates_and_is_listed(toy_task, corpus, tok, tmp_path):
    assert (toy_task.outputs, toy_task.given, toy_task.translates) == (("translation", "transcription"), (), True)
    # training: the pipeline mixes it, formats it, masks the loss on its target
    cfg = _cfg(str(corpus), {"tsr": 1.0})
    src = P.open_sources(cfg.train)
    batch = next(P.make_train_iterator(cfg, tok, src))
    assert set(batch["task"].tolist()) == {T.task_id("tsr")}
    rows = _rows(batch, tok)
    assert len(rows) == 4
    for k, prompt, answer in rows:
        r = src[k]
        assert prompt == f"<|{r.tgt}|><|{r.src}|>" and r.tgt != r.src
        assert answer == f"{r.translation}<|{r.tgt}|><|{r.src}|>{r.transcription}"
        # the decode parsing reads the target back into the two texts
        assert toy_task.parse(answer, r.src, r.tgt) == {"transcription": r.transcription, "translation": r.translation}
    assert toy_task.parse("only text", "eng", "deu") == {"translation": "only text", "transcription": "only text"}

    # eval: one item per direction, the task's prompt; results rows parse the response with the task
    items, issues = dec.read_items(corpus, task="tsr")
    assert len(items) == 12 and not issues
    assert items[0].prompt("tsr") == f"<|{items[0].tgt}|><|{items[0].src}|>"
    tr, _, fp = tiny_translator(max_new_tokens=3, max_batch=1)
    enc = tr.config.encoder
    out = tmp_path / "results.jsonl"
    dec.decode_to_file(tr, items[:1], out, task="tsr", batch=1, progress=False, fingerprint=fp,
                       mel_fn=lambda path: mel_from_file(path, enc.num_mel_bins, enc.num_frames)[0])
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == [it.prompt("tsr") for it in items[:1]]
    for r in rows:  # the untrained model's output, parsed by the task (its fallbacks included)
        p = toy_task.parse(r["response"], r["src"], r["tgt"])
        assert (r["asr_r"], r["s2tt_r"]) == (p["transcription"], p["translation"])

    # both CLIs offer it (its prompt holds no reference text), the model card lists it
    assert eval_cli.build_parser().parse_args(["--config", "c.yaml", "--data", "t.jsonl", "--task", "tsr"]).task == "tsr"
    assert infer_cli.parse_args(["--config", "c.yaml", "--untrained", "--audio", "a.wav", "--task", "tsr"]).task == "tsr"
    card = "\n".join(prompt_lines(T.card_table()))
    assert "| tsr | `<|tgt|><|src|>` | `translation<|tgt|><|src|>transcription` |" in card
    assert "The TSR output is split at `<|tgt|><|src|>` into translation and transcription." in card


def test_toy_task_is_gone_after_the_test():
    assert "tsr" not in T.TASKS and list(T.TASKS) == ["asr", "smt", "srt"]
    with pytest.raises(T.TaskError, match="unknown task 'tsr'; tasks are asr, smt, srt"):
        T.get_task("tsr")


def test_task_templates_are_checked():
    with pytest.raises(ValueError, match="not the translation"):
        T.Task("bad", "translation<|src|>", "transcription")
    with pytest.raises(ValueError, match="must hold a text"):
        T.Task("bad", "<|src|>", "<|tgt|>")
    with pytest.raises(ValueError, match="two-text target"):
        T.Task("bad", "<|src|>", "transcriptiontranslation")
    with pytest.raises(ValueError, match="already registered"):
        T.register(T.Task("srt", "<|src|>", "transcription"))


# ----------------------------------------------------------------------------- a source


class TsvSource(R.RecordSource):
    """Toy source: a header line `id audio src tgt transcription translation`, tab separated,
    audio relative to the file."""

    def __init__(self, path: Path):
        self.name = str(path)
        self.load_errors = []
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        base = path.parent
        self.records = [R.Record(id=r["id"], audio=str(base / r["audio"]), src=r["src"], tgt=r["tgt"],
                                 transcription=r["transcription"], translation=r["translation"], source="tsv")
                        for r in rows]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> R.Record:
        return self.records[i]


def test_toy_source_is_one_class_and_one_table_entry(corpus, tok, monkeypatch, tmp_path):
    jsonl = R.JsonlSource(corpus)
    tsv = corpus.parent / "train.tsv"
    with open(tsv, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "audio", "src", "tgt", "transcription", "translation"])
        for r in jsonl:
            w.writerow([r.id, str(Path(r.audio).relative_to(corpus.parent)), r.src, r.tgt, r.transcription,
                        r.translation])
    with pytest.raises(R.SourceError, match="not a .jsonl file"):
        R.open_source(str(tsv))
    kind = R.SourceKind("a .tsv file", lambda p: p.is_file() and p.suffix == ".tsv",
                        lambda p, split, strict: TsvSource(p))
    monkeypatch.setattr(R, "SOURCE_KINDS", [kind, *R.SOURCE_KINDS])  # the recipe: one entry
    src = R.open_source(str(tsv))
    assert isinstance(src, TsvSource) and list(src) == [dataclasses.replace(r, source="tsv") for r in jsonl]
    # training reads it exactly as it reads the same records from JSONL
    a = next(P.make_train_iterator(_cfg(str(tsv), {"srt": 1.0}), tok))
    b = next(P.make_train_iterator(_cfg(str(corpus), {"srt": 1.0}), tok))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- one JSONL reader


def test_one_jsonl_reader_for_training_eval_and_inference(corpus, tmp_path):
    good = corpus.read_text(encoding="utf-8").splitlines()
    audio = str(corpus.parent / "audio" / "eng" / "0.wav")
    f = corpus.parent / "mixed.jsonl"  # next to the audio its lines name
    f.write_bytes("\n".join([good[0], "", "{not json", json.dumps({"id": "n", "audio": audio, "src": "eng"}),
                             good[1]]).encode() + b"\n\xff\xfe\n")
    lines = list(R.read_jsonl(f))
    assert [(ln.line, ln.kind) for ln in lines] == [(1, ""), (3, "json"), (4, "record"), (5, ""), (6, "json")]
    assert all(ln.where == f"{f}:{ln.line}" for ln in lines)
    want = [ln.record for ln in lines if ln.record is not None]
    # training: the good records, the bad lines as load errors naming file:line
    src = R.JsonlSource(f)
    assert list(src) == want and [w for w, _ in src.load_errors] == [f"{f}:3", f"{f}:4", f"{f}:6"]
    with pytest.raises(R.SourceError, match=rf"mixed\.jsonl:3: not valid JSON"):
        R.JsonlSource(f, strict=True)
    # eval: the same records, the same lines as issues
    items, issues = dec.read_items(f)
    assert [(it.id, it.path, it.transcription, it.translation) for it in items] == [
        (r.id, r.audio, r.transcription, r.translation) for r in want]
    assert [(i.line, i.kind) for i in issues] == [(3, "malformed_json"), (4, "missing_field"), (6, "malformed_json")]
    # inference: stops at the first bad line, naming it; references are optional there
    with pytest.raises(InferError, match=rf"mixed\.jsonl:3: not valid JSON"):
        utterances(jsonl=str(f))
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"id": "b", "audio": audio, "src": "eng", "tgt": "deu"}) + "\n")
    assert [(u.id, u.audio, u.transcription) for u in utterances(jsonl=str(bare))] == [("b", audio, "")]
    assert R.read_jsonl(bare, references=True).__next__().kind == "record"  # training needs `asr`
    with pytest.raises(R.SourceError, match="does not exist"):
        R.read_jsonl(tmp_path / "nope.jsonl")
