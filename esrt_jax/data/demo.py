"""Offline demo corpus: multi-way parallel sentences spoken by espeak-ng voices.

`python -m esrt_jax.data.demo --out DIR` (or `build_demo_corpus(DIR)`) writes

    DIR/train.jsonl  DIR/dev.jsonl  DIR/test.jsonl     ESRT JSONL records
    DIR/audio/<lang>/<utterance id>.flac               16 kHz mono PCM-16 (FLAC, or .wav)
    DIR/manifest.json                                  counts, languages, voices, hashes

from the hand-written sentence table in `esrt_jax.data.demo_sentences`, with the espeak-ng
library and voice data shipped by the `espeakng-loader` wheel: nothing is fetched.

One record per (utterance, target language != source language):

    {"id", "audio", "src", "tgt", "asr", "s2tt", "source", "speaker", "sentence"}

`audio` is relative to the JSONL's folder, `asr` is the transcription in `src`, `s2tt` the
reference translation in `tgt`, `source` the corpus name, `speaker` the espeak voice variant
(the same variant across languages, so a speaker probe can be trained on it) and `sentence` the
row of the sentence table. Splits are by sentence (row % 10 == 8 -> dev, == 9 -> test, else
train), so no sentence is shared between splits in any language.

Determinism: espeak-ng keeps synthesis state between calls (pitch flutter phase, filter
memories, ...) that survives even `espeak_Terminate`/`espeak_Initialize`, so the same text gives
different samples depending on what was spoken before. Each clip is therefore synthesised in a
child `os.fork()`-ed from a worker that initialised espeak but never spoke: every clip starts
from the same state and the output is byte-identical whatever the order, the subset or the
number of workers. Workers are started with the `spawn` method so that the forking process
holds no JAX/XLA threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import espeakng_loader
import numpy as np
import soundfile
import soxr
from tqdm.auto import tqdm

from esrt_jax.config import cache_home
from esrt_jax.data import demo_sentences
from esrt_jax.data.records import JSON_KEYS

VERSION = 1
CORPUS_NAME = "esrt-jax-demo"
SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")

# Our ISO 639-3 codes -> espeak-ng voice names.
ESPEAK_VOICES = {
    "eng": "en-us",
    "deu": "de",
    "fra": "fr",
    "spa": "es",
    "rus": "ru",
    "cmn": "cmn",
    "jpn": "ja",
    "vie": "vi",
    "kor": "ko",
}
# espeak-ng voice variants (espeak-ng-data/voices/!v); the first `voices_per_lang` are used for
# every language. The first 10 alternate male/female; the next 10 (more voices to learn words
# from, not voices) are appended, so a corpus of the first n is the same whatever comes after.
VOICE_VARIANTS = ("m3", "f2", "m1", "f4", "m7", "f5", "m2", "f1", "m4", "f3",
                  "m5", "Annie", "m6", "linda", "m8", "steph", "Alex", "Andy", "Michael", "victor")

# espeak-ng API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a bad data path instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_espeakRATE = 1
_SPEECH_RATE_WPM = 175  # espeak's default, set explicitly so the config hash pins it
# Lossless either way; FLAC is ~1.7x smaller (the full corpus: ~45 MB instead of ~75 MB).
AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}
_MARGIN = SAMPLE_RATE // 10  # 0.1 s of silence before and after each clip


class DemoCorpusError(RuntimeError):
    """The demo corpus cannot be built (bad arguments, synthesis failure, foreign out dir)."""


def default_demo_dir() -> Path:
    """`$ESRT_JAX_DEMO_DIR`, else `$XDG_CACHE_HOME/esrt_jax/demo`, else `~/.cache/esrt_jax/demo`."""
    env = os.environ.get("ESRT_JAX_DEMO_DIR")
    if env:
        return Path(env).expanduser()
    return cache_home() / "demo"


def demo_corpus_for(data: Mapping, *, progress: bool = True) -> Path:
    """Build (or reuse) the demo corpus a run config's `data` section asks for; returns its dir.

    `data.languages` (default: every table language) and `data.demo_voices` (espeak variants per
    language, default 2) choose the corpus; `data.demo_dir` its folder, by default
    `default_demo_dir()` for the default corpus and a sibling named by the settings
    (`demo-eng-deu-fra-v8`) for any other, so that runs with different settings never rebuild
    each other's corpus in place.
    """
    langs = data.get("languages") or None
    voices = int(data.get("demo_voices") or 2)
    out = data.get("demo_dir")
    if not out:
        out = default_demo_dir()
        chosen = [l for l in demo_sentences.LANGS if l in set(langs)] if langs else list(demo_sentences.LANGS)
        if voices != 2 or chosen != list(demo_sentences.LANGS):
            out = out.with_name(f"{out.name}-{'-'.join(chosen)}-v{voices}")
    return build_demo_corpus(out, langs=langs, voices_per_lang=voices, progress=progress)


def split_of(sentence: int) -> str:
    """Split of a sentence-table row: 8 of every 10 rows train, 1 dev, 1 test."""
    return {8: "dev", 9: "test"}.get(sentence % 10, "train")


@dataclass(frozen=True)
class _Clip:
    sentence: int
    lang: str
    variant: str
    text: str  # what espeak reads (kana reading for jpn)
    ext: str = "flac"

    @property
    def utt_id(self) -> str:
        return f"demo{self.sentence:03d}-{self.lang}-{self.variant}"

    @property
    def rel_path(self) -> str:
        return f"audio/{self.lang}/{self.utt_id}.{self.ext}"


# ----------------------------------------------------------------------------- espeak


class _Espeak:
    """Minimal ctypes binding of libespeak-ng in synchronous (callback) mode."""

    _CALLBACK = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def __init__(self) -> None:
        self.lib = lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise DemoCorpusError(
                f"espeak_Initialize failed (returned {self.sample_rate}) with data path "
                f"{espeakng_loader.get_data_path()}"
            )
        self._chunks: list[np.ndarray] = []

        def on_audio(wav, n, events):  # called synchronously from espeak_Synth
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = self._CALLBACK(on_audio)  # keep a reference: espeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def synth(self, voice: str, text: str) -> np.ndarray:
        """Speak `text` with espeak voice name `voice` ("en-us+m3"). Returns int16 (T,) at 22050 Hz."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DemoCorpusError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(_espeakRATE, _SPEECH_RATE_WPM, 0)
        lib.espeak_ng_SetRandSeed(0)
        self._chunks = []
        data = text.encode("utf-8")
        status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0 or lib.espeak_Synchronize() != 0:
            raise DemoCorpusError(f"espeak_Synth failed (status {status}) for {voice!r}: {text!r}")
        if not self._chunks:
            raise DemoCorpusError(f"espeak-ng produced no audio for {voice!r}: {text!r}")
        return np.concatenate(self._chunks)


def espeak_version() -> str:
    """Version of the bundled libespeak-ng (e.g. "1.52.0"); loads the library, starts nothing."""
    lib = ctypes.CDLL(__import__("espeakng_loader").get_library_path())
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    return lib.espeak_Info(None).decode()


def _to_16k_pcm(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """int16 (T,) at `sample_rate` -> int16 (T',) at 16 kHz."""
    x = wav.astype(np.float32) / 32768.0
    y = soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ")
    y = np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)
    # espeak starts and stops right at the speech; leave recording-like margins.
    return np.pad(y, (_MARGIN, _MARGIN))


def _write_clip(engine: _Espeak, clip: _Clip, out_dir: Path) -> None:
    audio = _to_16k_pcm(engine.synth(f"{ESPEAK_VOICES[clip.lang]}+{clip.variant}", clip.text), engine.sample_rate)
    path = out_dir / clip.rel_path
    tmp = path.with_name(path.name + ".part")
    soundfile.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format=AUDIO_FORMATS[clip.ext])
    os.replace(tmp, path)


def _synth_worker(clips: Sequence[_Clip], out_dir: str, queue) -> None:
    """Spawned worker: initialise espeak once, then fork one child per clip (see module doc)."""
    engine = _Espeak()
    out = Path(out_dir)
    for clip in clips:
        pid = os.fork()
        if pid == 0:  # child: speak one clip from the pristine state, never return
            code = 0
            try:
                _write_clip(engine, clip, out)
            except BaseException:  # noqa: BLE001 - reported by the parent via the exit code
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        queue.put((clip.utt_id, os.waitstatus_to_exitcode(status)))
    queue.put(None)


def _synthesise(clips: Sequence[_Clip], out_dir: Path, workers: int, progress: bool) -> None:
    for lang in sorted({c.lang for c in clips}):
        (out_dir / "audio" / lang).mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    bar = tqdm(total=len(clips), desc="espeak-ng demo corpus", unit="clip", disable=not progress)
    if not hasattr(os, "fork"):
        # No fork (Windows): synthesise in-process. Valid audio, but bytes then depend on the
        # order of synthesis (espeak state carries over), so determinism holds only for equal
        # builds.
        engine = _Espeak()
        for clip in clips:
            try:
                _write_clip(engine, clip, out_dir)
            except DemoCorpusError as e:
                failures.append(f"{clip.utt_id}: {e}")
            bar.update(1)
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        shards = [clips[i::workers] for i in range(workers)]
        procs = [ctx.Process(target=_synth_worker, args=(s, str(out_dir), queue), daemon=True) for s in shards if s]
        for p in procs:
            p.start()
        live = len(procs)
        try:
            while live:
                try:
                    item = queue.get(timeout=5.0)
                except Exception:  # queue.Empty: check that workers are still alive
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise DemoCorpusError(
                            f"demo synthesis worker died with exit code {dead[0].exitcode}"
                        ) from None
                    continue
                if item is None:
                    live -= 1
                    continue
                utt_id, code = item
                if code != 0:
                    failures.append(f"{utt_id}: synthesis child exited with {code} (traceback above)")
                bar.update(1)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
    bar.close()
    if failures:
        raise DemoCorpusError(
            f"{len(failures)} of {len(clips)} demo clips failed to synthesise: " + "; ".join(failures[:5])
        )


# ----------------------------------------------------------------------------- corpus


def _select(langs: Iterable[str] | None, voices_per_lang: int, max_sentences: int | None, audio_format: str):
    if audio_format not in AUDIO_FORMATS:
        raise DemoCorpusError(f"audio_format must be one of {sorted(AUDIO_FORMATS)}, got {audio_format!r}")
    table_langs = demo_sentences.LANGS
    if langs is None:
        chosen = list(table_langs)
    else:
        chosen = list(dict.fromkeys(langs))
        unknown = [l for l in chosen if l not in table_langs]
        if unknown:
            raise DemoCorpusError(f"unknown demo language(s) {unknown}; available: {list(table_langs)}")
        if len(chosen) < 2:
            raise DemoCorpusError(f"the demo corpus needs at least 2 languages, got {chosen}")
        chosen = [l for l in table_langs if l in chosen]  # table order, whatever the input order
    if not 1 <= voices_per_lang <= len(VOICE_VARIANTS):
        raise DemoCorpusError(f"voices_per_lang must be in [1, {len(VOICE_VARIANTS)}], got {voices_per_lang}")
    n = len(demo_sentences.SENTENCES)
    if max_sentences is not None:
        if max_sentences < 1:
            raise DemoCorpusError(f"max_sentences must be >= 1, got {max_sentences}")
        n = min(n, max_sentences)
    return chosen, list(VOICE_VARIANTS[:voices_per_lang]), list(range(n))


def _config(langs: list[str], variants: list[str], sentences: list[int], audio_format: str) -> dict:
    rows = [{l: demo_sentences.SENTENCES[i][l] for l in langs} for i in sentences]
    speech = [{l: demo_sentences.speech_text(i, l) for l in langs} for i in sentences]
    return {
        "version": VERSION,
        "languages": langs,
        "voices": variants,
        "espeak_voices": {l: ESPEAK_VOICES[l] for l in langs},
        "sentences": len(sentences),
        "table_sha256": hashlib.sha256(json.dumps([rows, speech], ensure_ascii=False, sort_keys=True).encode()).hexdigest(),
        "sample_rate": SAMPLE_RATE,
        "audio_format": audio_format,
        "margin_samples": _MARGIN,
        "rate_wpm": _SPEECH_RATE_WPM,
        "espeakng_loader": importlib.metadata.version("espeakng-loader"),
        "espeak_ng": espeak_version(),
        "soxr": soxr.__version__,
        "libsndfile": soundfile.__libsndfile_version__,
    }


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _records(langs: list[str], variants: list[str], sentences: list[int], ext: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i in sentences:
        row = demo_sentences.SENTENCES[i]
        for src in langs:
            for variant in variants:
                clip = _Clip(i, src, variant, demo_sentences.speech_text(i, src), ext)
                for tgt in langs:
                    if tgt == src:
                        continue
                    out[split_of(i)].append({
                        "id": f"{clip.utt_id}-{tgt}",
                        "audio": clip.rel_path,
                        "src": src,
                        "tgt": tgt,
                        JSON_KEYS["transcription"]: row[src],
                        JSON_KEYS["translation"]: row[tgt],
                        "source": CORPUS_NAME,
                        "speaker": f"espeak-{variant}",
                        "sentence": i,
                    })
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached(out_dir: Path, config_hash: str) -> bool:
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("corpus") == CORPUS_NAME
        and manifest.get("version") == VERSION
        and manifest.get("config_hash") == config_hash
        and all((out_dir / f"{s}.jsonl").is_file() for s in SPLITS)
    )


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty dir or a previous demo corpus may be replaced: never delete user files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DemoCorpusError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    try:
        corpus = json.loads((out_dir / "manifest.json").read_text()).get("corpus")
    except (OSError, ValueError, AttributeError):
        corpus = None
    if corpus != CORPUS_NAME:
        raise DemoCorpusError(
            f"{out_dir} is not empty and holds no {CORPUS_NAME} manifest.json; refusing to overwrite it "
            "(choose another --out or remove it)"
        )


def build_demo_corpus(
    out_dir: str | os.PathLike | None = None,
    *,
    langs: Iterable[str] | None = None,
    voices_per_lang: int = 2,
    max_sentences: int | None = None,
    audio_format: str = "flac",
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the demo corpus in `out_dir` (default `default_demo_dir()`); returns the dir.

    `langs`: subset of `demo_sentences.LANGS` (default all); `voices_per_lang`: espeak variants per
    language (the first n of `VOICE_VARIANTS`); `max_sentences`: use only the first n table rows
    (tests); `audio_format`: "flac" (default) or "wav", both 16-bit PCM; `workers`: synthesis
    processes (default min(2, cpus)). A dir whose manifest has the same version and config hash is
    returned at once unless `force`. Concurrent builds of one dir wait for each other (file lock).
    """
    out_dir = Path(out_dir if out_dir is not None else default_demo_dir()).expanduser().resolve()
    chosen, variants, sentences = _select(langs, voices_per_lang, max_sentences, audio_format)
    config = _config(chosen, variants, sentences, audio_format)
    config_hash = _config_hash(config)
    if not force and _cached(out_dir, config_hash):
        return out_dir
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if workers < 1:
        raise DemoCorpusError(f"workers must be >= 1, got {workers}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out_dir):
        if not force and _cached(out_dir, config_hash):  # built by a concurrent caller meanwhile
            return out_dir
        _check_replaceable(out_dir)
        _build(out_dir, chosen, variants, sentences, audio_format, config, config_hash, workers, progress)
    return out_dir


@contextlib.contextmanager
def _dir_lock(out_dir: Path):
    try:
        import fcntl  # POSIX only: the lock is skipped where it is missing
    except ImportError:  # Windows: no advisory locks; concurrent builds are the caller's problem
        yield
        return
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(out_dir, chosen, variants, sentences, audio_format, config, config_hash, workers, progress) -> None:
    start = time.perf_counter()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        clips = [
            _Clip(i, lang, v, demo_sentences.speech_text(i, lang), audio_format)
            for i in sentences for lang in chosen for v in variants
        ]
        _synthesise(clips, tmp, workers, progress)
        records = _records(chosen, variants, sentences, audio_format)
        for split in SPLITS:
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                for rec in records[split]:
                    f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        content = hashlib.sha256()
        for rel in files:
            content.update(f"{rel}\0{_sha256_file(tmp / rel)}\n".encode())
        seconds = sum(soundfile.info(str(tmp / c.rel_path)).frames for c in clips) / SAMPLE_RATE
        manifest = {
            "corpus": CORPUS_NAME,
            "version": VERSION,
            "config": config,
            "config_hash": config_hash,
            "content_sha256": content.hexdigest(),
            "languages": chosen,
            "voices": [f"espeak-{v}" for v in variants],
            "counts": {
                "sentences": {s: sum(split_of(i) == s for i in sentences) for s in SPLITS},
                "utterances": {s: sum(split_of(c.sentence) == s for c in clips) for s in SPLITS},
                "records": {s: len(records[s]) for s in SPLITS},
                "directions": len(chosen) * (len(chosen) - 1),
            },
            "audio_seconds": round(seconds, 3),
        }
        # Written last: a dir without a manifest is never taken for a finished corpus.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        mb = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()) / 1e6
        print(
            f"demo corpus: {len(clips)} clips ({seconds / 60:.1f} min of audio), "
            f"{sum(manifest['counts']['records'].values())} records, {mb:.1f} MB in {out_dir} "
            f"({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )


def clip_split(demo_dir: str | os.PathLike, sentences: int | None = None) -> dict[str, Path]:
    """The held-out-clip view of a built demo corpus: {"train", "heldout", "dev", "trained", "test"} -> JSONL.

    Every training sentence of the table is held out in ONE voice (the k-th training sentence in
    voice k mod n_voices): `heldout` holds those records. Each held-out clip is audio the model
    never saw, of a sentence it was trained on (in other voices), in a voice it was trained on (on
    other sentences): a test of listening, not of translating unseen sentences (that is
    test.jsonl). With 3 or more voices the next voice, (k + 1) mod n, is held out too as `dev`
    (so the dev set the training loop reports on is not the test set); with 2, `dev` is
    `heldout`. `train` holds the remaining voices' records, `trained` those of one of them per
    sentence (the first after the held-out ones: a test set of trained clips as large as
    `heldout`). `test` holds the held-out sentences (test.jsonl) in two voices each (the k-th in
    voices k and k + 1 mod n: every voice, and as many records as `heldout` when the table has
    as many test sentences as `sentences / 2`). `sentences`: only the first n training
    sentences. Written once next to the corpus' own JSONL files (same folder, so the relative
    audio paths hold), atomically.
    """
    d = Path(demo_dir)
    voices = json.loads((d / "manifest.json").read_text())["voices"]
    n = len(voices)
    if n < 2:
        raise DemoCorpusError(f"{d}: held-out clips need at least 2 voices, the corpus has {voices}")
    tag = (f"s{sentences}" if sentences else "all") + ("-dev" if n >= 3 else "")
    paths = {key: d / f"{key}_clips_{tag}.jsonl" for key in ("train", "heldout", "trained")}
    paths["dev"] = d / f"dev_clips_{tag}.jsonl" if n >= 3 else paths["heldout"]
    paths["test"] = d / f"test_clips_{tag}.jsonl" if n >= 3 else d / "test.jsonl"
    if all(p.is_file() for p in paths.values()):
        return paths
    lines = (d / "train.jsonl").read_text(encoding="utf-8").splitlines()
    kept = sorted({json.loads(l)["sentence"] for l in lines})[:sentences]
    held = 2 if n >= 3 else 1  # voices held out per sentence
    role = {
        s: {voices[k % n]: "heldout", voices[(k + 1) % n]: "dev" if n >= 3 else "trained",
            voices[(k + held) % n]: "trained"}
        for k, s in enumerate(kept)
    }
    out: dict[Path, list[str]] = {p: [] for p in paths.values()}
    for line in lines:
        r = json.loads(line)
        if r["sentence"] not in role:
            continue
        key = role[r["sentence"]].get(r["speaker"], "train")
        out[paths[key]].append(line + "\n")
        if key == "trained":
            out[paths["train"]].append(line + "\n")
    if n >= 3:
        tests = (d / "test.jsonl").read_text(encoding="utf-8").splitlines()
        order = {s: k for k, s in enumerate(sorted({json.loads(l)["sentence"] for l in tests}))}
        for line in tests:
            r = json.loads(line)
            k = order[r["sentence"]]
            if r["speaker"] in (voices[k % n], voices[(k + 1) % n]):
                out[paths["test"]].append(line + "\n")
    for p, rows in out.items():
        tmp = p.with_name(f".{p.name}.{os.getpid()}")
        tmp.write_text("".join(rows), encoding="utf-8")
        os.replace(tmp, p)
    return paths


def noisy_clips(demo_dir: str | os.PathLike, records: str | os.PathLike, snr_db: float = 30.0) -> Path:
    """`records` (a JSONL of this corpus) with every clip replaced by a copy with white noise at
    `snr_db` dB SNR (seeded by the utterance id: deterministic). The audio differs from what the
    model was trained on, the utterances do not: a check that outputs follow the audio rather
    than a test of generalisation. Written once next to the corpus (`noisy<snr>/`); returns the
    JSONL path."""
    d = Path(demo_dir)
    src = Path(records)
    tag = f"noisy{snr_db:g}"
    out = d / f"{src.stem}_{tag}.jsonl"
    if out.is_file():
        return out
    lines = []
    done: set[str] = set()
    for line in src.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rel = f"{tag}/{r['audio']}"
        if rel not in done:
            done.add(rel)
            wav, sr = soundfile.read(str(d / r["audio"]), dtype="float32")
            rng = np.random.default_rng(zlib.crc32(r["audio"].encode()))
            noise = rng.standard_normal(wav.shape).astype(np.float32)
            noise *= np.sqrt(np.mean(wav ** 2) / 10 ** (snr_db / 10)) / max(float(np.std(noise)), 1e-9)
            path = d / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            soundfile.write(tmp, np.clip(wav + noise, -1.0, 1.0), sr, subtype="PCM_16", format="FLAC")
            os.replace(tmp, path)
        lines.append(json.dumps({**r, "audio": rel}, ensure_ascii=False, sort_keys=True) + "\n")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":  # the command is esrt_jax.cli.demo (commands live in the top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.demo", run_name="__main__", alter_sys=True)
