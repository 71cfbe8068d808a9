"""eval.py decode mode: test records -> results.jsonl (public ESRT schema) with a tiny random speech
LLM: each audio encoded once for all its targets, bad records reported by line and skipped, an
interrupted decode resumes to a byte-identical file, mismatched settings refused, CLI decode +
scoring from a run config + Orbax checkpoint."""

from __future__ import annotations

import collections
import io
import json

import pytest

from esrt_jax.audio import mel_from_file
from esrt_jax.cli import eval as cli
from esrt_jax.eval import decode as dec
from esrt_jax.eval.results import RESULT_FIELDS, read_results
from esrt_jax.infer.generate import GenerateConfig
from esrt_jax.infer.translator import Translator
from helpers_sllm import tiny_speech_llm, write_tone
from helpers_tokenizer import tiny_tokenizer

# (utterance, source, targets): 4 utterances, 9 (utterance, target) records.
UTTS = [("u0", "eng", ["deu", "fra", "spa"]), ("u1", "deu", ["eng", "fra", "spa"]),
        ("u2", "fra", ["eng", "deu"]), ("u3", "spa", ["eng"])]
N_GOOD = 9


def _lines(d):
    out = []
    for i, (u, s, tgts) in enumerate(UTTS):
        for t in tgts:
            out.append(json.dumps({"id": f"{u}-{t}", "audio": f"audio/{u}.wav", "src": s, "tgt": t,
                                   "asr": f"words of {u}", "s2tt": f"translation of {u} into {t}"}))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldec")
    (d / "audio").mkdir()
    for i, (u, _, _) in enumerate(UTTS):
        write_tone(d / "audio" / f"{u}.wav", 0.3 + 0.1 * i, 200.0 + 90 * i, seed=i)  # within 0.64 s
    good = _lines(d)
    (d / "test.jsonl").write_text("\n".join(good) + "\n")
    bad = good[:2] + [
        "{not json",                                                                   # line 3
        json.dumps({"id": "m", "audio": "audio/missing.wav", "src": "eng", "tgt": "deu", "asr": "x"}),
        json.dumps({"id": "k", "audio": "audio/u0.wav", "src": "eng", "tgt": "xx1", "asr": "x"}),
        json.dumps({"id": "n", "audio": "audio/u0.wav", "src": "eng", "asr": "x"}),     # no tgt
        good[0],                                                                      # duplicate id
        json.dumps({"id": "s", "audio": "audio/u0.wav", "src": "eng", "tgt": "eng", "asr": "x"}),
        json.dumps({"id": "c", "audio": "audio/corrupt.wav", "src": "deu", "tgt": "eng", "asr": "x"}),
    ]
    (d / "audio" / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt not really a wav file")
    (d / "bad.jsonl").write_text("\n".join(bad) + "\n")
    return d


def _translator(max_new_tokens=5, max_batch=2):
    tok = tiny_tokenizer(vocab_size=320)
    gen = GenerateConfig(max_new_tokens=max_new_tokens, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    return Translator(tiny_speech_llm(0), tok, gen_cfg=gen, max_batch=max_batch, prompt_buckets=(16, 32))


@pytest.fixture(scope="module")
def tiny():
    return _translator()


class Counting:
    """Wraps a translator: counts mel loads per audio path and utterances encoded."""

    def __init__(self, tr):
        self.tr, self.loads, self.encoded = tr, collections.Counter(), 0
        enc = tr.config.encoder  # one window: the tones fit the tiny encoder's 0.64 s
        self.mel_fn = lambda path: mel_from_file(path, enc.num_mel_bins, enc.num_frames)[0]

    def mel(self, path):
        self.loads[path] += 1
        return self.mel_fn(path)

    def __getattr__(self, name):
        return getattr(self.tr, name)

    def encode(self, mel):
        self.encoded += mel.shape[0]
        return self.tr.encode(mel)


def _decode(tr, items, path, **kw):
    c = Counting(tr)
    stats = dec.decode_to_file(c, items, path, batch=2, progress=False, mel_fn=c.mel, **kw)
    return c, stats


def test_read_items_selection_and_bad_records(corpus):
    items, issues = dec.read_items(corpus / "test.jsonl")
    assert [it.id for it in items] == [f"{u}-{t}" for u, _, ts in UTTS for t in ts] and not issues
    assert items[0].prompt("srt") == "<|eng|><|deu|>" and items[0].audio == "audio/u0.wav"
    assert items[0].path == str(corpus / "audio" / "u0.wav")

    items, issues = dec.read_items(corpus / "bad.jsonl")
    assert [it.id for it in items] == ["u0-deu", "u0-fra", "c"]  # corrupt audio is found at encode time
    got = {(i.line, i.kind) for i in issues}
    assert got == {(3, "malformed_json"), (4, "missing_audio"), (5, "unknown_language"),
                   (6, "missing_field"), (7, "duplicate"), (8, "same_language")}
    msg = {i.line: i.message for i in issues}
    assert "missing.wav does not exist" in msg[4] and "xx1" in msg[5] and "tgt" in msg[6]
    assert "already on line 1" in msg[7]
    text = dec.summarize_issues(issues, "bad.jsonl")
    assert text.startswith("6 record(s) skipped (") and "bad.jsonl:3: not valid JSON" in text

    only = dec.read_items(corpus / "test.jsonl", src="eng,deu", tgt="fra")[0]
    assert [it.id for it in only] == ["u0-fra", "u1-fra"]
    langs = dec.read_items(corpus / "test.jsonl", langs=["eng", "deu"])[0]
    assert [it.id for it in langs] == ["u0-deu", "u1-eng"]
    lim = dec.read_items(corpus / "test.jsonl", limit=1, tgt="eng")[0]
    assert [it.id for it in lim] == ["u1-eng", "u2-eng", "u3-eng"]
    asr = dec.read_items(corpus / "test.jsonl", task="asr")[0]
    assert [(it.id, it.src, it.tgt, it.prompt("asr")) for it in asr] == [
        ("u0-deu", "eng", "eng", "<|eng|>"), ("u1-eng", "deu", "deu", "<|deu|>"),
        ("u2-eng", "fra", "fra", "<|fra|>"), ("u3-eng", "spa", "spa", "<|spa|>")]
    with pytest.raises(Exception, match="unknown language code 'klingon'"):
        dec.read_items(corpus / "test.jsonl", src="klingon")
    with pytest.raises(dec.DecodeError, match="does not exist"):
        dec.read_items(corpus / "nope.jsonl")


def test_plan_groups_records_by_audio(corpus):
    items, _ = dec.read_items(corpus / "test.jsonl")
    plan = dec.plan_chunks(items, 2)
    assert [[p.rsplit("/", 1)[-1] for p in paths] for paths, _ in plan] == [["u0.wav", "u1.wav"],
                                                                             ["u2.wav", "u3.wav"]]
    assert [idx for _, idx in plan] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]


@pytest.fixture(scope="module")
def full_run(tiny, corpus, tmp_path_factory):
    items, _ = dec.read_items(corpus / "test.jsonl")
    path = tmp_path_factory.mktemp("full") / "results.jsonl"
    c, stats = _decode(tiny, items, path)
    return items, path, c, stats


def test_each_audio_encoded_once_and_results_schema(full_run):
    items, path, c, stats = full_run
    assert set(c.loads.values()) == {1} and len(c.loads) == 4  # 4 utterances, 9 records
    assert c.encoded == 4 and stats.audio_encoded == 4
    assert (stats.selected, stats.decoded, stats.already_done, stats.failed) == (N_GOOD, N_GOOD, 0, 0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == N_GOOD and all(tuple(r) == RESULT_FIELDS for r in rows)
    assert [r["id"] for r in rows] == [it.id for it in items]
    r = rows[0]
    assert (r["audio"], r["prompt"], r["src"], r["tgt"], r["asr"], r["s2tt"]) == (
        "audio/u0.wav", "<|eng|><|deu|>", "eng", "deu", "words of u0", "translation of u0 into deu")
    from esrt_jax.data.tasks import split_srt_output
    for row in rows:
        assert (row["asr_r"], row["s2tt_r"]) == split_srt_output(row["response"], row["src"], row["tgt"])
    meta = json.loads(dec.meta_path(path).read_text())
    assert meta["task"] == "srt" and meta["generate"]["max_new_tokens"] == 5 and len(meta["fingerprint"]) == 16
    # the same record decoded alone gives the same text (rows are independent of their batch mates)
    tr = c.tr
    alone = tr.decode(tr.encode(c.mel_fn(items[4].path)[None]), [items[4].src], [items[4].tgt])[0]
    assert alone["response"] == rows[4]["response"]


class Stop(Exception):
    pass


def test_interrupted_decode_resumes_to_the_same_file(tiny, full_run, tmp_path):
    items, full_path, _, _ = full_run
    path = tmp_path / "results.jsonl"
    calls = []

    def stop_after_two(n):
        calls.append(n)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        _decode(tiny, items, path, on_batch=stop_after_two)
    assert len(path.read_text().splitlines()) == 4
    # a kill in the middle of the next write leaves half a line
    partial = full_path.read_text().splitlines()[4]
    with open(path, "a") as f:
        f.write(partial[:37])
    log = io.StringIO()
    c, stats = _decode(tiny, items, path, log=log)
    assert "dropped an incomplete last line (line 5, 37 bytes)" in log.getvalue()
    assert (stats.already_done, stats.decoded) == (4, N_GOOD - 4)
    assert path.read_bytes() == full_path.read_bytes()
    # every utterance of a chunk with work left is encoded once in this run; done chunks not at all
    assert c.encoded == 4 and set(c.loads.values()) == {1}
    # nothing left: a rerun decodes and encodes nothing
    c, stats = _decode(tiny, items, path)
    assert (stats.already_done, stats.decoded, c.encoded) == (N_GOOD, 0, 0) and stats.complete
    assert path.read_bytes() == full_path.read_bytes()

    # the first chunk done, the second not: only its two utterances are loaded and encoded
    lines = full_path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]))
    c, stats = _decode(tiny, items, path)
    assert sorted(p.rsplit("/", 1)[-1] for p in c.loads) == ["u2.wav", "u3.wav"] and c.encoded == 2
    assert path.read_bytes() == full_path.read_bytes()


def test_resume_refuses_other_settings(full_run, tmp_path):
    items, full_path, _, _ = full_run
    path = tmp_path / "results.jsonl"
    path.write_bytes(full_path.read_bytes()[:200])
    dec.meta_path(path).write_bytes(dec.meta_path(full_path).read_bytes())
    other = _translator(max_new_tokens=3)
    with pytest.raises(dec.DecodeError, match=r"other settings \(generate: .*max_new_tokens"):
        _decode(other, items, path)
    with pytest.raises(dec.DecodeError, match="other settings"):
        _decode(_translator(), items, path, task="asr")
    c, stats = _decode(other, items, path, overwrite=True)
    assert stats.already_done == 0 and stats.decoded == N_GOOD
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == N_GOOD
    (tmp_path / "x.jsonl").write_text(path.read_text())
    with pytest.raises(dec.DecodeError, match="has no x.decode.json"):
        _decode(other, items, tmp_path / "x.jsonl")


def test_unreadable_audio_is_reported_and_skipped(tiny, corpus, tmp_path):
    items, issues = dec.read_items(corpus / "bad.jsonl")
    c, stats = _decode(tiny, items, tmp_path / "r.jsonl")
    assert (stats.decoded, stats.failed) == (2, 1)
    assert [(i.line, i.kind) for i in stats.issues] == [(9, "bad_audio")]
    assert "corrupt.wav" in stats.issues[0].message
    assert [json.loads(x)["id"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ["u0-deu", "u0-fra"]


def test_asr_and_smt_tasks(tiny, corpus, tmp_path):
    items, _ = dec.read_items(corpus / "test.jsonl", task="asr")
    c, stats = _decode(tiny, items, tmp_path / "asr.jsonl", task="asr")
    rows = [json.loads(x) for x in (tmp_path / "asr.jsonl").read_text().splitlines()]
    assert c.encoded == 4 and len(rows) == 4 and all(r["src"] == r["tgt"] and r["s2tt"] == "" for r in rows)
    assert all(r["asr_r"] == r["response"].strip() for r in rows)
    rf = read_results(tmp_path / "asr.jsonl")
    assert len(rf.records) == 4 and all(r.asr_ref is not None and r.ref is None for r in rf.records)

    items, _ = dec.read_items(corpus / "test.jsonl", task="smt", src="eng")
    _decode(tiny, items, tmp_path / "smt.jsonl", task="smt")
    rows = [json.loads(x) for x in (tmp_path / "smt.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["words of u0<|eng|><|deu|>", "words of u0<|eng|><|fra|>",
                                          "words of u0<|eng|><|spa|>"]
    assert all(r["asr_r"] is None for r in rows)
    rf = read_results(tmp_path / "smt.jsonl")
    assert all(r.hyp is not None and r.asr_hyp is None for r in rf.records)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run config and an srt checkpoint (trained params = seeded init + a nudge)."""
    from helpers_sllm import make_tiny_run

    cfg_path, run_dir, _ = make_tiny_run(tmp_path_factory.mktemp("evalrun"), overrides=[
        "model.infer.max_new_tokens=5", "data.languages=[eng, deu, fra]"])
    return cfg_path, run_dir


def test_cli_decodes_resumes_and_scores(run, corpus, capsys):
    cfg_path, run_dir = run
    base = ["--config", str(cfg_path), "--checkpoint", str(run_dir), "--data", str(corpus / "bad.jsonl"),
            "--batch", "2", "--no-progress"]
    assert cli.main(base) == 0
    out = capsys.readouterr()
    # languages default to the config's data.languages (eng, deu, fra): 2 of bad.jsonl's records
    assert "languages: eng,deu,fra (the run config's data.languages" in out.err
    assert "bad.jsonl:3: not valid JSON" in out.err and "bad.jsonl:9: cannot load audio" in out.err
    assert "decoded 2 records (0 already done, 1 failed) of 3" in out.err
    ev = run_dir / "srt" / "eval" / "bad"
    rows = [json.loads(x) for x in (ev / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["u0-deu", "u0-fra"]
    for name in ("summary.json", "directions.csv", "table.md", "bleu_heatmap.png", "decode_issues.txt",
                 "results.decode.json"):
        assert (ev / name).is_file(), name
    summary = json.loads((ev / "summary.json").read_text())
    assert json.dumps(summary).count("eng") >= 1
    assert "eng" in out.out and "deu" in out.out  # the terminal table
    issues = (ev / "decode_issues.txt").read_text().splitlines()
    assert len(issues) == 7 and "bad.jsonl:9: [bad_audio] cannot load audio" in issues[-1]
    meta = json.loads((ev / "results.decode.json").read_text())
    assert (meta["stage"], meta["step"]) == ("srt", 5)

    # a second run resumes: nothing left but the bad audio; --beam changes the settings -> refused
    assert cli.main(base) == 0
    assert "decoded 0 records (2 already done, 1 failed) of 3" in capsys.readouterr().err
    assert cli.main(base + ["--beam", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
    out_dir = corpus / "cli_all"
    assert cli.main(base[:4] + ["--data", str(corpus / "test.jsonl"), "--tgt", "eng", "--beam", "2",
                                "--out", str(out_dir), "--no-progress", "--batch", "2"]) == 0
    rows = [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["u1-eng", "u2-eng", "u3-eng"]
    assert json.loads((out_dir / "results.decode.json").read_text())["generate"]["num_beams"] == 2
    # a narrower selection over the same folder decodes nothing and scores only its own records
    capsys.readouterr()
    assert cli.main(base[:4] + ["--data", str(corpus / "test.jsonl"), "--tgt", "eng", "--src", "deu", "--beam", "2",
                                "--out", str(out_dir), "--no-progress", "--batch", "2"]) == 0
    err = capsys.readouterr().err
    assert "decoded 0 records (1 already done" in err and "scoring the 1 records of this selection" in err
    assert json.loads((out_dir / "summary.json").read_text())["records"] == 1

    with pytest.raises(SystemExit):
        cli.main(["--score", str(ev / "results.jsonl"), "--config", str(cfg_path)])
    with pytest.raises(SystemExit):
        cli.main(["--config", str(cfg_path)])
