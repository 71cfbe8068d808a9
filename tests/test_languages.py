"""The language table: counts, order, aliases, errors, metrics, FLEURS names, espeak-ng voices."""

import ast
import dataclasses
from pathlib import Path

import pytest

from esrt_jax import languages as L

ESRT_ORDER = (
    "ara azj bul ben cat ces dan deu ell eng spa fas fin fra heb hin hrv hun ind ita jpn kaz khm "
    "kor lao msa mya nob nld pol por ron rus slk slv swe tam tha tgl tur urd uzb vie yue cmn"
).split()
LLM_SRT_ORDER = "deu eng fra ind ita jpn kor nld por rus spa tha vie yue zho".split()


def test_language_lists_in_paper_order():
    assert L.ESRT_LANGS == tuple(ESRT_ORDER) and len(set(L.ESRT_LANGS)) == 45
    assert L.LLM_SRT_LANGS == tuple(LLM_SRT_ORDER) and len(set(L.LLM_SRT_LANGS)) == 15
    # every LLM-SRT language is one of ESRT's (zho through its alias)
    assert {L.normalize(c) for c in L.LLM_SRT_LANGS} <= set(L.ESRT_LANGS)
    assert set(L.LANGUAGES) == set(L.ESRT_LANGS)


def test_alias_and_case():
    assert L.get("zho") is L.get("cmn") is L.get(" CMN ")
    assert L.normalize("ZHO") == "cmn"
    assert L.get("zho").fleurs == "cmn_hans_cn"
    assert L.is_known("zho") and L.is_known("Eng") and not L.is_known("xx") and not L.is_known(None)


def test_tags_keep_the_spelling():
    assert L.tag("eng") == "<|eng|>"
    assert L.tag("zho") == "<|zho|>"
    assert L.tag("cmn") == "<|cmn|>"
    assert L.get("zho").tag == "<|cmn|>"
    with pytest.raises(L.LanguageError):
        L.tag("xyz")


def test_unknown_codes_suggest_close_matches():
    with pytest.raises(L.LanguageError, match=r"unknown language code 'enx'; did you mean eng"):
        L.get("enx")
    with pytest.raises(L.LanguageError, match=r"unknown language code 'de_de'; did you mean deu"):
        L.get("de_de")
    with pytest.raises(L.LanguageError, match=r"did you mean .*zho"):
        L.get("zh")
    with pytest.raises(L.LanguageError, match=r"unknown language code 'qqq' \(known: 45"):
        L.get("qqq")
    with pytest.raises(L.LanguageError, match="must be a string"):
        L.get(7)


def test_tokenisation_and_asr_metric():
    char = {"cmn", "yue", "jpn", "kor", "tha", "lao", "mya", "khm"}
    for code, lang in L.LANGUAGES.items():
        if code in char:
            assert (lang.bleu_tokenize, lang.asr_metric) == ("char", "cer"), code
        else:
            assert (lang.bleu_tokenize, lang.asr_metric) == ("13a", "wer"), code
    assert L.get("zho").bleu_tokenize == "char"
    assert L.CHAR_LANGS == char


def test_language_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        L.get("eng").code = "xxx"


def _fleurs_configs():
    """The FLEURS config list as shipped in tensorflow-datasets' xtreme_s builder (parsed, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_datasets")
    src = Path(spec.origin).parent / "audio" / "xtreme_s" / "xtreme_s.py"
    tree = ast.parse(src.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_FLEURS_LANG" for t in node.targets):
            call = node.value  # sorted([...])
            return {elt.value for elt in call.args[0].elts}
    raise AssertionError("_FLEURS_LANG not found")


def test_fleurs_config_names_are_real():
    configs = _fleurs_configs()
    assert "cmn_hans_cn" in configs and "en_us" in configs and "yue_hant_hk" in configs
    for lang in L.LANGUAGES.values():
        assert lang.fleurs in configs, (lang.code, lang.fleurs)
        assert L.from_fleurs(lang.fleurs) is lang
    assert len({lang.fleurs for lang in L.LANGUAGES.values()}) == 45
    with pytest.raises(L.LanguageError, match=r"FLEURS config 'en_gb' is not one of our languages; did you mean en_us"):
        L.from_fleurs("en_gb")


def _espeak_voices():
    """Voice names from the `language` lines of the voice files shipped by espeakng-loader."""
    import espeakng_loader

    names = set()
    for f in (Path(espeakng_loader.get_data_path()) / "lang").rglob("*"):
        if f.is_file():
            for line in f.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "language":
                    names.add(parts[1].lower())
    return names


def test_espeak_voices_exist():
    voices = _espeak_voices()
    assert len(voices) > 100
    missing = []
    for lang in L.LANGUAGES.values():
        if lang.espeak is not None and lang.espeak not in voices:
            missing.append((lang.code, lang.espeak))
    assert not missing
    # espeak-ng ships no Khmer, Lao or Tagalog voice
    assert {c for c, lang in L.LANGUAGES.items() if lang.espeak is None} == {"khm", "lao", "tgl"}
    assert L.get("eng").espeak == "en-us" and L.get("cmn").espeak == "cmn"
