"""The language table: every language of ESRT (45) and LLM-SRT (15).

Codes are ISO 639-3 as the papers write them in their `<|xxx|>` tags. Mandarin is `cmn`;
`zho` (the macro-language code LLM-SRT uses) is accepted as an alias and maps to the same
entry. Each entry carries the FLEURS config name (google/fleurs, e.g. `cmn_hans_cn`), the
sacrebleu tokenisation used for BLEU when the language is the *target* (`char` for scripts
written without spaces between words, `13a` otherwise), the ASR metric when it is the
*source* (CER for the same languages, WER otherwise) and the espeak-ng voice (as named in the
`language` line of the voice files shipped by `espeakng-loader`), or None where espeak-ng has
no voice for the language.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Literal, Optional, Sequence

__all__ = [
    "Language",
    "LanguageError",
    "NotTrainedError",
    "LANGUAGES",
    "ALIASES",
    "ESRT_LANGS",
    "LLM_SRT_LANGS",
    "CHAR_LANGS",
    "get",
    "normalize",
    "is_known",
    "tag",
    "check_trained",
    "from_fleurs",
]


class LanguageError(ValueError):
    """An unknown or malformed language code."""


class NotTrainedError(LanguageError):
    """A known language outside the set a model was trained on."""


@dataclasses.dataclass(frozen=True)
class Language:
    """One language.

    code: ISO 639-3 code used in the `<|code|>` tags (canonical spelling, e.g. `cmn`).
    name: English name.
    script: ISO 15924 script code of the FLEURS transcripts (`Latn`, `Hans`, ...).
    fleurs: FLEURS config name (`en_us`, `cmn_hans_cn`, ...).
    bleu_tokenize: sacrebleu tokeniser for BLEU with this language as target.
    asr_metric: `cer` or `wer` for transcripts in this language.
    espeak: espeak-ng voice name, or None when espeak-ng has none.
    """

    code: str
    name: str
    script: str
    fleurs: str
    bleu_tokenize: Literal["char", "13a"]
    asr_metric: Literal["cer", "wer"]
    espeak: Optional[str]

    @property
    def tag(self) -> str:
        return tag_text(self.code)


# Languages written without spaces between words: BLEU on characters, CER for ASR.
CHAR_LANGS = frozenset({"cmn", "yue", "jpn", "kor", "tha", "lao", "mya", "khm"})

# code, English name, script, FLEURS config, espeak-ng voice
_TABLE = (
    ("ara", "Arabic", "Arab", "ar_eg", "ar"),
    ("azj", "Azerbaijani (North)", "Latn", "az_az", "az"),
    ("bul", "Bulgarian", "Cyrl", "bg_bg", "bg"),
    ("ben", "Bengali", "Beng", "bn_in", "bn"),
    ("cat", "Catalan", "Latn", "ca_es", "ca"),
    ("ces", "Czech", "Latn", "cs_cz", "cs"),
    ("dan", "Danish", "Latn", "da_dk", "da"),
    ("deu", "German", "Latn", "de_de", "de"),
    ("ell", "Greek", "Grek", "el_gr", "el"),
    ("eng", "English", "Latn", "en_us", "en-us"),
    ("spa", "Spanish", "Latn", "es_419", "es-419"),
    ("fas", "Persian", "Arab", "fa_ir", "fa"),
    ("fin", "Finnish", "Latn", "fi_fi", "fi"),
    ("fra", "French", "Latn", "fr_fr", "fr-fr"),
    ("heb", "Hebrew", "Hebr", "he_il", "he"),
    ("hin", "Hindi", "Deva", "hi_in", "hi"),
    ("hrv", "Croatian", "Latn", "hr_hr", "hr"),
    ("hun", "Hungarian", "Latn", "hu_hu", "hu"),
    ("ind", "Indonesian", "Latn", "id_id", "id"),
    ("ita", "Italian", "Latn", "it_it", "it"),
    ("jpn", "Japanese", "Jpan", "ja_jp", "ja"),
    ("kaz", "Kazakh", "Cyrl", "kk_kz", "kk"),
    ("khm", "Khmer", "Khmr", "km_kh", None),
    ("kor", "Korean", "Kore", "ko_kr", "ko"),
    ("lao", "Lao", "Laoo", "lo_la", None),
    ("msa", "Malay", "Latn", "ms_my", "ms"),
    ("mya", "Burmese", "Mymr", "my_mm", "my"),
    ("nob", "Norwegian Bokmål", "Latn", "nb_no", "nb"),
    ("nld", "Dutch", "Latn", "nl_nl", "nl"),
    ("pol", "Polish", "Latn", "pl_pl", "pl"),
    ("por", "Portuguese", "Latn", "pt_br", "pt-br"),
    ("ron", "Romanian", "Latn", "ro_ro", "ro"),
    ("rus", "Russian", "Cyrl", "ru_ru", "ru"),
    ("slk", "Slovak", "Latn", "sk_sk", "sk"),
    ("slv", "Slovenian", "Latn", "sl_si", "sl"),
    ("swe", "Swedish", "Latn", "sv_se", "sv"),
    ("tam", "Tamil", "Taml", "ta_in", "ta"),
    ("tha", "Thai", "Thai", "th_th", "th"),
    ("tgl", "Tagalog (Filipino)", "Latn", "fil_ph", None),
    ("tur", "Turkish", "Latn", "tr_tr", "tr"),
    ("urd", "Urdu", "Arab", "ur_pk", "ur"),
    ("uzb", "Uzbek", "Latn", "uz_uz", "uz"),
    ("vie", "Vietnamese", "Latn", "vi_vn", "vi"),
    ("yue", "Cantonese", "Hant", "yue_hant_hk", "yue"),
    ("cmn", "Mandarin Chinese", "Hans", "cmn_hans_cn", "cmn"),
)


def _make(code: str, name: str, script: str, fleurs: str, espeak: Optional[str]) -> Language:
    char = code in CHAR_LANGS
    return Language(
        code=code,
        name=name,
        script=script,
        fleurs=fleurs,
        bleu_tokenize="char" if char else "13a",
        asr_metric="cer" if char else "wer",
        espeak=espeak,
    )


LANGUAGES: dict[str, Language] = {row[0]: _make(*row) for row in _TABLE}

# Other spellings of the same language -> canonical code.
ALIASES: dict[str, str] = {"zho": "cmn"}

# The papers' language lists, in the papers' order.
ESRT_LANGS: tuple[str, ...] = tuple(row[0] for row in _TABLE)
LLM_SRT_LANGS: tuple[str, ...] = (
    "deu", "eng", "fra", "ind", "ita", "jpn", "kor", "nld",
    "por", "rus", "spa", "tha", "vie", "yue", "zho",
)  # fmt: skip

_FLEURS_TO_CODE = {lang.fleurs: lang.code for lang in LANGUAGES.values()}


def normalize(code: str) -> str:
    """Canonical code for `code` (case-insensitive, aliases resolved); raises LanguageError."""
    return get(code).code


def is_known(code: object) -> bool:
    """True if `code` is a known code or alias."""
    if not isinstance(code, str):
        return False
    key = code.strip().lower()
    return key in LANGUAGES or key in ALIASES


def get(code: str) -> Language:
    """The `Language` for an ISO 639-3 code or alias (`zho` -> `cmn`), case-insensitive.

    Unknown codes raise `LanguageError` listing close matches.
    """
    if not isinstance(code, str):
        raise LanguageError(f"language code must be a string, got {type(code).__name__} {code!r}")
    key = code.strip().lower()
    key = ALIASES.get(key, key)
    if key in LANGUAGES:
        return LANGUAGES[key]
    candidates = list(LANGUAGES) + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.5)
    # Names and FLEURS configs help when someone passes "german" or "de_de".
    by_name = {lang.name.lower(): lang.code for lang in LANGUAGES.values()}
    close += [by_name[n] for n in difflib.get_close_matches(key, list(by_name), n=3, cutoff=0.6)]
    if key in _FLEURS_TO_CODE:
        close.insert(0, _FLEURS_TO_CODE[key])
    close = list(dict.fromkeys(close))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise LanguageError(
        f"unknown language code {code!r}{hint} (known: {len(LANGUAGES)} ISO 639-3 codes, "
        f"see esrt_jax.languages.ESRT_LANGS)"
    )


def tag_text(code: str) -> str:
    """`<|code|>` exactly as spelled, unchecked: the one place the tag syntax is written."""
    return f"<|{code}|>"


def srt_marker(src: str, tgt: str) -> str:
    """`<|src|><|tgt|>` as spelled, unchecked: the SRT separator and the SMT/SRT prompt tail."""
    return tag_text(src) + tag_text(tgt)


def check_trained(trained: Sequence[str] | None, src: str, tgt: str) -> None:
    """Raise `NotTrainedError` naming src/tgt codes outside a model's `trained` set (None: any)."""
    if trained is None:
        return
    bad = [f"{k}={c}" for k, c in (("src", src), ("tgt", tgt)) if get(c).code not in trained]
    if bad:
        raise NotTrainedError(f"this model was not trained on {', '.join(bad)}; "
                              f"it knows {', '.join(trained)}")


def tag(code: str) -> str:
    """The prompt tag `<|code|>` for a known code, keeping the spelling asked for.

    `tag("zho") == "<|zho|>"` (LLM-SRT's checkpoints were trained with that spelling) and
    `tag("cmn") == "<|cmn|>"` (ESRT's). Unknown codes raise LanguageError.
    """
    get(code)
    return tag_text(code.strip().lower())


def from_fleurs(config: str) -> Language:
    """The `Language` for a FLEURS config name such as `cmn_hans_cn` or `en_us`."""
    key = config.strip().lower()
    if key in _FLEURS_TO_CODE:
        return LANGUAGES[_FLEURS_TO_CODE[key]]
    close = difflib.get_close_matches(key, list(_FLEURS_TO_CODE), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise LanguageError(f"FLEURS config {config!r} is not one of our languages{hint}")
