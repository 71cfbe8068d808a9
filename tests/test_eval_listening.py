"""The listening diagnostic (esrt_jax.eval.listening) catches a model that ignores its speech input.

A tiny speech LLM (tests/helpers_sllm.py) is trained for a few seconds to transcribe 4 fixed
"utterances" (distinct random log-mel patterns). Decoded through `decode_to_file` and scored
by `eval.py --score` (which picks up the swapped-audio decode), the connected model shows a
large audio gain and one distinct output per clip; the same weights with the adapter output
zeroed (the speech disconnected) show no audio gain and one output for every clip.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest
from flax import nnx

from helpers_sllm import tiny_speech_llm
from helpers_tokenizer import tiny_tokenizer

TEXTS = ("hello world", "the quick brown fox", "numbers one two three", "tiny tokenizer for tests")
FRAMES = 64  # the tiny encoder's num_frames


def _mels() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(len(TEXTS), 80, FRAMES)).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """(translator, disconnected translator) after 250 steps of ASR on the 4 clips."""
    import copy

    import optax

    from esrt_jax.data.tasks import TaskTokenizer, collate
    from esrt_jax.infer.generate import GenerateConfig
    from esrt_jax.infer.translator import Translator
    from esrt_jax.models import speech_llm
    from esrt_jax.train.bundle import split_nnx
    from esrt_jax.train.step import make_train_step

    model = copy.deepcopy(tiny_speech_llm(0))
    tok = tiny_tokenizer(vocab_size=320)
    tt = TaskTokenizer(tok)
    batch = collate([tt.encode("asr", "eng", "eng", t) for t in TEXTS], (32,), tt.pad_id)
    batch = {k: batch[k][None] for k in ("tokens", "loss_mask", "attention_mask")}
    batch["mel"] = _mels()[None]
    bundle, graphdef = split_nnx(model, ("^adapter/", "^llm/"),
                                 lambda m, b, r: speech_llm.loss_fn(m, b, dropout_rng=r))
    opt = optax.adam(5e-3)
    step = jax.jit(make_train_step(bundle.loss_fn, opt))
    params, state = bundle.trainable, opt.init(bundle.trainable)
    for i in range(250):
        params, state, metrics = step(params, state, bundle.frozen, batch, jax.random.key(i))
    assert float(metrics["loss"]) < 0.05, float(metrics["loss"])
    st = nnx.state(model)
    nnx.replace_by_pure_dict(st, _merge(params, bundle.frozen))
    nnx.update(model, st)
    gen = GenerateConfig(max_new_tokens=24, eos_ids=(tt.eos_id,), pad_id=tt.pad_id)
    tr = Translator(model, tok, gen_cfg=gen, max_batch=4, prompt_buckets=(16,))
    deaf = copy.deepcopy(model)
    proj = nnx.state(deaf.adapter, nnx.Param)
    nnx.update(deaf.adapter, jax.tree.map(jax.numpy.zeros_like, proj))  # adapter output 0: speech cut off
    return tr, Translator(deaf, tok, gen_cfg=gen, max_batch=4, prompt_buckets=(16,))


def _merge(a: dict, b: dict) -> dict:
    out = dict(b)
    for k, v in a.items():
        out[k] = _merge(v, b[k]) if isinstance(v, dict) and isinstance(b.get(k), dict) else v
    return out


def _diagnose(tr, tmp_path) -> dict:
    """decode real + swapped audio, score with eval.py's scorer; summary.json's listening block."""
    from esrt_jax.cli import eval as cli
    from esrt_jax.eval import listening
    from esrt_jax.eval.decode import EvalItem, decode_to_file

    items = [EvalItem(i + 1, f"u{i}", f"u{i}.wav", f"u{i}.wav", "eng", "eng", t, "") for i, t in enumerate(TEXTS)]
    mel = {it.path: m for it, m in zip(items, _mels())}
    partners = listening.swap_partners([it.path for it in items], [it.src for it in items], [it.transcription for it in items])
    assert sorted(partners.values()) == sorted(mel) and all(partners[p] != p for p in mel)
    results = tmp_path / "results.jsonl"
    decode_to_file(tr, items, results, task="asr", progress=False, fingerprint="test", mel_fn=mel.__getitem__)
    decode_to_file(tr, items, listening.swapped_path(results), task="asr", progress=False, fingerprint="test",
                   mel_fn=lambda p: mel[partners[p]])
    assert cli.run_score(argparse.Namespace(score=str(results), out=str(tmp_path / "scores"), compare=None)) == 0
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert "listening" in (tmp_path / "scores" / "table.md").read_text().lower()
    return summary["listening"]


def test_listening_model_has_audio_gain_and_distinct_outputs(trained, tmp_path):
    li = _diagnose(trained[0], tmp_path)
    assert li["wer"] < 20, li
    assert li["wer_gain"] > 50, li
    assert li["distinct_share"] == 1.0, li
    assert li["examples"] and all(e["hyp"] == e["ref"] != e["swapped"] for e in li["examples"])


def test_disconnected_speech_is_caught(trained, tmp_path):
    li = _diagnose(trained[1], tmp_path)
    assert abs(li["wer_gain"]) < 1e-6, li
    assert li["distinct_share"] == 1 / len(TEXTS), li


def test_swap_partners_avoid_the_same_sentence():
    from esrt_jax.eval.listening import swap_partners

    # One sentence by two voices, then another: the partner is never the same sentence.
    paths = ["a-m", "a-f", "b-m", "b-f", "x-deu"]
    src = ["eng", "eng", "eng", "eng", "deu"]
    text = ["A.", "a", "B.", "b", "x"]  # the same sentence after Whisper's normaliser
    p = swap_partners(paths, src, text)
    assert {p["a-m"], p["a-f"]} <= {"b-m", "b-f"} and {p["b-m"], p["b-f"]} <= {"a-m", "a-f"}
    assert p["x-deu"] == "x-deu"  # alone in its language


def test_swap_rule():
    """One rule for every swapped-speech check (dev loss, dev decodes, eval): half the group away,
    skipping rows with the same reference; padding rows (None) and lone rows keep their own."""
    from esrt_jax.pytree import swap_partners, swap_rows

    assert swap_partners(list("abcdef")).tolist() == [3, 4, 5, 0, 1, 2]
    assert swap_partners(["a", "b"]).tolist() == [1, 0]
    assert swap_partners(["a", "b", "a", "a"]).tolist() == [1, 3, 1, 1]  # never onto an "a"
    assert swap_partners(["a", "a", "a"]).tolist() == [1, 2, 0]           # nothing differs: still another row
    assert swap_partners(["x", None, "y", None]).tolist() == [2, 1, 0, 3]
    assert swap_partners(["x", "y", "z"], groups=["eng", "deu", "eng"]).tolist() == [2, 1, 0]
    rng = np.random.default_rng(0)
    for _ in range(50):
        refs = [int(r) for r in rng.integers(0, 4, rng.integers(1, 12))]
        p = swap_partners(refs)
        for i, k in enumerate(p):
            assert refs[k] != refs[i] or len(set(refs)) == 1, (refs, p)
            assert k != i or len(refs) == 1, (refs, p)
    batch = {"mel": np.arange(3)[:, None] * np.ones((3, 2)), "tokens": np.arange(3)}
    out = swap_rows(batch, ("mel",), swap_partners(["p", "q", "r"]))
    assert out["mel"][:, 0].tolist() == [1, 2, 0] and out["tokens"] is batch["tokens"]
    with pytest.raises(ValueError, match="3 references but 2 groups"):
        swap_partners(["a", "b", "c"], groups=["eng", "eng"])


def test_distinct_share_is_at_most_one():
    """More distinct outputs than references (one sentence in two voices decoded two ways) is a
    share of 1, not above it, and one direction's excess cannot hide another's collapse."""
    from esrt_jax.eval.listening import Listening
    from esrt_jax.metrics import distinct_share

    assert distinct_share(33, 32) == 1.0 and distinct_share(1, 4) == 0.25 and distinct_share(0, 0) == 0.0
    li = Listening(distinct={("nld", "eng"): (8, 8, 4), ("nld", "deu"): (8, 1, 4)},
                   bleu=None, wer=None, bleu_swapped=None, wer_swapped=None)
    assert li.distinct_share(("nld", "eng")) == 1.0 and li.distinct_share(("nld", "deu")) == 0.25
    assert li.distinct_share() == (4 + 1) / 8
