"""Weighted curriculum mixture of tasks with temperature balancing over directions.

Per stage the training stream mixes tasks (ASR, SMT, SRT) with weights from the config, e.g.
ESRT's 0.2/0.1/0.7; inside each task it balances directions (`src` for ASR, `src->tgt` for
SMT/SRT) by temperature sampling, p_d ∝ n_d^(1/T) (T = 1: proportional to the data, T -> inf:
uniform), with an optional cap on the records used per direction (a fixed, seeded subset).
Task weights may change at given training steps (a schedule) so one run can follow a curriculum.

Construction: `MixturePlan` is a random-access Grain `MapDataset`: element k (the k-th example
of the global stream) -> `PlanItem(key=k, task, record)` computed in closed form, so
- the iterator state of everything built on it is one integer (`next_index`) per worker and a
  restore is exact whatever happened before; it does not depend on the worker count;
- the schedule switches exactly at example `step * global_batch`, i.e. at the configured step;
- per-process shards are slices of the global batches (see `pipeline`), so the data seen by N
  hosts together is exactly what one host would see.

Mixing is a deterministic weighted interleave (the same idea as Grain's `MapDataset.mix`: split
the first k elements between components hierarchically by integer proportions), so observed
frequencies match the weights up to rounding, not just in expectation. Each direction is read in
epochs, every epoch a fresh seeded permutation of its records (numpy PCG64 seeded by
(seed, task, direction, epoch); Grain's `index_shuffle` is ~1 ms a call on small domains).
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from typing import Mapping, Sequence

import grain
import numpy as np

from esrt_jax import languages as langs_lib
from esrt_jax.data.records import RecordIndex
from esrt_jax.data.tasks import TASKS, task_id

__all__ = [
    "PlanItem",
    "Component",
    "MixturePlan",
    "temperature_probs",
    "build_components",
    "interleave_pick",
    "interleave_count",
]

_RESOLUTION = 1_000_000  # integer proportions: frequencies exact to ~1e-6


@dataclasses.dataclass(frozen=True)
class PlanItem:
    key: int        # global example index
    task: int       # tasks.task_id
    record: int     # index into the record source


@dataclasses.dataclass(frozen=True)
class Component:
    """The records of one (task, direction)."""

    task: str
    src: str
    tgt: str        # "" for a task without a target language (ASR)
    records: np.ndarray  # int64 record indices

    @property
    def direction(self) -> str:
        return self.src if not self.tgt else f"{self.src}-{self.tgt}"


def temperature_probs(counts: Sequence[int], temperature: float) -> np.ndarray:
    """p_d ∝ n_d^(1/T), normalised."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = np.asarray(counts, np.float64)
    if (n <= 0).any():
        raise ValueError("every direction needs at least one record")
    w = np.exp(np.log(n) / temperature)
    return w / w.sum()


def _int_props(weights: Sequence[float]) -> tuple[int, ...]:
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    p = np.round(w / w.sum() * _RESOLUTION).astype(np.int64)
    p[(w > 0) & (p == 0)] = 1
    return tuple(int(x) for x in p)


def interleave_pick(k: int, props: Sequence[int]) -> tuple[int, int]:
    """Component of element k in the interleave of components with integer proportions
    `props` (zeros allowed), and how many earlier elements went to that component.

    The first a elements give component 0 ceil(a * p0 / R) of them (R = sum of proportions),
    the rest are split the same way among components 1.., and so on.
    """
    rest = sum(props)
    a, b = k, k + 1
    for i, p in enumerate(props):
        if p == 0:
            continue
        na, nb = a * (rest - p) // rest, b * (rest - p) // rest
        ca, cb = a - na, b - nb
        if ca != cb:
            return i, ca
        rest -= p
        a, b = na, nb
    raise AssertionError("unreachable: proportions sum to zero")


def interleave_count(n: int, props: Sequence[int]) -> list[int]:
    """How many of the first n elements go to each component."""
    rest = sum(props)
    counts = [0] * len(props)
    a = n
    for i, p in enumerate(props):
        if p == 0:
            continue
        na = a * (rest - p) // rest
        counts[i] = a - na
        rest -= p
        a = na
    return counts


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode("utf-8"))


def build_components(index: RecordIndex, tasks: Sequence[str], cap: int = 0, seed: int = 0,
                     languages: Sequence[str] = ()) -> dict[str, list[Component]]:
    """Group record indices by task and direction.

    A task without a target language (`Task.translates` false: ASR): one record per (src, audio)
    (records that differ only by target are the same utterance); the others (SMT, SRT): records
    with a target different from the source. `languages` keeps
    only directions whose languages are all listed (empty: keep all). `cap > 0` keeps a fixed
    seeded subset of at most `cap` records per direction.
    """
    def canon(code: str) -> str:  # zho and cmn are one direction; unknown codes stay as written
        try:
            return langs_lib.normalize(code)
        except langs_lib.LanguageError:
            return str(code).strip().lower()

    def canon_all(codes: np.ndarray) -> np.ndarray:  # per distinct code, not per record
        codes = np.asarray(codes, dtype=str)
        uniq, inv = np.unique(codes, return_inverse=True)
        return np.array([canon(c) if c else "" for c in uniq], dtype=str)[inv.reshape(-1)] \
            if len(uniq) else codes

    keep = {canon(c) for c in languages}
    src, tgt = canon_all(index.src), canon_all(index.tgt)
    n = len(src)
    out: dict[str, list[Component]] = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
        if not TASKS[task].translates:
            # first record of every (src, utterance): the others differ only by target
            ukey = np.char.add(np.char.add(src, "\x1f"), np.asarray(index.audio_key, dtype=str))
            _, first = np.unique(ukey, return_index=True)
            sel = np.zeros(n, bool)
            sel[first] = True
            t_of = np.full(n, "", dtype=str)
        else:
            sel = (tgt != "") & (tgt != src)
            t_of = tgt
        if keep:
            sel &= np.isin(src, list(keep)) & ((t_of == "") | np.isin(t_of, list(keep)))
        idx = np.nonzero(sel)[0]
        gkey = np.char.add(np.char.add(src[idx], "\x1f"), t_of[idx])
        names, inv = np.unique(gkey, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(len(names) + 1))
        comps = []
        for g, name in enumerate(names):
            s_, t_ = str(name).split("\x1f")
            arr = idx[order[bounds[g]:bounds[g + 1]]].astype(np.int64)
            if cap and len(arr) > cap:
                rng = np.random.default_rng(_stable_seed(seed, "cap", task, s_, t_))
                arr = np.sort(rng.permutation(arr)[:cap])
            comps.append(Component(task, s_, t_, arr))
        out[task] = comps
    return out


class MixturePlan(grain.MapDataset):
    """Random-access plan of the training stream: k -> PlanItem (infinite).

    components: task -> its directions (from `build_components`).
    segments: [(first example, {task: weight})], first example 0 first, increasing; weights
      of tasks absent from `components` must be 0.
    """

    def __init__(self, components: Mapping[str, Sequence[Component]],
                 segments: Sequence[tuple[int, Mapping[str, float]]], temperature: float = 1.0,
                 seed: int = 0):
        super().__init__([])
        if not segments or segments[0][0] != 0:
            raise ValueError("the first segment must start at example 0")
        starts = [s for s, _ in segments]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"segment starts must increase, got {starts}")
        self._tasks = [t for t in TASKS if components.get(t)]
        self._task_ids = [task_id(t) for t in self._tasks]
        self._dirs = []      # per task: list of (records, seed)
        self._dir_props = []  # per task: integer proportions over directions
        self.direction_probs: dict[str, dict[str, float]] = {}
        for t in self._tasks:
            comps = components[t]
            p = temperature_probs([len(c.records) for c in comps], temperature)
            self.direction_probs[t] = {c.direction: float(x) for c, x in zip(comps, p)}
            self._dir_props.append(_int_props(p))
            self._dirs.append([(c.records, _stable_seed(seed, t, c.src, c.tgt)) for c in comps])
        self._perm_cache: dict = {}
        self._starts = starts
        self._seg_props = []
        for start, weights in segments:
            unknown = set(weights) - set(TASKS)
            if unknown:
                raise ValueError(f"unknown task(s) {sorted(unknown)} in mixture weights")
            missing = [t for t, w in weights.items() if w > 0 and t not in self._tasks]
            if missing:
                raise ValueError(f"task(s) {missing} have weight > 0 from example {start} but no "
                                 f"usable records")
            self._seg_props.append(_int_props([weights.get(t, 0.0) for t in self._tasks]))
        # Per segment, how far each task's stream has advanced before it starts.
        self._offsets = [[0] * len(self._tasks)]
        for s in range(1, len(starts)):
            n = starts[s] - starts[s - 1]
            c = interleave_count(n, self._seg_props[s - 1])
            self._offsets.append([o + x for o, x in zip(self._offsets[-1], c)])

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"MixturePlan(tasks={self._tasks}, segments={self._starts})"

    def task_weights(self, k: int) -> dict[str, float]:
        s = int(np.searchsorted(self._starts, k, side="right")) - 1
        props = self._seg_props[s]
        return {t: p / sum(props) for t, p in zip(self._tasks, props)}

    def item(self, k: int) -> PlanItem:
        s = int(np.searchsorted(self._starts, k, side="right")) - 1
        ti, key = interleave_pick(k - self._starts[s], self._seg_props[s])
        key += self._offsets[s][ti]
        di, dkey = interleave_pick(key, self._dir_props[ti])
        records, seed = self._dirs[ti][di]
        epoch, pos = divmod(dkey, len(records))
        return PlanItem(key=k, task=self._task_ids[ti],
                        record=int(self._epoch_order(ti, di, epoch)[pos]))

    def _epoch_order(self, ti: int, di: int, epoch: int) -> np.ndarray:
        """The records of direction (ti, di) in the order of `epoch` (cached: the stream reads
        epochs in order, so one permutation per direction is kept)."""
        hit = self._perm_cache.get((ti, di))
        if hit is not None and hit[0] == epoch:
            return hit[1]
        records, seed = self._dirs[ti][di]
        order = records[np.random.default_rng([seed, epoch]).permutation(len(records))]
        self._perm_cache[(ti, di)] = (epoch, order)
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self.item(int(index))
