"""Per-direction metrics against the sacrebleu command line and jiwer; spBLEU detection."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types

import jiwer
import pytest

from esrt_jax import languages
from esrt_jax import metrics
from esrt_jax.eval import results

# Parallel sentences (FLEURS-like) for a hand-made three-language results file.
SENTS = {
    "eng": [
        "The cat sat on the mat, and then it slept.",
        "A quick brown fox jumps over the lazy dog!",
        "Hello world; this is another test sentence.",
        "We test many things today (including numbers like 42).",
        "Rain is expected in the north by Friday evening.",
        "She bought three apples and a loaf of bread.",
    ],
    "deu": [
        "Die Katze saß auf der Matte und schlief dann.",
        "Ein schneller brauner Fuchs springt über den faulen Hund!",
        "Hallo Welt; das ist noch ein Testsatz.",
        "Wir testen heute viele Dinge (auch Zahlen wie 42).",
        "Im Norden wird bis Freitagabend Regen erwartet.",
        "Sie kaufte drei Äpfel und ein Brot.",
    ],
    "cmn": [
        "猫坐在垫子上，然后睡着了。",
        "一只敏捷的棕色狐狸跳过了懒狗！",
        "你好世界；这是另一个测试句子。",
        "我们今天测试很多东西（包括像42这样的数字）。",
        "预计周五晚上北方会下雨。",
        "她买了三个苹果和一条面包。",
    ],
}
LANGS3 = ("deu", "eng", "cmn")  # the papers' order (ESRT lists deu before eng, cmn last)


def corrupt(text: str, rng: random.Random, p: float) -> str:
    """Drop/duplicate tokens (characters for unspaced scripts) with probability p."""
    spaced = " " in text
    toks = text.split() if spaced else list(text)
    out = []
    for t in toks:
        r = rng.random()
        if r < p / 2:
            continue
        out.append(t)
        if r > 1 - p / 2:
            out.append(t)
    return (" " if spaced else "").join(out)


def make_records(seed: int = 0, quality: dict | None = None) -> list[dict]:
    """Public-schema records for every (utterance, src, tgt) over SENTS, src == tgt included.

    `quality[(src, tgt)]` is the corruption probability of that direction (default 0.25).
    """
    rng = random.Random(seed)
    quality = quality or {}
    recs = []
    for s in SENTS:
        for t in SENTS:
            p = quality.get((s, t), 0.25)
            for i in range(len(SENTS[s])):
                asr_r = corrupt(SENTS[s][i], rng, 0.2)
                s2tt_r = corrupt(SENTS[t][i], rng, p)
                recs.append(
                    {
                        "id": f"{s}_{i}",
                        "audio": f"audio/{s}_{i}.wav",
                        "prompt": f"<|{s}|><|{t}|>",
                        "src": s,
                        "tgt": t,
                        "asr": SENTS[s][i],
                        "s2tt": SENTS[t][i],
                        "asr_r": asr_r,
                        "s2tt_r": s2tt_r,
                        "response": f"{asr_r}<|{s}|><|{t}|>{s2tt_r}",
                    }
                )
    # Awkward but legal content: a newline inside a hypothesis, an empty hypothesis.
    recs[7]["s2tt_r"] = recs[7]["s2tt_r"].replace(" ", "\n", 1)
    recs[8]["s2tt_r"] = ""
    return recs


def write_jsonl(path, recs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "results.jsonl"
    write_jsonl(path, make_records())
    rf = results.read_results(path)
    return rf, metrics.score_records(rf.records)


def _sacrebleu_cli(tmp_path, hyps, refs, tok):
    """Run the sacrebleu command line on hypothesis/reference files; returns its JSON."""
    hyp_f, ref_f = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    # One segment per line, exactly what the files of a by-hand evaluation would hold.
    hyp_f.write_text("".join(" ".join(h.splitlines()).strip() + "\n" for h in hyps), encoding="utf-8")
    ref_f.write_text("".join(" ".join(r.splitlines()).strip() + "\n" for r in refs), encoding="utf-8")
    cmd = [sys.executable, "-m", "sacrebleu", str(ref_f), "-i", str(hyp_f), "-tok", tok,
           "-m", "bleu", "chrf", "--chrf-word-order", "2", "--format", "json", "-w", "4"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    return {d["name"]: d for d in json.loads(out.stdout)}


def test_bleu_chrf_match_sacrebleu_cli(scored, tmp_path):
    rf, scores = scored
    assert set(scores.directions) == {(s, t) for s in LANGS3 for t in LANGS3 if s != t}
    for (s, t), d in scores.directions.items():
        recs = [r for r in rf.records if (r.src, r.tgt) == (s, t)]
        tok = "char" if t == "cmn" else "13a"
        assert d.bleu_tokenize == tok
        cli = _sacrebleu_cli(tmp_path, [r.hyp for r in recs], [r.ref for r in recs], tok)
        assert abs(d.bleu - cli["BLEU"]["score"]) <= 0.01, (s, t)
        assert abs(d.chrf - cli["chrF2++"]["score"]) <= 0.01, (s, t)
        assert scores.signatures[f"bleu_{tok}"] == cli["BLEU"]["signature"]
        assert scores.signatures["chrf++"] == cli["chrF2++"]["signature"]
        assert 0.0 < d.bleu < 100.0 and d.n == 6


def test_wer_cer_match_jiwer(scored):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    rf, scores = scored
    norm = BasicTextNormalizer()
    for lang in LANGS3:
        recs = [r for r in rf.records if r.src == lang]
        refs = [norm(r.asr_ref) for r in recs]
        hyps = [norm(r.asr_hyp) for r in recs]
        fn = jiwer.cer if lang == "cmn" else jiwer.wer
        expected = 100 * fn(refs, hyps)
        a = scores.asr[lang]
        assert a.metric == ("cer" if lang == "cmn" else "wer")
        assert a.n == 18  # 6 utterances x 3 targets (the ASR part of src == tgt records counts)
        assert a.error == pytest.approx(expected, abs=1e-9)
        assert 0 < a.error < 100
    d = scores.directions[("cmn", "eng")]
    recs = [r for r in rf.records if (r.src, r.tgt) == ("cmn", "eng")]
    assert d.asr_error == pytest.approx(100 * jiwer.cer([norm(r.asr_ref) for r in recs], [norm(r.asr_hyp) for r in recs]))


def test_averages_follow_the_papers_tables(scored):
    _, scores = scored
    bleu = {k: d.bleu for k, d in scores.directions.items()}
    assert scores.average("bleu") == pytest.approx(sum(bleu.values()) / 6)
    for lang in LANGS3:
        assert scores.per_source("bleu")[lang] == pytest.approx(sum(v for (s, _), v in bleu.items() if s == lang) / 2)
        assert scores.per_target("bleu")[lang] == pytest.approx(sum(v for (_, t), v in bleu.items() if t == lang) / 2)
    m = scores.matrix("bleu")
    assert scores.languages == LANGS3
    assert [m[i][i] for i in range(3)] == [None, None, None]
    assert m[1][2] == bleu[("eng", "cmn")]
    assert scores.asr_average() == pytest.approx(sum(a.error for a in scores.asr.values()) / 3)
    assert scores.asr_average("cer") == scores.asr["cmn"].error


def test_empty_and_multiline_hypotheses_are_scored(scored):
    rf, scores = scored
    assert sum(d.empty_hyps for d in scores.directions.values()) == 1
    assert [i.kind for i in rf.issues] == ["empty_hypothesis"]
    assert metrics.clean_segment(" a\nb\r\nc ") == "a b c"


def test_tokenisation_follows_target_language(tmp_path):
    recs = [
        {"src": "eng", "tgt": "zho", "s2tt": "我们今天测试很多东西", "s2tt_r": "我们今天测试东西", "asr": "hello world", "asr_r": "hello word"},
        {"src": "zho", "tgt": "jpn", "s2tt": "こんにちは世界", "s2tt_r": "こんにちは", "asr": "你好世界", "asr_r": "你好世界"},
        {"src": "jpn", "tgt": "eng", "s2tt": "hello world", "s2tt_r": "hello", "asr": "x", "asr_r": "x"},
    ]
    write_jsonl(tmp_path / "r.jsonl", recs)
    scores = metrics.score_records(results.read_results(tmp_path / "r.jsonl").records)
    toks = {k: d.bleu_tokenize for k, d in scores.directions.items()}
    assert toks == {("eng", "cmn"): "char", ("cmn", "jpn"): "char", ("jpn", "eng"): "13a"}
    assert scores.asr["eng"].metric == "wer" and scores.asr["cmn"].metric == "cer"
    # char-tokenised BLEU scores a partial Chinese hypothesis above zero, 13a would not
    assert scores.directions[("eng", "cmn")].bleu > 0
    assert metrics.bleu(["我们今天测试东西"], ["我们今天测试很多东西"], "13a")[0] == 0.0


def test_src_equal_tgt_is_skipped_for_translation(tmp_path):
    recs = [{"src": "eng", "tgt": "eng", "s2tt": "a b", "s2tt_r": "a b", "asr": "a b c", "asr_r": "a b"}]
    write_jsonl(tmp_path / "r.jsonl", recs)
    scores = metrics.score_records(results.read_results(tmp_path / "r.jsonl").records)
    assert scores.directions == {}
    assert scores.asr["eng"].error == pytest.approx(100 / 3)


def test_spbleu_unavailable_is_reported(monkeypatch, tmp_path):
    ok, why = metrics.spbleu_status()
    if not ok:
        assert why.startswith("spBLEU unavailable:")
    # No sentencepiece -> unavailable, never downloads.
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    ok, why = metrics.spbleu_status()
    assert not ok and why == "spBLEU unavailable: the sentencepiece package is not installed"
    recs = [results.ScoredRecord(1, "1", "eng", "deu", "a b", "a b", None, None)]
    with pytest.raises(RuntimeError, match="spBLEU unavailable"):
        metrics.score_records(recs, use_spbleu=True)
    assert metrics.score_records(recs).spbleu_note.startswith("spBLEU unavailable")
    # sentencepiece present but no model file -> unavailable, names the path.
    monkeypatch.setitem(sys.modules, "sentencepiece", types.ModuleType("sentencepiece"))
    monkeypatch.setattr(metrics, "_spm_model_path", lambda: str(tmp_path / "models" / "flores200sacrebleuspm"))
    ok, why = metrics.spbleu_status()
    assert not ok and "flores200 SentencePiece model is not at" in why and str(tmp_path) in why
    # ... and available once the file is there.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "flores200sacrebleuspm").write_bytes(b"x")
    assert metrics.spbleu_status()[0]


def test_asr_error_rejects_unknown_metric():
    with pytest.raises(ValueError, match="'wer' or 'cer'"):
        metrics.asr_error(["a"], ["a"], "ter")


def test_languages_helper_consistency():
    # every char-tokenised target is a CER source and vice versa
    for lang in languages.LANGUAGES.values():
        assert (lang.bleu_tokenize == "char") == (lang.asr_metric == "cer")
