"""Shared builders for the data tests (no tests here): a tiny multi-way parallel corpus with
generated audio, in the ESRT JSONL schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LANGS = ("eng", "deu", "fra")
WORDS = {
    "eng": ["the cat sleeps", "a red house", "we eat bread", "good morning", "it is cold",
            "the dog runs"],
    "deu": ["die Katze schläft", "ein rotes Haus", "wir essen Brot", "guten Morgen",
            "es ist kalt", "der Hund läuft"],
    "fra": ["le chat dort", "une maison rouge", "nous mangeons du pain", "bonjour",
            "il fait froid", "le chien court"],
}


def write_wav(path: Path, seconds: float = 0.25, freq: float = 440.0, sr: int = 16000) -> None:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr, subtype="PCM_16")


def write_corpus(root: Path, n_sent: int = 4, langs=LANGS, name: str = "train",
                 sr: int = 16000) -> Path:
    """One record per (utterance, target != source); audio under root/audio. Returns the JSONL."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for li, src in enumerate(langs):
        for s in range(n_sent):
            rel = f"audio/{src}/{s}.wav"
            if not (root / rel).exists():
                write_wav(root / rel, freq=200 + 50 * li + 10 * s, sr=sr)
            for tgt in langs:
                if tgt == src:
                    continue
                lines.append({"id": f"{src}{s}_{tgt}", "audio": rel, "src": src, "tgt": tgt,
                              "asr": WORDS[src][s], "s2tt": WORDS[tgt][s], "source": "toy"})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                    encoding="utf-8")
    return path
