"""prepare_fleurs on a tiny fake FLEURS tree written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from esrt_jax.cli import prepare_fleurs as fleurs_cli
from esrt_jax.data import prepare_fleurs as PF
from esrt_jax.data.records import JsonlSource
from test_data_helpers import write_wav

# sentence id -> text per language; fra lacks sentence 12; deu has two speakers of 10.
TEXT = {
    "en_us": {10: "The cat sleeps.", 11: "A red house.", 12: "We eat bread."},
    "de_de": {10: "Die Katze schläft.", 11: "Ein rotes Haus.", 12: "Wir essen Brot."},
    "fr_fr": {10: "Le chat dort.", 11: "Une maison rouge."},
}


def write_fleurs(root: Path) -> Path:
    for lang, sents in TEXT.items():
        d = root / lang
        rows = {"train": [], "dev": []}
        for sid, text in sents.items():
            split = "dev" if sid == 11 else "train"
            speakers = 2 if (lang == "de_de" and sid == 10) else 1
            for k in range(speakers):
                name = f"{lang}_{sid}_{k}.wav"
                write_wav(d / "audio" / split / name, seconds=0.1)
                rows[split].append([str(sid), name, text, text.lower().strip("."), "x", "1600",
                                    "MALE"])
        for split, rs in rows.items():
            (d / f"{split}.tsv").write_text("".join("\t".join(r) + "\n" for r in rs),
                                            encoding="utf-8")
    (root / "xx_unknown").mkdir()
    return root


@pytest.fixture(scope="module")
def fleurs(tmp_path_factory):
    return write_fleurs(tmp_path_factory.mktemp("fleurs"))


def test_prepare_joins_on_sentence_id(fleurs, tmp_path):
    out = tmp_path / "out"
    assert fleurs_cli.main(["--root", str(fleurs), "--langs", "eng,deu,fra", "--out", str(out),
                    "--splits", "train,dev"]) == 0
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    # train utterances: eng 10,12; deu 10 (x2), 12; fra 10 -> targets where the sentence exists
    pairs = sorted((r["src"], r["tgt"], r["id"].split("_")[3]) for r in train)
    assert pairs == sorted([
        ("eng", "deu", "10"), ("eng", "fra", "10"), ("eng", "deu", "12"),
        ("deu", "eng", "10"), ("deu", "fra", "10"), ("deu", "eng", "10"), ("deu", "fra", "10"),
        ("deu", "eng", "12"),
        ("fra", "eng", "10"), ("fra", "deu", "10")])
    by = {(r["src"], r["tgt"], r["id"].split("_")[3]): r for r in train}
    r = by[("deu", "fra", "10")]
    assert (r["asr"], r["s2tt"], r["source"]) == ("Die Katze schläft.", "Le chat dort.", "fleurs")
    assert set(r) == {"id", "audio", "src", "tgt", "asr", "s2tt", "source"}
    assert len({x["id"] for x in train}) == len(train)
    # audio relative to the JSONL's folder; the sources read it back as absolute paths
    recs = list(JsonlSource(out / "train.jsonl"))
    assert all(Path(x.audio).is_file() for x in recs)
    dev = [json.loads(x) for x in (out / "dev.jsonl").read_text().splitlines()]
    assert len(dev) == 6 and {(x["src"], x["tgt"]) for x in dev} == {
        ("eng", "deu"), ("eng", "fra"), ("deu", "eng"), ("deu", "fra"), ("fra", "eng"),
        ("fra", "deu")}
    assert not (out / "test.jsonl").exists()
    # normalized text on request
    s = PF.prepare(fleurs, ["eng", "deu"], tmp_path / "norm", splits=["dev"], text="normalized")
    line = json.loads((tmp_path / "norm" / "dev.jsonl").read_text().splitlines()[0])
    assert (line["asr"], line["s2tt"]) == ("a red house", "ein rotes haus")
    assert s["splits"] == {"dev": 2}


def test_cap_and_missing_audio(fleurs, tmp_path):
    s = PF.prepare(fleurs, ["eng", "deu", "fra"], tmp_path / "cap", splits=["train"],
                   max_per_direction=1)
    recs = [json.loads(x) for x in (tmp_path / "cap" / "train.jsonl").read_text().splitlines()]
    dirs = [(r["src"], r["tgt"]) for r in recs]
    assert len(dirs) == len(set(dirs)) == 6 and s["splits"] == {"train": 6}
    assert s["missing_translation"] == 2  # eng 12 and deu 12 -> fra
    again = PF.prepare(fleurs, ["eng", "deu", "fra"], tmp_path / "cap2", splits=["train"],
                       max_per_direction=1)
    assert (tmp_path / "cap2" / "train.jsonl").read_text() == \
        (tmp_path / "cap" / "train.jsonl").read_text() and again == s
    gone = fleurs / "en_us" / "audio" / "train" / "en_us_12_0.wav"
    data = gone.read_bytes()
    gone.unlink()
    try:
        s = PF.prepare(fleurs, ["eng", "deu"], tmp_path / "gone", splits=["train"])
        assert s["missing_audio"] == 1 and "en_us_12_0.wav" in s["examples"][0]
    finally:
        gone.write_bytes(data)


def test_missing_language_lists_what_was_found(fleurs, tmp_path, capsys):
    with pytest.raises(PF.FleursError, match=r"language\(s\) jpn, kor not found under .* "
                       r"\(expected folders ja_jp, ko_kr\); found: deu \(de_de\), eng \(en_us\), "
                       r"fra \(fr_fr\)"):
        PF.prepare(fleurs, ["eng", "jpn", "kor"], tmp_path / "o")
    assert fleurs_cli.main(["--root", str(fleurs), "--langs", "eng,xxq", "--out", str(tmp_path)]) == 2
    assert "unknown language code 'xxq'" in capsys.readouterr().err
    with pytest.raises(PF.FleursError, match="need at least two languages"):
        PF.prepare(fleurs, ["eng"], tmp_path / "o")


def test_hf_datasets_copy_gives_the_same_records(fleurs, tmp_path):
    import datasets

    hf_root = tmp_path / "hf_fleurs"
    for lang in ("en_us", "de_de"):
        dd = {}
        for split in ("train", "dev"):
            rows = PF.read_language(fleurs / lang, [split])
            ds = datasets.Dataset.from_dict({
                "id": [int(u.sentence) for u in rows], "audio": [u.file for u in rows],
                "raw_transcription": [u.raw for u in rows],
                "transcription": [u.normalized for u in rows]})
            dd[split] = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
        datasets.DatasetDict(dd).save_to_disk(str(hf_root / lang))  # embeds the audio bytes
    a = PF.prepare(fleurs, ["eng", "deu"], tmp_path / "tsv", splits=["train", "dev"])
    b = PF.prepare(hf_root, ["eng", "deu"], tmp_path / "hf", splits=["train", "dev"])
    assert a == b
    for split in ("train", "dev"):
        ra = list(JsonlSource(tmp_path / "tsv" / f"{split}.jsonl"))
        rb = list(JsonlSource(tmp_path / "hf" / f"{split}.jsonl"))
        assert [(x.id, x.src, x.tgt, x.transcription, x.translation) for x in ra] == \
            [(x.id, x.src, x.tgt, x.transcription, x.translation) for x in rb]
        for x, y in zip(ra, rb):
            assert str(tmp_path / "hf" / "audio") in y.audio
            assert Path(x.audio).read_bytes() == Path(y.audio).read_bytes()


def _wav_bytes(seconds: float, freq: float) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def write_hub_download(root: Path) -> tuple[Path, dict]:
    """What `snapshot_download("google/fleurs", allow_patterns=hub_patterns(...))` leaves: per
    language `data/<config>/<split>.tsv` and `data/<config>/audio/<split>.tar.gz` holding
    `<split>/<name>.wav` (real PCM WAV bytes, a different tone per clip), plus a member outside
    the split folder that must not be written anywhere. Returns (the `data/` root, name -> bytes)."""
    import io
    import tarfile

    clips = {}
    for li, (lang, sents) in enumerate(TEXT.items()):
        d = root / "data" / lang
        (d / "audio").mkdir(parents=True)
        for split in ("train", "dev"):
            rows, members = [], []
            for sid, text in sents.items():
                if ("dev" if sid == 11 else "train") != split:
                    continue
                name = f"{900 + 10 * li + sid}.wav"
                clips[name] = _wav_bytes(0.05 + 0.01 * sid, 200.0 + 50 * li + sid)
                rows.append([str(sid), name, text, text.lower(), "x", "1", "FEMALE"])
                members.append((f"{split}/{name}", clips[name]))
            members.append(("../escape.wav", _wav_bytes(0.01, 100.0)))
            (d / f"{split}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows),
                                            encoding="utf-8")
            with tarfile.open(d / "audio" / f"{split}.tar.gz", "w:gz") as tf:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root / "data", clips


def test_hub_patterns_name_the_repository_files():
    assert PF.HUB_REPO == "google/fleurs"
    assert PF.hub_patterns(["nld", "eng"], ["dev"]) == [
        "data/nl_nl/dev.tsv", "data/nl_nl/audio/dev.tar.gz",
        "data/en_us/dev.tsv", "data/en_us/audio/dev.tar.gz"]
    with pytest.raises(PF.FleursError, match="unknown split"):
        PF.hub_patterns(["eng"], ["validation"])
    with pytest.raises(PF.FleursError, match="unknown language code 'xxq'"):
        PF.hub_patterns(["xxq"], ["dev"])


def test_hub_download_layout_gives_records_with_the_audio(tmp_path):
    """The hub's layout (clips still in tar.gz archives) -> records joined on the sentence id, the
    audio bytes as they were in the archive and readable by the project's audio loader;
    only the requested splits are extracted, nothing outside their folders; a rerun extracts
    nothing more."""
    import soundfile as sf

    from esrt_jax.audio import load_audio

    root, clips = write_hub_download(tmp_path / "hub")
    s = PF.prepare(root, ["eng", "deu", "fra"], tmp_path / "out", splits=["train"])
    assert s["extracted"] == 5 and s["missing_audio"] == 0
    assert s["splits"] == {"train": 8} and s["missing_translation"] == 2
    assert not (root / "en_us" / "audio" / "dev").exists()  # dev was not asked for
    assert not list(tmp_path.rglob("escape.wav"))
    recs = list(JsonlSource(tmp_path / "out" / "train.jsonl"))
    by = {(r.src, r.tgt, r.transcription): r for r in recs}
    r = by[("fra", "deu", "Le chat dort.")]
    assert r.translation == "Die Katze schläft."
    for r in recs:
        data = Path(r.audio).read_bytes()
        assert data == clips[Path(r.audio).name]
        wav, sr = sf.read(r.audio, dtype="float32")
        assert sr == 16000 and np.allclose(load_audio(r.audio), wav, atol=1e-6)
    assert sorted((r.src, r.tgt, r.id.split("_")[3]) for r in recs) == sorted([
        ("eng", "deu", "10"), ("eng", "fra", "10"), ("eng", "deu", "12"), ("deu", "eng", "10"),
        ("deu", "fra", "10"), ("deu", "eng", "12"), ("fra", "eng", "10"), ("fra", "deu", "10")])
    again = PF.prepare(root, ["eng", "deu", "fra"], tmp_path / "out2", splits=["train", "dev"])
    assert again["extracted"] == 3 and again["splits"] == {"train": 8, "dev": 6}


def test_unreadable_archive_names_it(tmp_path):
    root, _ = write_hub_download(tmp_path / "hub")
    bad = root / "de_de" / "audio" / "dev.tar.gz"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(PF.FleursError, match=r"de_de/audio/dev\.tar\.gz: cannot read the archive"):
        PF.prepare(root, ["eng", "deu"], tmp_path / "out", splits=["dev"])
