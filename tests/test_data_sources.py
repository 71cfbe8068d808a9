"""Every source (ESRT JSONL, LLM-SRT JSONL, HF datasets on disk / parquet, TFDS array_record)
yields identical records for the same data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from esrt_jax.data import records as R
from test_data_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src_corpus")
    path = write_corpus(root, n_sent=2)
    return root, path, list(R.JsonlSource(path))


def _hf_dict(recs, audio):
    return {"id": [r.id for r in recs], "audio": audio, "src": [r.src for r in recs],
            "tgt": [r.tgt for r in recs], "transcription": [r.transcription for r in recs],
            "translation": [r.translation for r in recs], "source": [r.source for r in recs]}


def test_jsonl_esrt_schema(corpus):
    root, path, recs = corpus
    assert len(recs) == 3 * 2 * 2
    r = recs[0]
    assert r == R.Record(id="eng0_deu", audio=str(root / "audio/eng/0.wav"), src="eng", tgt="deu",
                         transcription="the cat sleeps", translation="die Katze schläft",
                         source="toy")
    assert Path(r.audio).is_absolute() and Path(r.audio).is_file()
    assert json.loads(path.read_text().splitlines()[0]) == r.to_json(relative_to=root)


def test_llm_srt_schema_gives_same_records(corpus, tmp_path):
    root, _, recs = corpus
    lines = []
    for r in recs:
        m = f"<|{r.src}|><|{r.tgt}|>"
        lines.append({"audio": str(Path(r.audio).relative_to(root)), "key": r.id,
                      "source": f"toy_{r.src}_{r.tgt}", "prompt": m,
                      "gt": r.transcription + m + r.translation})
    p = root / "llm_srt.jsonl"
    p.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    assert list(R.JsonlSource(p)) == recs
    # ASR-only LLM-SRT line: prompt <|src|>, gt = transcription; free-form source name kept.
    q = tmp_path / "asr.jsonl"
    q.write_text(json.dumps({"audio": "/x/a.wav", "source": "eng", "prompt": "<|eng|>",
                             "gt": "hello there"}) + "\n")
    (r,) = list(R.JsonlSource(q))
    # An LLM-SRT line with an `asr` hypothesis (its cascaded mode) is still LLM-SRT.
    line = {"audio": "a.wav", "source": "x", "prompt": "<|eng|><|deu|>", "asr": "hypo",
            "gt": "ref<|eng|><|deu|>Ref"}
    assert R.record_from_json(line, "/d", "k").transcription == "ref"
    assert (r.id, r.src, r.tgt, r.transcription, r.translation, r.source) == (
        "asr:1", "eng", "eng", "hello there", "", "eng")


def test_malformed_lines_are_counted_or_strict_error(corpus, tmp_path):
    root, path, recs = corpus
    bad = tmp_path / "bad.jsonl"
    lines = path.read_text().splitlines()[:3]
    lines.insert(1, "{not json")
    lines.insert(2, json.dumps({"audio": "a.wav", "src": "eng"}))
    lines.insert(3, json.dumps({"audio": "a.wav", "source": "x", "prompt": "<|eng|><|deu|>",
                                "gt": "no marker here"}))
    bad.write_text("\n".join(lines) + "\n")
    src = R.JsonlSource(bad)
    assert len(src) == 3
    assert [w for w, _ in src.load_errors] == [f"{bad}:2", f"{bad}:3", f"{bad}:4"]
    assert "missing key(s) tgt, asr" in src.load_errors[1][1]
    assert "marker <|eng|><|deu|>" in src.load_errors[2][1]
    with pytest.raises(R.SourceError, match=r"bad\.jsonl:2: "):
        R.JsonlSource(bad, strict=True)
    with pytest.raises(R.SourceError, match="does not exist"):
        R.JsonlSource(tmp_path / "nope.jsonl")


def test_hf_datasets_on_disk_and_parquet(corpus, tmp_path):
    import datasets

    root, _, recs = corpus
    # Audio as a path column: identical records.
    ds = datasets.Dataset.from_dict(_hf_dict(recs, [r.audio for r in recs]))
    ds.save_to_disk(str(tmp_path / "hfpath"))
    src = R.HFSource(tmp_path / "hfpath")
    assert list(src) == recs
    idx = src.index()
    assert list(idx.src) == [r.src for r in recs] and list(idx.audio_key) == [r.audio for r in recs]
    # An `Audio` column: save_to_disk embeds the bytes and keeps only the file name. Same
    # records but for that name; the embedded samples equal the file's.
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    ds.save_to_disk(str(tmp_path / "hf"))
    src = R.HFSource(tmp_path / "hf")
    got = list(src)
    assert got[0].audio == "0.wav" and got[0].audio_bytes is not None
    assert [dataclasses.replace(g, audio=r.audio) for g, r in zip(got, recs)] == recs
    assert list(src.index().audio_key) == [Path(r.audio).name for r in recs]
    np.testing.assert_array_equal(R.load_audio_of(got[5]), R.load_audio_of(recs[5]))
    # A DatasetDict needs a split; open_source("dir:split") picks it.
    plain = datasets.Dataset.from_dict(_hf_dict(recs, [r.audio for r in recs]))
    datasets.DatasetDict({"train": plain}).save_to_disk(str(tmp_path / "hfdict"))
    with pytest.raises(R.SourceError, match=r"holds splits \['train'\]"):
        R.HFSource(tmp_path / "hfdict")
    assert list(R.open_source(f"{tmp_path / 'hfdict'}:train")) == recs
    # Parquet with the audio embedded as bytes (what `push_to_hub` produces): same records,
    # and the embedded bytes decode to the same samples as the file.
    emb = datasets.Dataset.from_dict(_hf_dict(recs, [{"bytes": Path(r.audio).read_bytes(),
                                                       "path": r.audio} for r in recs]))
    emb = emb.cast_column("audio", datasets.Audio(decode=False))
    emb.to_parquet(str(tmp_path / "emb.parquet"))
    src = R.open_source(str(tmp_path / "emb.parquet"))
    assert isinstance(src, R.HFSource)
    got = list(src)
    assert got == recs and got[0].audio_bytes is not None
    np.testing.assert_array_equal(R.load_audio_of(got[0]), R.load_audio_of(recs[0]))


def test_tfds_array_record(corpus, tmp_path):
    from esrt_jax.cli import tfds_builder as tfds_cli
    from esrt_jax.data import tfds_builder

    root, path, recs = corpus
    assert tfds_cli.main(["--src", str(path), "--out", str(tmp_path / "t")]) == 0
    src = R.open_source(f"{tmp_path / 't'}:train")
    assert isinstance(src, R.TfdsSource)
    assert list(src) == recs and src[0].audio_bytes is None
    d = tfds_builder.write_tfds({"train": recs[:3], "dev": recs[3:5]}, tmp_path / "e",
                                embed_audio=True)
    dev = R.TfdsSource(d, "dev")
    assert list(dev) == recs[3:5]
    assert dev[0].audio_bytes == Path(recs[3].audio).read_bytes()
    with pytest.raises(R.SourceError, match=r"no split 'test'; found \['dev', 'train'\]"):
        R.TfdsSource(d, "test")
    with pytest.raises(R.SourceError, match="already exists"):
        tfds_builder.write_tfds({"train": recs}, tmp_path / "e")


def test_open_source_errors(tmp_path):
    with pytest.raises(R.SourceError, match="does not exist"):
        R.open_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(R.SourceError, match="not a .jsonl file"):
        R.open_source(str(tmp_path / "x.txt"))
