"""Inference CLI (`python -m esrt_jax.infer`): one-process path, edge-only / from-embeds split
(the two halves run apart and give the same output), file formats, mismatches, and loading a
run config + Orbax checkpoint."""

from __future__ import annotations

import base64
import json

import jax
import numpy as np
import pytest

from esrt_jax.cli import infer as cli
from esrt_jax.infer import payload as pl
from helpers_sllm import make_tiny_run, tiny_translator, write_tone

PAIRS = [("eng", "deu"), ("deu", "fra"), ("fra", "eng")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    (d / "audio").mkdir()
    lines = []
    for i, (s, t) in enumerate(PAIRS):
        write_tone(d / "audio" / f"u{i}.wav", 0.8 + 0.3 * i, 180.0 + 110 * i, seed=i)
        lines.append(json.dumps({"id": f"u{i}", "audio": f"audio/u{i}.wav", "src": s, "tgt": t}))
    (d / "set.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny():
    tr, tok, fp = tiny_translator(max_new_tokens=6, max_batch=4)
    return tr, fp


@pytest.fixture(scope="module")
def one_process(tiny, corpus):
    tr, _ = tiny
    utts = cli.utterances(jsonl=str(corpus / "set.jsonl"))
    return utts, cli.translate(tr, utts, batch_size=4)


def test_utterances_inputs(corpus):
    utts = cli.utterances(jsonl=str(corpus / "set.jsonl"))
    assert [(u.id, u.src, u.tgt) for u in utts] == [(f"u{i}", s, t) for i, (s, t) in enumerate(PAIRS)]
    assert utts[0].audio == str(corpus / "audio" / "u0.wav")
    one = cli.utterances(audio=[str(corpus / "audio" / "u1.wav")], src="ENG", tgt="zho")
    assert (one[0].id, one[0].src, one[0].tgt) == ("u1", "eng", "cmn")
    with pytest.raises(cli.InferError, match="needs --src and --tgt"):
        cli.utterances(audio=["a.wav"])
    with pytest.raises(cli.InferError, match="nothing to do"):
        cli.utterances()
    bad = corpus / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "audio": "a.wav", "src": "eng"}) + "\n")
    with pytest.raises(cli.InferError, match=r"bad.jsonl:1: .*tgt"):
        cli.utterances(jsonl=str(bad))


def test_edge_only_npz_then_from_embeds_is_exactly_the_one_process_output(tiny, corpus, one_process, tmp_path):
    tr, fp = tiny
    utts, want = one_process
    feats, segs = cli.encode_segments(tr, utts, 4)  # edge process
    # the tones (0.8-1.4 s) are longer than the tiny encoder's 0.64 s window: 2-3 segments each
    parts = [s.part for s in segs if s.id == "u2"]
    assert len(segs) == len(feats) > len(utts) and len(parts) >= 3 and parts == list(range(len(parts)))
    out = cli.write_embeds(tmp_path / "e.npz", feats, segs, fingerprint=fp, split=tr.split)
    got_feats, got_utts = cli.read_embeds(out, fingerprint=fp, split=tr.split, shape=tr.feature_shape)  # cloud
    assert np.array_equal(got_feats, feats) and got_utts == segs
    assert cli.join_segments(cli.decode_features(tr, got_feats, got_utts, 4), got_utts) == want
    assert all(r["transcription"] or r["translation"] for r in want)  # the tiny model does say something
    assert [len(r["segments"]) for r in want] == [sum(s.id == u.id for s in segs) for u in utts]


def test_edge_only_fp16_payloads_then_from_embeds(tiny, corpus, one_process, tmp_path):
    tr, fp = tiny
    utts, want = one_process
    feats, segs = cli.encode_segments(tr, utts, 4)
    out = cli.write_embeds(tmp_path / "e.jsonl", feats, segs, fingerprint=fp, split=tr.split, scheme="fp16")
    got_feats, got_utts = cli.read_embeds(out, fingerprint=fp, split=tr.split, shape=tr.feature_shape)
    assert np.array_equal(got_feats, feats.astype(np.float16).astype(np.float32))  # exact fp16 round trip
    assert got_utts == segs  # segment times and parts travel with the payloads
    got = cli.join_segments(cli.decode_features(tr, got_feats, got_utts, 4), got_utts)
    # The cloud decodes exactly what was sent; for this model fp16 rounding changes no token either.
    assert got == want
    lines = out.read_text().splitlines()
    assert len(lines) == len(segs) and base64.b64decode(json.loads(lines[0])["payload"]).startswith(pl.MAGIC)


def test_single_raw_payload_needs_languages(tiny, corpus, tmp_path):
    tr, fp = tiny
    utts = cli.utterances(audio=[str(write_tone(tmp_path / "u2.wav", 0.6, 400.0))], src="fra", tgt="eng")
    feats, segs = cli.encode_segments(tr, utts)
    assert len(segs) == 1 and (segs[0].start, segs[0].end) == (0.0, 0.6)  # within one window: all of it
    raw = cli.write_embeds(tmp_path / "u2.bin", feats, utts, fingerprint=fp, split=tr.split, scheme="int8",
                           compress=True)
    assert raw.read_bytes().startswith(pl.MAGIC)
    with pytest.raises(cli.InferError, match="pass --src and --tgt"):
        cli.read_embeds(raw, fingerprint=fp, split=tr.split, shape=tr.feature_shape)
    x, u = cli.read_embeds(raw, fingerprint=fp, split=tr.split, shape=tr.feature_shape, src="fra", tgt="eng")
    assert np.abs(x - feats).max() <= pl.error_bound(feats[0], "int8").max() + 1e-6
    assert cli.decode_features(tr, x, u)[0]["src"] == "fra"
    long_feats, long_segs = cli.encode_segments(tr, cli.utterances(audio=[str(corpus / "audio" / "u2.wav")],
                                                                   src="fra", tgt="eng"))
    with pytest.raises(cli.InferError, match=r"got \d+ segments"):
        cli.write_embeds(tmp_path / "long.bin", long_feats, long_segs, fingerprint=fp, split=tr.split)
    with pytest.raises(cli.InferError, match="holds one utterance"):
        cli.write_embeds(tmp_path / "two.bin", np.concatenate([feats, feats]), utts * 2, fingerprint=fp,
                         split=tr.split)


def test_from_embeds_rejects_files_for_another_model(tiny, corpus, one_process, tmp_path):
    tr, fp = tiny
    utts, _ = one_process
    feats = cli.encode_segments(tr, utts[:1])[0][:1]
    for name in ("a.jsonl", "a.npz"):
        f = cli.write_embeds(tmp_path / name, feats, utts[:1], fingerprint="feedfacefeedface", split=tr.split)
        with pytest.raises(cli.InferError, match="made by model"):
            cli.read_embeds(f, fingerprint=fp, split=tr.split, shape=tr.feature_shape)
    f = cli.write_embeds(tmp_path / "b.jsonl", feats[:, :-1], utts[:1], fingerprint=fp, split=tr.split)
    with pytest.raises(cli.InferError, match=r"b.jsonl:1: payload shape"):
        cli.read_embeds(f, fingerprint=fp, split=tr.split, shape=tr.feature_shape)
    rec = json.loads(cli.write_embeds(tmp_path / "c.jsonl", feats, utts[:1], fingerprint=fp,
                                      split=tr.split).read_text())
    blob = bytearray(base64.b64decode(rec["payload"]))
    blob[-9] ^= 1
    rec["payload"] = base64.b64encode(bytes(blob)).decode()
    (tmp_path / "c.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(cli.InferError, match=r"c.jsonl:1: payload checksum mismatch"):
        cli.read_embeds(tmp_path / "c.jsonl", fingerprint=fp, split=tr.split, shape=tr.feature_shape)
    (tmp_path / "d.jsonl").write_text('{"id": "x", "src": "eng", "tgt": "deu", "payload": "%%%"}\n')
    with pytest.raises(cli.InferError, match=r"d.jsonl:1: not an edge-features record"):
        cli.read_embeds(tmp_path / "d.jsonl", fingerprint=fp, split=tr.split, shape=tr.feature_shape)


# ----------------------------------------------------------------------------- config + checkpoint

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def test_load_model_restores_the_trained_params(trained_run):
    from flax import nnx

    from esrt_jax.speech.load import load_model
    from esrt_jax.train.restore import resolve_checkpoint

    cfg_path, run_dir, trained = trained_run
    assert resolve_checkpoint(run_dir)[1:] == ("srt", None)
    assert resolve_checkpoint(run_dir / "srt" / "checkpoints" / "5")[1:] == ("srt", 5)
    loaded = load_model(cfg_path, run_dir)
    assert (loaded.stage, loaded.step) == ("srt", 5)
    ours = nnx.to_pure_dict(nnx.state(loaded.model.adapter, nnx.Param))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(trained["adapter"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    untrained = load_model(cfg_path, None)
    assert untrained.step is None and untrained.fingerprint != loaded.fingerprint
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_model(cfg_path, cfg_path.parent)


def test_cli_main_edge_only_then_from_embeds(trained_run, corpus, tmp_path, capsys):
    cfg_path, run_dir, _ = trained_run
    base = ["--config", str(cfg_path), "--checkpoint", str(run_dir), "--batch-size", "4"]
    assert cli.main(base + ["--jsonl", str(corpus / "set.jsonl"), "--output", str(tmp_path / "one.jsonl")]) == 0
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["id"] for r in one] == ["u0", "u1", "u2"] and set(one[0]) >= {"transcription", "translation"}
    assert cli.main(base + ["--jsonl", str(corpus / "set.jsonl"), "--edge-only", str(tmp_path / "e.npz")]) == 0
    assert cli.main(base + ["--from-embeds", str(tmp_path / "e.npz"), "--output", str(tmp_path / "two.jsonl")]) == 0
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert two == one
    capsys.readouterr()
    assert cli.main(base + ["--from-embeds", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("encoder", ["seeded", "hf_dir", "hf_dir_trained"])
def test_edge_loads_only_encoder_and_adapter_and_matches_the_full_model(encoder, trained_run, tmp_path):
    from esrt_jax.edge import EdgeModel, load_edge
    from esrt_jax.speech.load import load_model, translator_for

    if encoder.startswith("hf_dir"):
        pytest.importorskip("torch")
        from helpers_sllm import save_tiny_whisper

        # hf_dir_trained: training tuned the encoder too, so the edge must take it from the checkpoint
        sets = ['train.trainable=["^encoder/", "^adapter/"]'] if encoder == "hf_dir_trained" else ()
        cfg_path, run_dir, _ = make_tiny_run(tmp_path, whisper_dir=save_tiny_whisper(tmp_path / "whisper"),
                                             overrides=sets)
    else:
        cfg_path, run_dir, _ = trained_run
    for split in ("qformer", "projector"):
        edge, fp = load_edge(cfg_path, run_dir, split=split)
        assert isinstance(edge, EdgeModel) and edge.split == split
        loaded = load_model(cfg_path, run_dir)
        tr = translator_for(loaded, split=split)
        assert fp == loaded.fingerprint
        mel = np.random.default_rng(1).standard_normal((3, 80, 64)).astype(np.float32)
        np.testing.assert_array_equal(edge.encode(mel), tr.encode(mel))
    if encoder != "seeded":  # no LLM params were built on the edge
        from flax import nnx

        names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(edge.state)}
        assert not any(n.startswith("llm") for n in names) and any(n.startswith("encoder") for n in names)


# ----------------------------------------------------------------------------- bad input, one line


def test_from_embeds_rejects_nonfinite_and_crafted_payloads(trained_run, corpus, tmp_path, capsys):
    """NaN features or a crafted header: a one-line error and exit 2, as the service answers 400."""
    import struct
    import zlib

    from esrt_jax.speech.load import translator_for

    from esrt_jax.speech.load import load_model

    cfg_path, run_dir, _ = trained_run
    loaded = load_model(cfg_path, run_dir)
    tr = translator_for(loaded)
    utts = cli.utterances(audio=[str(corpus / "audio" / "u0.wav")], src="eng", tgt="deu")
    feats = cli.encode_segments(tr, utts)[0][:1]
    good = cli.write_embeds(tmp_path / "g.bin", feats, utts, fingerprint=loaded.fingerprint,
                            split=tr.split).read_bytes()
    n = 2 * int(np.prod(tr.feature_shape))
    nan = good[:-4 - n] + np.full(n // 2, np.nan, np.float16).tobytes()
    (tmp_path / "nan.bin").write_bytes(nan + struct.pack("<I", zlib.crc32(nan)))
    _, _, hlen = struct.unpack_from("<6sHI", good)
    deep = b"[" * 50_000 + b"]" * 50_000  # RecursionError in json before the fix
    crafted = struct.pack("<6sHI", pl.MAGIC, pl.VERSION, len(deep)) + deep + good[12 + hlen:-4]
    (tmp_path / "deep.bin").write_bytes(crafted + struct.pack("<I", zlib.crc32(crafted)))
    npz = cli.write_embeds(tmp_path / "n.npz", np.full_like(feats, np.nan), utts, fingerprint=loaded.fingerprint,
                           split=tr.split)
    base = ["--config", str(cfg_path), "--checkpoint", str(run_dir)]
    for f, msg in (("nan.bin", "NaN or Inf"), ("deep.bin", "header"), (npz.name, "NaN or Inf")):
        capsys.readouterr()
        rc = cli.main(base + ["--from-embeds", str(tmp_path / f), "--src", "eng", "--tgt", "deu"])
        out = capsys.readouterr()
        assert rc == 2 and out.out == "", (f, out)
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (f, out.err)


@pytest.fixture(scope="module")
def langs_run(tmp_path_factory):
    """A run whose saved config (RUN_DIR/config.yaml, as train.py writes it) trained eng/deu/fra."""
    import yaml

    cfg_path, run_dir, trained = make_tiny_run(tmp_path_factory.mktemp("langs"),
                                               overrides=["data.languages=[eng, deu, fra]"])
    (run_dir / "config.yaml").write_text(cfg_path.read_text())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["languages"] == ["eng", "deu", "fra"]
    return cfg_path, run_dir


def test_untrained_languages_are_refused(langs_run, corpus, capsys):
    from esrt_jax.speech.load import load_backend, load_model

    cfg_path, run_dir = langs_run
    assert load_model(cfg_path, run_dir).languages == ("eng", "deu", "fra")
    assert load_backend(cfg_path, run_dir).languages == ("eng", "deu", "fra")
    base = ["--config", str(cfg_path), "--checkpoint", str(run_dir)]
    wav = str(corpus / "audio" / "u0.wav")
    capsys.readouterr()
    assert cli.main(base + ["--audio", wav, "--src", "eng", "--tgt", "jpn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not trained on tgt=jpn" in err[0] and "eng, deu, fra" in err[0]
    assert cli.main(base + ["--audio", wav, "--src", "eng", "--tgt", "fra"]) == 0


def test_cli_user_mistakes_are_one_line_errors(trained_run, tmp_path, capsys):
    cfg_path, run_dir, _ = trained_run
    wav = ["--audio", "x.wav", "--src", "eng", "--tgt", "deu"]
    cases = [
        (["--config", str(cfg_path), "--checkpoint", str(tmp_path / "nope")], "does not exist"),
        (["--config", str(cfg_path)[:-3] + "yml", "--checkpoint", str(run_dir)], f"did you mean {cfg_path}"),
        (["--config", str(cfg_path), "--checkpoint", str(run_dir), "--set", "model.adaptr.x=1"], "adaptr"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert cli.main(argv + wav) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)
    import shutil

    shutil.copytree(run_dir, tmp_path / "damaged")
    meta = tmp_path / "damaged" / "srt" / "checkpoints" / "5" / "params" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:40])
    capsys.readouterr()
    assert cli.main(["--config", str(cfg_path), "--checkpoint", str(tmp_path / "damaged")] + wav) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint step 5 in" in err[0] and "is unreadable" in err[0], err
    with pytest.raises(SystemExit) as e:  # no checkpoint: an explicit choice, not a silent default
        cli.main(["--config", str(cfg_path)] + wav)
    assert e.value.code == 2 and "--untrained" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert help_text.count("Inference CLI: audio in") == 1 and "--untrained" in help_text


def test_generation_cap_defaults_to_the_longest_trained_text(trained_run):
    """No max_new_tokens in the config: the cap is the largest data.text_buckets (greedy stops at EOS)."""
    from esrt_jax.speech.load import load_model, translator_for

    cfg_path, run_dir, _ = trained_run
    loaded = load_model(cfg_path, run_dir, ["model.infer.max_new_tokens=null", "data.text_buckets=[32, 80]"])
    assert translator_for(loaded).gen_cfg.max_new_tokens == 80
    assert translator_for(loaded, gen_overrides={"max_new_tokens": 7}).gen_cfg.max_new_tokens == 7
