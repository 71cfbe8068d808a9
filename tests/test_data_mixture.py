"""Task mixture weights, temperature balancing over directions, caps and weight schedules."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from esrt_jax.data.mixture import (MixturePlan, build_components, interleave_count,
                                   interleave_pick, temperature_probs)
from esrt_jax.data.pipeline import DataConfig, WeightChange
from esrt_jax.data.records import RecordIndex
from esrt_jax.data.tasks import task_id, task_name

# Unbalanced directions: eng->deu 120, eng->fra 30, deu->eng 8, fra->eng 2 (records).
SIZES = {("eng", "deu"): 120, ("eng", "fra"): 30, ("deu", "eng"): 8, ("fra", "eng"): 2}


@pytest.fixture(scope="module")
def index():
    src, tgt, key = [], [], []
    for (s, t), n in SIZES.items():
        for i in range(n):
            src.append(s)
            tgt.append(t)
            key.append(f"{s}-{t}/{i}.wav")  # one utterance per record here
    # Three extra records share one eng utterance (same audio, several targets): ASR keeps one.
    for t in ("deu", "fra", "cmn"):
        src.append("eng")
        tgt.append(t)
        key.append("eng/shared.wav")
    return RecordIndex(np.array(src, object), np.array(tgt, object), np.array(key, object))


def _draw(plan, n, start=0):
    return [plan[k] for k in range(start, start + n)]


def test_interleave_is_a_partition():
    props = (3, 0, 5, 2)
    picks = [interleave_pick(k, props) for k in range(1000)]
    seen = collections.defaultdict(list)
    for i, key in picks:
        seen[i].append(key)
    for i, keys in seen.items():  # each component gets consecutive keys 0, 1, 2, ...
        assert keys == list(range(len(keys)))
    assert 1 not in seen
    for n in (0, 1, 7, 100, 1000):
        c = interleave_count(n, props)
        assert sum(c) == n and c == [sum(1 for i, _ in picks[:n] if i == j) for j in range(4)]
    assert interleave_count(1000, props) == [300, 0, 500, 200]


def test_temperature_probs():
    np.testing.assert_allclose(temperature_probs([100, 25], 1.0), [0.8, 0.2])
    np.testing.assert_allclose(temperature_probs([100, 25], 2.0), [10 / 15, 5 / 15])
    np.testing.assert_allclose(temperature_probs([100, 25, 1], 1e9), [1 / 3] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        temperature_probs([1], 0.0)


def test_task_weights_over_10k_draws(index):
    comps = build_components(index, ["asr", "smt", "srt"])
    weights = {"asr": 0.2, "smt": 0.1, "srt": 0.7}
    plan = MixturePlan(comps, [(0, weights)], temperature=1.0, seed=3)
    items = _draw(plan, 10_000)
    freq = collections.Counter(task_name(it.task) for it in items)
    for t, w in weights.items():
        sigma = np.sqrt(w * (1 - w) / 10_000)
        assert abs(freq[t] / 10_000 - w) < 3 * sigma, (t, freq)
    # The deterministic interleave is in fact exact to rounding.
    assert freq == {"asr": 2000, "smt": 1000, "srt": 7000}
    assert plan.task_weights(0) == pytest.approx(weights)


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_direction_temperature_over_10k_draws(index, T):
    comps = build_components(index, ["srt"])
    plan = MixturePlan(comps, [(0, {"srt": 1.0})], temperature=T, seed=0)
    counts = {c.direction: len(c.records) for c in comps["srt"]}
    assert counts == {"deu-eng": 8, "eng-cmn": 1, "eng-deu": 121, "eng-fra": 31, "fra-eng": 2}
    dirs = [c.direction for c in comps["srt"]]
    expected = dict(zip(dirs, temperature_probs([counts[d] for d in dirs], T)))
    assert plan.direction_probs["srt"] == pytest.approx(expected)
    rec_dir = {int(r): c.direction for c in comps["srt"] for r in c.records}
    got = collections.Counter(rec_dir[it.record] for it in _draw(plan, 10_000))
    for d, p in expected.items():
        sigma = np.sqrt(p * (1 - p) / 10_000)
        assert abs(got[d] / 10_000 - p) < 3 * sigma + 1e-4, (d, got[d], p)


def test_source_languages_asr_dedup_and_language_filter(index):
    comps = build_components(index, ["asr"])
    assert {c.direction: len(c.records) for c in comps["asr"]} == {"deu": 8, "eng": 151, "fra": 2}
    comps = build_components(index, ["srt"], languages=["eng", "deu"])
    assert [c.direction for c in comps["srt"]] == ["deu-eng", "eng-deu"]
    # zho is an alias of cmn: one direction whatever the spelling.
    idx = RecordIndex(np.array(["eng", "eng"], object), np.array(["zho", "cmn"], object),
                      np.array(["a", "b"], object))
    assert [(c.direction, len(c.records)) for c in build_components(idx, ["srt"])["srt"]] == [
        ("eng-cmn", 2)]


def test_epochs_cover_every_record_and_reshuffle(index):
    comps = build_components(index, ["srt"], languages=["eng", "fra"])  # eng-fra 31, fra-eng 2
    plan = MixturePlan({"srt": [c for c in comps["srt"] if c.direction == "eng-fra"]},
                       [(0, {"srt": 1.0})], seed=1)
    recs = [it.record for it in _draw(plan, 62)]
    ids = sorted(int(r) for r in comps["srt"][0].records) if comps["srt"][0].direction == "eng-fra" \
        else sorted(int(r) for r in comps["srt"][1].records)
    assert sorted(recs[:31]) == ids and sorted(recs[31:]) == ids
    assert recs[:31] != recs[31:]
    assert [it.record for it in _draw(plan, 62)] == recs  # random access: same again


def test_direction_cap(index):
    comps = build_components(index, ["srt"], cap=10, seed=5)
    sizes = {c.direction: len(c.records) for c in comps["srt"]}
    assert sizes == {"deu-eng": 8, "eng-cmn": 1, "eng-deu": 10, "eng-fra": 10, "fra-eng": 2}
    again = build_components(index, ["srt"], cap=10, seed=5)
    assert all((a.records == b.records).all() for a, b in zip(comps["srt"], again["srt"]))
    plan = MixturePlan(comps, [(0, {"srt": 1.0})], temperature=1.0)
    capped = {c.direction: set(map(int, c.records)) for c in comps["srt"]}
    used = {it.record for it in _draw(plan, 2000)}
    assert used == set().union(*capped.values())
    assert plan.direction_probs["srt"]["eng-deu"] == pytest.approx(10 / 31)


def test_schedule_switches_at_the_configured_step(index):
    cfg = DataConfig(tasks={"asr": 1.0}, batch_size=8,
                     schedule=(WeightChange(step=50, weights={"asr": 0.2, "smt": 0.1, "srt": 0.7}),
                               WeightChange(step=1300, weights={"srt": 1.0})))
    assert cfg.segments()[1:] == [(400, {"asr": 0.2, "smt": 0.1, "srt": 0.7}),
                                  (10400, {"srt": 1.0})]
    comps = build_components(index, ["asr", "smt", "srt"])
    plan = MixturePlan(comps, cfg.segments(), seed=0)
    tasks = np.array([it.task for it in _draw(plan, 10_800)]).reshape(-1, 8)  # (steps, batch)
    assert (tasks[:50] == task_id("asr")).all()
    mid = collections.Counter(tasks[50:1300].ravel().tolist())
    assert {task_name(k): v for k, v in mid.items()} == {"asr": 2000, "smt": 1000, "srt": 7000}
    assert (tasks[1300:] == task_id("srt")).all()
    # ASR continues where it stopped before the switch (its stream is not restarted).
    asr_before = [it.record for it in _draw(plan, 400)]
    asr_after = [plan[k].record for k in range(400, 10400) if plan[k].task == task_id("asr")]
    full = MixturePlan(comps, [(0, {"asr": 1.0})], seed=0)
    assert asr_before + asr_after[:100] == [it.record for it in _draw(full, 500)]


def test_plan_errors(index):
    comps = build_components(index, ["srt"])
    with pytest.raises(ValueError, match=r"task\(s\) \['asr'\] have weight > 0 from example 16"):
        MixturePlan(comps, [(0, {"srt": 1.0}), (16, {"asr": 1.0})])
    with pytest.raises(ValueError, match="segment starts must increase"):
        MixturePlan(comps, [(0, {"srt": 1.0}), (0, {"srt": 1.0})])
