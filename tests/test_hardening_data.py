"""Hardening (issue 29) of the data side: encoder-cache shards that are truncated or damaged are
named on open and rebuilt on rerun (3), a cut meta.json and a foreign cache are one-line errors
(17), the cache writer under a failing file system leaves only whole shards (chaos); the minimum
audio rule on every path (14); `--from-embeds` files with 0-d arrays or segments out of order (18);
empty decodes warn, an all-empty run exits with status 3, a checkpoint with NaN/Inf params is
refused, special tokens never reach a transcript (5)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import yaml

from esrt_jax import audio as A
from esrt_jax.data import encode_cache as ec
from esrt_jax.data.records import open_source
from esrt_jax.infer import batch as B
from helpers_fs import full_disk
from helpers_sllm import RUN_CONFIG, tiny_speech_llm, write_tone
from helpers_tokenizer import save_tiny_tokenizer

N = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("hdata")
    lines = []
    for i in range(N):
        wav = write_tone(d / f"u{i}.wav", 0.3 + 0.05 * i, 200 + 40 * i, seed=i)
        lines.append(json.dumps({"id": f"u{i}", "audio": str(wav), "src": "eng", "tgt": "deu",
                                 "asr": f"hello {i}", "s2tt": f"hallo {i}"}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(str(d / "train.jsonl"))
    model = tiny_speech_llm()
    load = ec.mel_loader(model.config.encoder, [src])
    keys = [str(k) for k in src.index().audio_key]
    ref = d / "ref"
    ec.build(model.encoder, keys, load, ref, shard_size=2, progress=False)
    return d, model, load, keys, ref


def _copy_cache(ref, dst):
    import shutil

    shutil.copytree(ref, dst)
    return dst


def _rows(cache_dir, keys):
    c = ec.FeatureCache(cache_dir)
    return {k: np.array(c[k]) for k in keys}


def test_truncated_shard_is_named_on_open_and_rebuilt_on_rerun(corpus, tmp_path, capsys):
    d, model, load, keys, ref = corpus
    c = _copy_cache(ref, tmp_path / "c")
    f = c / "shard-00001.npy"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(ec.CacheError, match="shard-00001.npy.*truncated") as e:
        ec.FeatureCache(c)
    assert len(str(e.value).splitlines()) == 1
    stats = ec.build(model.encoder, keys, load, c, shard_size=2, progress=False)
    assert stats == {"built": 1, "skipped": 2, "frames_added": 0, "rebuilt": 1}
    assert "shard-00001.npy" in capsys.readouterr().err
    want = _rows(ref, keys)
    assert all(np.array_equal(v, want[k]) for k, v in _rows(c, keys).items())


def test_damaged_shard_of_the_right_size_fails_its_checksum_on_rerun(corpus, tmp_path, capsys):
    d, model, load, keys, ref = corpus
    c = _copy_cache(ref, tmp_path / "c")
    f = c / "shard-00002.npy"
    raw = bytearray(f.read_bytes())
    raw[-7] ^= 0xFF
    f.write_bytes(bytes(raw))
    stats = ec.build(model.encoder, keys, load, c, shard_size=2, progress=False)
    assert stats["rebuilt"] == 1 and stats["built"] == 1
    assert "shard-00002.npy: checksum" in capsys.readouterr().err
    assert f.read_bytes() == (ref / "shard-00002.npy").read_bytes()


def test_cut_meta_json_and_foreign_cache_are_one_line_errors(corpus, tmp_path, capsys):
    d, model, load, keys, ref = corpus
    c = _copy_cache(ref, tmp_path / "c")
    meta = c / "meta.json"
    meta.write_bytes(meta.read_bytes()[:25])
    with pytest.raises(ec.CacheError, match="meta.json is damaged"):
        ec.FeatureCache(c)
    with pytest.raises(ec.CacheError, match="meta.json is damaged"):
        ec.build(model.encoder, keys, load, c, shard_size=2, progress=False)
    # train.py on a cache built by another encoder: one line, no traceback
    from esrt_jax.cli import train as run

    save_tiny_tokenizer(tmp_path / "tok", vocab_size=320)
    cfg = yaml.safe_load(RUN_CONFIG.format(run_dir=tmp_path / "runs", tok_dir=tmp_path / "tok"))
    cfg["data"].update(encoder_cache=str(ref), train=[str(d / "train.jsonl")])  # seed 0's, the config is seed 3
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        run.main(["--stage", "asr", "--config", str(tmp_path / "run.yaml"), "--compile-cache", ""])
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and msg.startswith("error: [asr] data.encoder_cache") and "rebuild" in msg, msg


def test_cache_build_on_a_full_disk_leaves_only_whole_shards(corpus, tmp_path, monkeypatch):
    """Chaos: the build's writes fail after various byte counts; every shard left is whole (the
    reader opens the cache or names a missing shard), no temporary is left, and a rerun with room
    gives the reference cache."""
    d, model, load, keys, ref = corpus
    shard = (ref / "shard-00000.npy").stat().st_size
    rng = np.random.default_rng(0)
    budgets = [0, 100, shard // 2, shard + 300, 2 * shard + 700] + list(rng.integers(0, 3 * shard, 3))
    for n, budget in enumerate(budgets):
        c = tmp_path / f"c{n}"
        with monkeypatch.context() as m:
            full_disk(m, int(budget))
            with pytest.raises(ec.CacheError, match="no space left on device"):
                ec.build(model.encoder, keys, load, c, shard_size=2, progress=False)
        assert not list(c.glob(".tmp-*")), budget
        if (c / "meta.json").is_file() and (c / "keys.json").is_file():
            meta = json.loads((c / "meta.json").read_text())
            assert all(ec.shard_problem(c, meta, i, checksum=True) is None
                       for i in range(meta["shards"]) if (c / f"shard-{i:05d}.npy").exists()), budget
        ec.build(model.encoder, keys, load, c, shard_size=2, progress=False)
        want = _rows(ref, keys)
        assert all(np.array_equal(v, want[k]) for k, v in _rows(c, keys).items()), budget


# ----------------------------------------------------------------------------- minimum audio (14)

def _wav(path, x):
    sf.write(str(path), np.asarray(x, np.float32), 16000, subtype="PCM_16")
    return path


@pytest.mark.parametrize("segment", [True, False])
def test_silence_and_too_short_audio_are_refused_with_and_without_segmentation(tmp_path, segment):
    silent = _wav(tmp_path / "silent.wav", np.zeros(5 * 16000))
    one = _wav(tmp_path / "one.wav", [0.5])
    short = write_tone(tmp_path / "short.wav", 0.05, 300)
    ok = write_tone(tmp_path / "ok.wav", 0.4, 300)
    with pytest.raises(A.AudioError, match="silent.wav: no speech found"):
        A.mel_segments(silent, 80, 64, segment=segment)
    for f in (one, short):
        with pytest.raises(A.AudioError, match=f"{f.name}: audio is .* ms long, shorter than the 100 ms minimum"):
            A.mel_segments(f, 80, 64, segment=segment)
    assert A.mel_segments(ok, 80, 64, segment=segment)[0].shape == (1, 80, 64)


def test_minimum_audio_rule_on_the_edge_and_the_one_window_front_end(tmp_path):
    from esrt_jax.edge import EdgeEncoder, EdgeModel
    from esrt_jax.models.speech_llm import EdgeHalf

    m = tiny_speech_llm()
    edge = EdgeEncoder(EdgeModel(EdgeHalf(m.config, m.encoder, m.adapter)), "f" * 16)
    silent = _wav(tmp_path / "silent.wav", np.zeros(5 * 16000))
    short = write_tone(tmp_path / "short.wav", 0.05, 300)
    for f, msg in ((silent, "no speech found"), (short, "shorter than")):
        for seg in (True, False):
            with pytest.raises(A.AudioError, match=msg):
                edge.segments(f, segment=seg)
        with pytest.raises(A.AudioError, match=msg):
            edge.mel(f)
        with pytest.raises(A.AudioError, match=msg):
            A.mel_from_file(f, 80, 64)


def test_infer_no_segment_on_silence_is_an_error(tmp_path, capsys):
    from esrt_jax.cli.infer import main
    from helpers_sllm import make_tiny_run

    cfg, run, _ = make_tiny_run(tmp_path)
    silent = _wav(tmp_path / "silent.wav", np.zeros(5 * 16000))
    for extra in ([], ["--no-segment"]):
        rc = main(["--config", str(cfg), "--checkpoint", str(run), "--audio", str(silent), "--src", "eng",
                   "--tgt", "deu"] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("error: ") and "silent" in err[-1], (extra, err)


# ----------------------------------------------------------------------------- --from-embeds (18)

def _utt(i, part, start, end, audio=None):
    return B.Utterance(f"r{i}", audio or f"r{i}.wav", "eng", "deu", start=start, end=end, part=part)


def test_zero_d_arrays_in_an_edge_only_npz_are_a_one_line_error(tmp_path):
    utts = [_utt(0, 0, 0.0, 1.0)]
    p = B.write_embeds(tmp_path / "f.npz", np.zeros((1, 6, 64), np.float32), utts, fingerprint="f" * 16,
                       split="projector")
    z = dict(np.load(p))
    z["ids"] = np.array("r0")  # 0-d
    np.savez(p, **z)
    with pytest.raises(B.InferError, match="ids must be a 1-d array"):
        B.read_embeds(p, fingerprint="f" * 16, split="projector", shape=(6, 64))


def test_segments_out_of_order_are_refused_not_joined(tmp_path):
    rows = lambda us: [{"id": u.id, "audio": u.audio, "src": u.src, "tgt": u.tgt, "transcription": f"t{u.part}",
                        "translation": f"x{u.part}", "start": u.start, "end": u.end} for u in us]  # noqa: E731
    a0, a1, a2 = _utt(0, 0, 0.0, 2.0), _utt(0, 1, 2.0, 4.0), _utt(0, 2, 4.0, 5.0)
    b0, b1 = _utt(1, 0, 0.0, 2.0), _utt(1, 1, 2.0, 3.0)
    good = [a0, a1, a2, b0, b1]
    out = B.join_segments(rows(good), good)
    assert [r["transcription"] for r in out] == ["t0 t1 t2", "t0 t1"]
    for bad, what in (([a1, a0, a2], "before its part 0"), ([a0, a2, a1], "follows segment 0"),
                      ([a0, b0, a1, b1], "follows segment 0 of r1")):
        with pytest.raises(B.InferError, match=what):
            B.join_segments(rows(bad), bad)


def test_empty_decodes_warn_and_an_all_empty_run_is_an_error():
    """Item 5: an empty text warns (a recording's, or one segment's among others); a run in which
    every output is empty is one error line and exit status 3 on both command lines."""
    from esrt_jax.infer.longform import EMPTY_RC, empty_decodes

    seg = lambda a, b, tr, tl: {"start": a, "end": b, "transcription": tr, "translation": tl}  # noqa: E731
    res = [{"id": "a", "audio": "a.wav", "transcription": "hi", "translation": ""},
           {"id": "b", "audio": "b.wav", "transcription": "", "translation": "hallo welt",
            "segments": [seg(0.0, 2.0, "", "hallo"), seg(2.0, 4.5, "", "welt"), seg(4.5, 5.0, "", " ")]}]
    assert empty_decodes(res, "translation") == (
        ["warning: a.wav: the model decoded an empty translation",
         "warning: b.wav: segment 2 (4.5-5.0 s) decoded an empty translation"], None)
    assert empty_decodes(res, "transcription") == (["warning: b.wav: the model decoded an empty transcription"], None)
    allempty = [{"id": "x", "transcription": " ", "translation": "t"},
                {"id": "y", "transcription": "", "translation": ""}]
    warns, err = empty_decodes(allempty, "transcription")
    assert warns == [] and err == ("error: the model decoded an empty transcription for every input (2 of 2): "
                                   "damaged or untrained weights? (exit status 3)") and EMPTY_RC == 3
    assert empty_decodes([], "translation") == ([], None)  # no output at all is not this error


def _damaged_run(tmp_path, damage):
    """A tiny run whose trainable set also holds the LLM's final norm, plus a step 6 with
    `damage(trained)` applied. -> (config, run dir)."""
    from esrt_jax.train.checkpoint import Checkpointer
    from helpers_sllm import make_tiny_run

    cfg, run, trained = make_tiny_run(tmp_path, overrides=["train.trainable=[adapter, llm/norm/scale]"])
    ck = Checkpointer(run / "srt" / "checkpoints", async_save=False)
    ck.save(6, damage(trained), {"count": np.zeros((), np.int32)})
    ck.close()
    return cfg, run


def test_infer_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    """Item 5 on a trained run's Orbax checkpoint: NaN/Inf params are one line naming the step
    folder and the first bad param (today: loaded, every answer empty)."""
    from esrt_jax.cli.infer import main

    def nan_norm(t):
        t["llm"]["norm"]["scale"] = t["llm"]["norm"]["scale"].at[3].set(np.inf)
        return t
    cfg, run = _damaged_run(tmp_path, nan_norm)
    wav = str(write_tone(tmp_path / "a.wav", 0.5, 300))
    rc = main(["--config", str(cfg), "--checkpoint", str(run), "--audio", wav, "--src", "eng", "--tgt", "deu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f"error: checkpoint {run / 'srt' / 'checkpoints'}/6: param llm/norm/scale holds "
                               f"NaN or Inf values (damaged weights); pass an earlier step dir "
                               f"{run / 'srt' / 'checkpoints'}/<step>"), err
    step5 = run / "srt" / "checkpoints" / "5"  # the earlier step it names serves
    rc = main(["--config", str(cfg), "--checkpoint", str(step5), "--audio", wav, "--src", "eng", "--tgt", "deu"])
    assert rc in (0, 3)


def test_infer_exits_3_when_the_model_decodes_nothing(tmp_path, capsys):
    """Item 5 end to end, and special tokens never reach a transcript: a zero final LLM norm makes
    every logit equal, so the tiny model emits token 0 (`<pad>`) at every step; with the tokenizer's
    pad set to `<unk>`, that `<pad>` is a special token the model emitted, not padding. Before: printed
    as the text ('<pad><pad>...', rc 0). Now: special tokens are dropped, every answer is empty -> one
    error line, rc 3, and the (empty) results still printed and written."""
    from esrt_jax.cli.infer import main

    def zero_norm(t):
        t["llm"]["norm"]["scale"] = t["llm"]["norm"]["scale"] * 0
        return t
    cfg, run = _damaged_run(tmp_path, zero_norm)
    tc = tmp_path / "tok" / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "pad_token": "<unk>"}))
    wavs = [str(write_tone(tmp_path / f"a{i}.wav", 0.5, 300 + 50 * i, seed=i)) for i in range(2)]
    for task, key in (("srt", "translation"), ("asr", "transcription")):
        out = tmp_path / f"{task}.jsonl"
        rc = main(["--config", str(cfg), "--checkpoint", str(run), "--audio", *wavs, "--src", "eng", "--tgt", "deu",
                   "--task", task, "--output", str(out)])
        stdout, err = capsys.readouterr()
        assert "<pad>" not in stdout, stdout
        assert rc == 3 and err.strip() == (f"error: the model decoded an empty {key} for every input (2 of 2): "
                                           f"damaged or untrained weights? (exit status 3)"), err
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["audio"] for r in rows] == wavs and all(r[key] == "" for r in rows) and len(stdout.splitlines()) == 2


def test_answer_text_drops_special_tokens_and_keeps_language_tags():
    """The decoded answer: pad, BOS/EOS/unk and any added special token are dropped; a language tag
    stays even where the tokenizer marks it special (the SRT split reads it)."""
    from esrt_jax.data.tasks import TaskTokenizer
    from helpers_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(320)
    tok.add_tokens(["<|eng|>"], special_tokens=True)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tt = TaskTokenizer(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    ids = enc("hello") + tok.convert_tokens_to_ids(["<s>", "<unk>", "<end_of_turn>", "<|eng|>", "<pad>"]) + enc("world")
    assert tt.answer_text(ids).replace(" ", "") == "hello<|eng|>world"


def test_exit_status_of_empty_decodes_is_in_the_help(capsys):
    from esrt_jax.cli import edge as edge_cli
    from esrt_jax.cli import infer as infer_cli

    for main, want in ((infer_cli.parse_args, "when every output of the run is empty the command exits with status 3"),
                       (edge_cli.main, "3 every translation came back empty")):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert want in out, out
