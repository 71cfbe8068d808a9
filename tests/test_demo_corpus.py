"""Offline demo corpus: sentence table, deterministic espeak-ng synthesis, schema, splits, cache."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import espeakng_loader
import numpy as np
import pytest
import soundfile as sf

from esrt_jax.cli import demo as demo_cli
from esrt_jax.data import demo, demo_sentences
from esrt_jax.data.demo import DemoCorpusError, build_demo_corpus

SUB_LANGS = ("eng", "rus", "jpn")  # Latin, Cyrillic, CJK (kana reading) scripts
SUB_SENTENCES = 10  # rows 0..9: 8 train, 1 dev, 1 test
SCHEMA_KEYS = {"id", "audio", "src", "tgt", "asr", "s2tt", "source"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The same small corpus built twice, with 2 and 1 synthesis workers."""
    root = tmp_path_factory.mktemp("demo")
    kw = dict(langs=SUB_LANGS, voices_per_lang=2, max_sentences=SUB_SENTENCES, progress=False)
    a = build_demo_corpus(root / "a", workers=2, **kw)
    b = build_demo_corpus(root / "b", workers=1, **kw)
    return a, b, kw


def _records(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(l) for l in (out / f"{s}.jsonl").read_text("utf-8").splitlines()] for s in demo.SPLITS}


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the table

_SCRIPTS = {
    "eng": r"^[A-Za-z ,.'?!]+$",
    "rus": r"[А-Яа-яЁё]",
    "cmn": r"[\u4e00-\u9fff]",
    "jpn": r"[\u3040-\u30ff]",
    "kor": r"[\uac00-\ud7a3]",
    "vie": r"[ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]",
}


def test_sentence_table_is_complete_and_in_the_right_scripts():
    langs = demo_sentences.LANGS
    assert len(demo_sentences.SENTENCES) >= 80
    assert len(langs) >= 8 and {"eng", "deu", "fra", "spa", "rus", "cmn", "jpn", "vie"} <= set(langs)
    for i, row in enumerate(demo_sentences.SENTENCES):
        assert set(row) == set(langs) | set(demo_sentences.SPEECH_KEYS.values()), f"row {i}: columns {sorted(row)}"
        for key, text in row.items():
            assert text and text == text.strip() and "  " not in text, f"row {i} {key}: {text!r}"
        for lang, pattern in _SCRIPTS.items():
            assert re.search(pattern, row[lang]), f"row {i} {lang}: {row[lang]!r} is not in the expected script"
        assert 3 <= len(row["eng"].split()) <= 10, f"row {i}: {row['eng']!r} is not 3-10 words"
        # espeak-ng reads no kanji: the spoken Japanese must be kana (and punctuation) only.
        assert re.fullmatch(r"[\u3040-\u30ff、。]+", row["jpn_speech"]), f"row {i}: {row['jpn_speech']!r}"
    for lang in langs:  # a sentence repeated would leak across splits
        texts = [row[lang] for row in demo_sentences.SENTENCES]
        assert len(set(texts)) == len(texts), f"{lang} has duplicate sentences"


def test_every_language_has_an_espeak_voice():
    assert set(demo_sentences.LANGS) <= set(demo.ESPEAK_VOICES)
    assert len(set(demo.VOICE_VARIANTS)) == len(demo.VOICE_VARIANTS) >= 2
    # Appended, never reordered: a corpus of the first n voices (v8, v10) keeps its content.
    assert demo.VOICE_VARIANTS[:10] == ("m3", "f2", "m1", "f4", "m7", "f5", "m2", "f1", "m4", "f3")
    variants = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    missing = [v for v in demo.VOICE_VARIANTS if not (variants / v).is_file()]
    assert not missing, f"espeak-ng variants not in the wheel's data: {missing}"


def test_full_corpus_plan_counts():
    """The full corpus's record plan (no synthesis): 80 x 9 languages x 2 voices x 8 targets."""
    langs, variants, sentences = demo._select(None, 2, None, "flac")
    recs = demo._records(langs, variants, sentences, "flac")
    n, L = len(demo_sentences.SENTENCES), len(demo_sentences.LANGS)
    n_split = {s: sum(demo.split_of(i) == s for i in range(n)) for s in demo.SPLITS}
    assert n_split == {"train": 64, "dev": 8, "test": 8}
    assert {s: len(r) for s, r in recs.items()} == {s: k * L * 2 * (L - 1) for s, k in n_split.items()}
    ids = [r["id"] for rs in recs.values() for r in rs]
    assert len(set(ids)) == len(ids)


# ----------------------------------------------------------------------------- a built corpus


def test_two_builds_are_byte_identical(builds):
    a, b, _ = builds
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert [k for k in fa if fa[k] != fb[k]] == []
    n_clips = SUB_SENTENCES * len(SUB_LANGS) * 2
    assert sum(k.startswith("audio/") for k in fa) == n_clips


def test_records_follow_the_schema(builds):
    a, _, _ = builds
    recs = _records(a)
    seen_ids = set()
    targets = defaultdict(set)
    for split, rs in recs.items():
        assert rs, f"{split}.jsonl is empty"
        for r in rs:
            assert SCHEMA_KEYS <= set(r), r
            assert all(isinstance(r[k], str) and r[k] for k in SCHEMA_KEYS), r
            assert r["id"] not in seen_ids
            seen_ids.add(r["id"])
            assert r["src"] in SUB_LANGS and r["tgt"] in SUB_LANGS and r["src"] != r["tgt"]
            assert r["source"] == demo.CORPUS_NAME
            row = demo_sentences.SENTENCES[r["sentence"]]
            assert (r["asr"], r["s2tt"]) == (row[r["src"]], row[r["tgt"]])
            assert not Path(r["audio"]).is_absolute() and (a / r["audio"]).is_file()
            assert demo.split_of(r["sentence"]) == split
            targets[r["audio"]].add(r["tgt"])
    # one record per (utterance, target language != source language)
    assert all(len(t) == len(SUB_LANGS) - 1 for t in targets.values())
    assert len(targets) == SUB_SENTENCES * len(SUB_LANGS) * 2


def test_splits_are_disjoint_by_sentence(builds):
    a, _, _ = builds
    recs = _records(a)
    rows = {s: {r["sentence"] for r in rs} for s, rs in recs.items()}
    texts = {s: {r["asr"] for r in rs} | {r["s2tt"] for r in rs} for s, rs in recs.items()}
    for x, y in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not rows[x] & rows[y], (x, y)
        assert not texts[x] & texts[y], (x, y)
    assert rows == {"train": set(range(8)), "dev": {8}, "test": {9}}


def test_audio_is_16k_mono_speech_under_30s(builds):
    a, _, _ = builds
    for path in sorted((a / "audio").rglob("*.flac")):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), path
        x, _ = sf.read(str(path), dtype="float32")
        assert 0.5 < len(x) / 16000 < 30.0, (path, len(x))
        assert np.sqrt(np.mean(x**2)) > 0.01, f"{path} is (nearly) silent"
        assert np.abs(x).max() < 1.0, f"{path} clips"


def test_voices_per_language_and_speaker_ids(builds):
    a, _, _ = builds
    speakers = defaultdict(set)
    for rs in _records(a).values():
        for r in rs:
            speakers[r["src"]].add(r["speaker"])
            assert r["audio"].split("/")[-1].split("-")[2].split(".")[0] == r["speaker"].removeprefix("espeak-")
    assert set(speakers) == set(SUB_LANGS)
    # the same voice variants in every language: a speaker probe can learn voices across languages
    assert all(s == {"espeak-m3", "espeak-f2"} for s in speakers.values()), speakers
    # and the variants really sound different: same sentence, same language, different samples
    x, _ = sf.read(str(a / "audio/eng/demo000-eng-m3.flac"))
    y, _ = sf.read(str(a / "audio/eng/demo000-eng-f2.flac"))
    assert len(x) != len(y) or not np.array_equal(x, y)


def test_manifest_counts_and_hashes(builds):
    a, _, _ = builds
    m = json.loads((a / "manifest.json").read_text())
    recs = _records(a)
    assert m["corpus"] == demo.CORPUS_NAME and m["version"] == demo.VERSION
    assert m["languages"] == list(SUB_LANGS) and m["voices"] == ["espeak-m3", "espeak-f2"]
    assert m["counts"]["records"] == {s: len(rs) for s, rs in recs.items()}
    assert m["counts"]["sentences"] == {"train": 8, "dev": 1, "test": 1}
    assert m["counts"]["utterances"] == {"train": 48, "dev": 6, "test": 6}
    assert m["counts"]["directions"] == 6
    assert re.fullmatch(r"[0-9a-f]{64}", m["content_sha256"]) and re.fullmatch(r"[0-9a-f]{64}", m["config_hash"])
    assert m["audio_seconds"] > 60 * 0.5


def test_cached_build_returns_at_once(builds, capsys):
    a, _, kw = builds
    before = (a / "manifest.json").stat().st_mtime_ns
    t = time.perf_counter()
    assert build_demo_corpus(a, workers=2, **kw) == a
    assert demo_cli.main(["--out", str(a), "--langs", ",".join(SUB_LANGS), "--max-sentences", str(SUB_SENTENCES), "--quiet"]) == 0
    assert time.perf_counter() - t < 5.0
    assert (a / "manifest.json").stat().st_mtime_ns == before
    assert json.loads(capsys.readouterr().out)["counts"]["records"]["dev"] == 6 * 2


def test_changed_config_or_force_rebuilds(builds, tmp_path):
    a, _, kw = builds
    out = tmp_path / "c"
    small = dict(kw, max_sentences=2, langs=("eng", "jpn"))
    build_demo_corpus(out, **small)
    m1 = json.loads((out / "manifest.json").read_text())
    build_demo_corpus(out, **dict(small, voices_per_lang=1))
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["config_hash"] != m1["config_hash"] and m2["voices"] == ["espeak-m3"]
    assert not list((out / "audio").rglob("*-f2.flac")), "stale clips of the previous build survived"
    build_demo_corpus(out, force=True, **dict(small, voices_per_lang=1))
    assert json.loads((out / "manifest.json").read_text())["content_sha256"] == m2["content_sha256"]
    # the clips of a subset are the very bytes of the bigger build
    for p in (out / "audio").rglob("*.flac"):
        assert p.read_bytes() == (a / p.relative_to(out)).read_bytes(), p
    assert not list(tmp_path.glob(".c.tmp-*")) + list(tmp_path.glob(".c.old-*")), "temporary build dirs left behind"


def test_concurrent_builds_of_one_dir_build_once(tmp_path):
    import threading

    out, results, errors = tmp_path / "shared", [], []
    kw = dict(langs=("deu", "vie"), max_sentences=1, voices_per_lang=1, workers=1, progress=False)

    def run():
        try:
            results.append(build_demo_corpus(out, **kw))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [out, out]
    assert sorted(p.name for p in (out / "audio").rglob("*.flac")) == ["demo000-deu-m3.flac", "demo000-vie-m3.flac"]


def test_wav_output_and_jsonl_source_reads_it(tmp_path):
    out = build_demo_corpus(tmp_path / "w", langs=("eng", "cmn"), max_sentences=1, voices_per_lang=1,
                            audio_format="wav", progress=False)
    (rec,) = _records(out)["train"][:1]
    assert rec["audio"] == "audio/eng/demo000-eng-m3.wav"
    info = sf.info(str(out / rec["audio"]))
    assert (info.format, info.samplerate, info.channels) == ("WAV", 16000, 1)
    from esrt_jax.data.records import JsonlSource, load_audio_of

    src = JsonlSource(out / "train.jsonl", strict=True)
    r = src[0]
    assert (r.src, r.tgt, r.transcription, r.translation) == ("eng", "cmn", "Good morning, how are you?", "早上好，你好吗？")
    assert load_audio_of(r).shape == (info.frames,)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(DemoCorpusError, match=r"unknown demo language\(s\) \['xxx'\]"):
        build_demo_corpus(tmp_path / "x", langs=("eng", "xxx"), progress=False)
    with pytest.raises(DemoCorpusError, match="at least 2 languages"):
        build_demo_corpus(tmp_path / "x", langs=("eng",), progress=False)
    with pytest.raises(DemoCorpusError, match=r"voices_per_lang must be in \[1, 20\], got 21"):
        build_demo_corpus(tmp_path / "x", voices_per_lang=21, progress=False)
    with pytest.raises(DemoCorpusError, match="audio_format must be one of"):
        build_demo_corpus(tmp_path / "x", audio_format="mp3", progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DemoCorpusError, match="refusing to overwrite"):
        build_demo_corpus(foreign, langs=("eng", "deu"), max_sentences=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_default_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ESRT_JAX_DEMO_DIR", str(tmp_path / "d"))
    assert demo.default_demo_dir() == tmp_path / "d"
    monkeypatch.delenv("ESRT_JAX_DEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert demo.default_demo_dir() == tmp_path / "cache" / "esrt_jax" / "demo"


def test_heldout_clip_split_and_noisy_copies(builds, tmp_path):
    """Each training sentence is held out in exactly one voice and trained in the other; the
    noisy copies are new, deterministic audio of the same utterances."""
    import shutil

    import soundfile

    d = tmp_path / "c"
    shutil.copytree(builds[0], d)
    split = demo.clip_split(d, sentences=4)
    recs = {k: [json.loads(l) for l in p.read_text("utf-8").splitlines()] for k, p in split.items()}
    held = {(r["sentence"], r["src"], r["speaker"]) for r in recs["heldout"]}
    trained = {(r["sentence"], r["src"], r["speaker"]) for r in recs["train"]}
    assert not held & trained
    assert {s for s, _, _ in held} == {s for s, _, _ in trained} == {0, 1, 2, 3}
    assert {sp for s, _, sp in held if s == 0} != {sp for s, _, sp in held if s == 1}  # voices alternate
    assert len(held) == len(trained) == 4 * len(SUB_LANGS)
    noisy = demo.noisy_clips(d, split["train"])
    rows = [json.loads(l) for l in noisy.read_text("utf-8").splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in recs["train"]]
    a, _ = soundfile.read(str(d / rows[0]["audio"]))
    b, _ = soundfile.read(str(d / recs["train"][0]["audio"]))
    assert a.shape == b.shape and 0 < np.abs(a - b).max() < 0.1
    first = (d / rows[0]["audio"]).read_bytes()
    shutil.rmtree(d / Path(rows[0]["audio"]).parts[0])
    noisy.unlink()
    demo.noisy_clips(d, split["train"])
    assert (d / rows[0]["audio"]).read_bytes() == first


def test_heldout_clip_split_with_a_dev_voice(tmp_path):
    """With 3+ voices each training sentence is held out in one voice (test) and a second (dev),
    trained in the others; `trained` is one trained voice per sentence."""
    d = build_demo_corpus(tmp_path / "v4", langs=("eng", "deu"), voices_per_lang=4, max_sentences=4, progress=False)
    split = demo.clip_split(d)
    recs = {k: [json.loads(l) for l in p.read_text("utf-8").splitlines()] for k, p in split.items()}
    keys = {k: {(r["sentence"], r["src"], r["speaker"]) for r in v} for k, v in recs.items()}
    assert not keys["heldout"] & keys["dev"] and not (keys["heldout"] | keys["dev"]) & keys["train"]
    assert keys["trained"] < keys["train"]
    assert len(keys["heldout"]) == len(keys["dev"]) == len(keys["trained"]) == 4 * 2
    assert len(keys["train"]) == 4 * 2 * 2
    for s in range(4):  # voices rotate by sentence: voice k held out, k + 1 dev, k + 2 the probe
        v = [f"espeak-{x}" for x in demo.VOICE_VARIANTS[:4]]
        assert {sp for t, _, sp in keys["heldout"] if t == s} == {v[s % 4]}
        assert {sp for t, _, sp in keys["dev"] if t == s} == {v[(s + 1) % 4]}
        assert {sp for t, _, sp in keys["trained"] if t == s} == {v[(s + 2) % 4]}
    tests = [json.loads(l) for l in split["test"].read_text("utf-8").splitlines()]
    assert tests == []  # max_sentences=4: no test sentence in this corpus
    assert demo.clip_split(d) == split  # cached


def test_demo_corpus_for_names_its_folder_by_the_settings(monkeypatch, tmp_path):
    """The default corpus keeps the default folder; other settings get their own sibling, so a
    run never rebuilds another run's corpus in place."""
    monkeypatch.setenv("ESRT_JAX_DEMO_DIR", str(tmp_path / "demo"))
    calls = []
    monkeypatch.setattr(demo, "build_demo_corpus", lambda out, **kw: calls.append((Path(out), kw)) or Path(out))
    assert demo.demo_corpus_for({}) == tmp_path / "demo"
    assert calls[-1][1]["langs"] is None and calls[-1][1]["voices_per_lang"] == 2
    assert demo.demo_corpus_for({"languages": ["fra", "eng", "deu"], "demo_voices": 8}) == tmp_path / "demo-eng-deu-fra-v8"
    assert calls[-1][1]["voices_per_lang"] == 8
    assert demo.demo_corpus_for({"languages": list(demo_sentences.LANGS)}) == tmp_path / "demo"
    assert demo.demo_corpus_for({"demo_dir": str(tmp_path / "x"), "demo_voices": 3}) == tmp_path / "x"


def test_eval_default_test_sets_of_the_demo(monkeypatch, tmp_path):
    """eval.py's default demo test sets: one trained voice + noise, the held-out voice and the
    held-out sentences, none of them trained on, each clip in one set only."""
    from esrt_jax.cli import eval as cli
    from esrt_jax.train.config import load_run_config

    d = build_demo_corpus(tmp_path / "v3", langs=("eng", "deu"), voices_per_lang=3, max_sentences=10, progress=False)
    monkeypatch.setattr(cli, "demo_corpus_for", lambda data: d)
    cfg = load_run_config("configs/demo.yaml", ["data.demo_sentences=null"])
    sets = cli.default_test_sets(cfg)
    assert [label for label, _ in sets] == ["trained clips + noise", "held-out clips", "held-out sentences"]
    rows = [[json.loads(l) for l in Path(p).read_text("utf-8").splitlines()] for _, p in sets]
    trained = {json.loads(l)["audio"] for l in (d / "train_clips_all-dev.jsonl").read_text("utf-8").splitlines()}
    assert all(r["audio"].startswith("noisy30/") and r["audio"][len("noisy30/"):] in trained for r in rows[0])
    assert not {r["audio"] for r in rows[1]} & trained
    assert {r["sentence"] for r in rows[2]} == {9} and len({r["speaker"] for r in rows[2]}) == 2
    assert len(rows[0]) == len(rows[1]) == 8 * 2 * 1  # 8 training sentences x 2 languages x 1 target
