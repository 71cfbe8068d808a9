"""The Grain training pipeline: batches, exact resume in a new process, per-process shards,
worker processes, bad records and the bad-record budget."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esrt_jax import audio as audio_lib
from esrt_jax.data import pipeline as P
from esrt_jax.data import records as R
from esrt_jax.data.tasks import format_task, task_id, task_name
from helpers_tokenizer import tiny_tokenizer
from test_data_helpers import write_corpus, write_wav

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pipe_corpus"), n_sent=4)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_cfg(jsonl, **kw):
    base = dict(train=(str(jsonl),), tasks={"asr": 0.2, "smt": 0.1, "srt": 0.7}, batch_size=4,
                n_mels=80, features="audio", text_buckets=(32, 64, 128), shard_index=0,
                shard_count=1, seed=7)
    base.update(kw)
    return P.DataConfig(**base)


def digest(batch) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode())
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def test_config_validation():
    from esrt_jax.config import ConfigError, from_dict

    cfg = from_dict(P.DataConfig, {"train": ["a.jsonl"], "tasks": {"asr": 0.2, "srt": 0.8},
                                   "schedule": [{"step": 100, "weights": {"srt": 1}}]})
    assert cfg.schedule[0].weights == {"srt": 1.0}
    with pytest.raises(ConfigError, match=r"tasks: unknown task\(s\) \['st'\]"):
        from_dict(P.DataConfig, {"tasks": {"st": 1.0}})
    with pytest.raises(ConfigError, match=r"schedule\[0\]\.step: must be > 0"):
        from_dict(P.DataConfig, {"schedule": [{"step": 0, "weights": {"srt": 1}}]})
    with pytest.raises(ConfigError, match="text_buckets: must increase"):
        from_dict(P.DataConfig, {"text_buckets": [64, 32]})
    with pytest.raises(ConfigError, match="shard_index: set shard_index and shard_count together"):
        from_dict(P.DataConfig, {"shard_index": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(P.DataConfig, {"batchsize": 3})


def test_mel_batches_content(corpus, tok):
    cfg = make_cfg(corpus, features="mel")
    src = R.JsonlSource(corpus)
    it = P.make_train_iterator(cfg, tok)
    b = next(it)
    assert b["mel"].shape == (4, 80, 3000) and b["mel"].dtype == np.float32
    T = b["tokens"].shape[1]
    assert T in cfg.text_buckets and b["tokens"].shape == (4, T)
    assert b["valid"].tolist() == [1, 1, 1, 1]
    assert b["example_key"].tolist() == [0, 1, 2, 3]
    for i in range(4):
        rec = src[int(b["record"][i])]
        task = task_name(int(b["task"][i]))
        _, target = format_task(task, rec.src, rec.tgt, rec.transcription, rec.translation)
        answer = b["tokens"][i][b["loss_mask"][i] == 1]
        assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]) == target
        want = audio_lib.log_mel_spectrogram(
            audio_lib.pad_or_trim(audio_lib.load_audio(rec.audio)), 80)
        np.testing.assert_array_equal(b["mel"][i], want)


def test_audio_features(corpus, tok):
    b = next(P.make_train_iterator(make_cfg(corpus), tok))
    src = R.JsonlSource(corpus)
    assert b["audio"].shape == (4, audio_lib.N_SAMPLES) and "mel" not in b
    rec = src[int(b["record"][2])]
    np.testing.assert_array_equal(b["audio"][2],
                                  audio_lib.pad_or_trim(audio_lib.load_audio(rec.audio)))


_RESUME_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
from test_data_pipeline import make_cfg, digest
from esrt_jax.data import pipeline as P
from esrt_jax.data.pipeline import WeightChange
from helpers_tokenizer import tiny_tokenizer
cfg = make_cfg({jsonl!r}, **{kw})
it = P.make_train_iterator(cfg, tiny_tokenizer(), state=json.loads({state!r}))
print(json.dumps([digest(next(it)) for _ in range(20)]))
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_in_a_new_process(corpus, tok, workers):
    from esrt_jax.data.pipeline import WeightChange

    kw = dict(workers=workers, schedule=(WeightChange(step=5, weights={"srt": 1.0}),))
    cfg = make_cfg(corpus, **kw)
    it = P.make_train_iterator(cfg, tok)
    k = 3
    for _ in range(k):
        next(it)
    state = it.get_state()
    want = [digest(next(it)) for _ in range(20)]
    if workers:
        it.close()
    script = _RESUME_SCRIPT.format(tests=str(HERE), jsonl=str(corpus), state=json.dumps(state),
                                   kw="dict(workers=%d, schedule=(WeightChange(step=5, weights={'srt': 1.0}),))"
                                   % workers)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == want
    # ...and both equal batches k..k+19 of a fresh in-process iterator: worker processes do
    # not change the stream.
    fresh = P.make_train_iterator(make_cfg(corpus, **{**kw, "workers": 0}), tok)
    assert [digest(next(fresh)) for _ in range(k + 20)][k:] == want


def test_process_shards_are_disjoint_and_cover_the_global_batch(corpus, tok):
    n = 6  # SRT only: 6 equal directions x 4 records -> 6 global batches of 4 are one epoch
    one = P.make_train_iterator(make_cfg(corpus, tasks={"srt": 1.0}), tok)
    glob = [next(one) for _ in range(n)]
    shards = []
    for p in range(2):
        it = P.make_train_iterator(make_cfg(corpus, tasks={"srt": 1.0}, shard_index=p,
                                            shard_count=2), tok)
        shards.append([next(it) for _ in range(n)])
    keys = [np.concatenate([b["example_key"] for b in s]) for s in shards]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(np.concatenate(keys).tolist()) == list(range(4 * n))
    for g in range(n):  # the processes' rows together are the single-process global batch
        for k in ("example_key", "record", "task", "audio", "loss_mask"):
            np.testing.assert_array_equal(
                np.concatenate([shards[0][g][k], shards[1][g][k]]), glob[g][k][:, ...]
                if k in ("example_key", "record", "task", "audio") else glob[g][k])
    recs = [set(np.concatenate([b["record"] for b in s]).tolist()) for s in shards]
    assert not recs[0] & recs[1] and len(recs[0] | recs[1]) == 24  # every record once
    with pytest.raises(Exception, match="not divisible by the 3 processes"):
        P.make_train_dataset(make_cfg(corpus, shard_index=0, shard_count=3), tok)


# ----------------------------------------------------------------------------- bad records


@pytest.fixture(scope="module")
def bad_source(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = list(R.JsonlSource(corpus))
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00 this is not audio at all")
    write_wav(root / "ok.wav")
    base = dict(src="eng", tgt="deu", transcription="hello", translation="hallo", source="bad")
    bad = [
        R.Record(id="missing", audio=str(root / "nope.wav"), **base),
        R.Record(id="corrupt", audio=str(root / "corrupt.wav"), **base),
        R.Record(id="unknown-lang", audio=str(root / "ok.wav"),
                 **{**base, "tgt": "xxq"}),
        R.Record(id="empty-text", audio=str(root / "ok.wav"), **{**base, "transcription": " "}),
        R.Record(id="too-long", audio=str(root / "ok.wav"),
                 **{**base, "translation": "lang " * 200}),
    ]
    return good, bad


REASONS = {"missing": "missing audio", "corrupt": "corrupt audio",
           "unknown-lang": "unknown language", "empty-text": "empty text", "too-long": "too long"}


def test_every_bad_record_kind_is_skipped_counted_and_logged_once(bad_source, tok, caplog):
    from esrt_jax.data.mixture import PlanItem
    from esrt_jax.data.tasks import TaskTokenizer

    good, bad = bad_source
    src = R.ListSource(good + bad)
    tracker = P.BadRecordTracker(budget=0.5, minimum=100)
    cfg = make_cfg("x.jsonl")
    builder = P.ExampleBuilder(src, TaskTokenizer(tok), cfg, tracker)
    with caplog.at_level(logging.WARNING, logger="esrt_jax.data.pipeline"):
        for _ in range(2):  # each bad record twice: logged once
            for i in range(len(good), len(good) + len(bad)):
                out = builder(PlanItem(key=i, task=task_id("srt"), record=i))
                assert out["task"] == -1 and out["text"] is None and out["feat"] is None
        ok = builder(PlanItem(key=0, task=task_id("srt"), record=0))
    assert ok["task"] == task_id("srt") and ok["feat"] is not None
    assert dict(tracker.reasons) == {r: 2 for r in REASONS.values()}
    assert tracker.seen == 11 and tracker.bad == 10
    msgs = [r.getMessage() for r in caplog.records]
    for rid, reason in REASONS.items():
        hits = [m for m in msgs if f"skipping record {rid}: {reason}" in m]
        assert len(hits) == 1, (rid, msgs)
    # In a batch a bad record is an empty row: valid 0, no loss, no attention, zero features.
    coll = P._Collate(cfg, TaskTokenizer(tok).pad_id)
    b = coll([ok, builder(PlanItem(key=1, task=task_id("srt"), record=len(good)))])
    assert b["valid"].tolist() == [1, 0] and b["task"].tolist() == [task_id("srt"), -1]
    assert b["loss_mask"][1].sum() == 0 and b["attention_mask"][1].sum() == 0
    assert not b["audio"][1].any()


def test_bad_records_in_a_training_stream(bad_source, tok, tmp_path):
    good, bad = bad_source
    src = R.ListSource(good + bad)
    cfg = make_cfg("x.jsonl", tasks={"srt": 1.0}, bad_record_min=5, bad_record_budget=0.5)
    it = P.make_train_iterator(cfg, tok, source=src)
    batches = [next(it) for _ in range(12)]
    valid = np.concatenate([b["valid"] for b in batches])
    recs = np.concatenate([b["record"] for b in batches])
    bad_idx = set(range(len(good), len(good) + len(bad)))
    assert all((v == 0) == (int(r) in bad_idx) for v, r in zip(valid, recs))
    assert 0 < (valid == 0).sum() < len(valid)


def test_budget_error(bad_source, tok, tmp_path):
    good, bad = bad_source
    t = P.BadRecordTracker(budget=0.01, minimum=3)
    for _ in range(200):
        t.ok()
    for i in range(3):  # 3 <= max(3, 0.01 * seen): still fine
        t.add(f"m{i}", "missing audio", "/x.wav")
    with pytest.raises(P.BadRecordBudgetError) as e:
        t.add("c", "corrupt audio", "garbage")
    msg = str(e.value)
    assert "4 of 204 records were bad (budget 1.00%, at least 3 allowed" in msg
    assert "missing audio: 3 (e.g. m0: /x.wav)" in msg and "corrupt audio: 1 (e.g. c: garbage)" in msg
    # In the pipeline: every audio file missing stops the run with the summary.
    gone = [R.Record(id=f"g{i}", audio=str(tmp_path / f"{i}.wav"), src="eng", tgt="deu",
                     transcription="a", translation="b", source="x") for i in range(40)]
    it = P.make_train_iterator(make_cfg("x.jsonl", tasks={"srt": 1.0}, bad_record_min=5),
                               tok, source=R.ListSource(gone))
    with pytest.raises(P.BadRecordBudgetError, match=r"(?s)6 of 6 records were bad.*missing audio: 6"):
        for _ in range(3):
            next(it)
    # Malformed source lines count against the same budget when the pipeline is built.
    lines = "\n".join(["{broken"] * 6 + [json.dumps(good[0].to_json())]) + "\n"
    (tmp_path / "m.jsonl").write_text(lines)
    with pytest.raises(P.BadRecordBudgetError, match=r"malformed record: 6 \(e\.g\. .*m\.jsonl:1"):
        P.make_train_dataset(make_cfg(tmp_path / "m.jsonl", tasks={"srt": 1.0},
                                      bad_record_min=5), tok)


def test_eval_batches(corpus, tok):
    src = R.JsonlSource(corpus)
    out = list(P.make_eval_batches(make_cfg(corpus), tok, src, "srt", batch_size=5))
    assert len(out) == 5  # 24 records -> 4 full batches + 1 padded
    assert np.concatenate([b["record"] for b in out]).tolist() == list(range(24)) + [-1]
    assert out[-1]["valid"].tolist() == [1, 1, 1, 1, 0]
