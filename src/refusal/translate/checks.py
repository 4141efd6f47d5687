"""Quality checks for machine-translated prompts.

Each translation is checked for being empty, unchanged (still the source text), written in the wrong script for the
target language (by Unicode ranges), identified as another language (by ``langid``, when installed; otherwise the
report says "not checked", never a silent pass), refused by the translating model, padded with extra text or much
longer than its source (an answer instead of a translation), degenerate (repeating itself), and, given a
back-translation, for low chrF similarity between the back-translation and the source. Thresholds were set on
PolyRefuse's published translations (comments below give the measurements). :func:`require_quality` stops a run
whose share of flagged items is above a threshold unless the user allows it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from ..errors import RefusalError

# Unicode blocks per script (start, end inclusive). Only letters and combining marks inside these blocks count.
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "Latin": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00AA, 0x00AA), (0x00BA, 0x00BA), (0x00C0, 0x024F),
              (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A)),
    "Cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "Greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "Armenian": ((0x0530, 0x058F),),
    "Hebrew": ((0x0590, 0x05FF),),
    "Arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "Devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "Bengali": ((0x0980, 0x09FF),),
    "Tamil": ((0x0B80, 0x0BFF),),
    "Thai": ((0x0E00, 0x0E7F),),
    "Georgian": ((0x10A0, 0x10FF),),
    "Hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "Ethiopic": ((0x1200, 0x139F), (0x2D80, 0x2DDF), (0xAB00, 0xAB2F), (0x1E7E0, 0x1E7FF)),
    "Hiragana": ((0x3040, 0x309F),),
    "Katakana": ((0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "Han": ((0x3005, 0x3007), (0x3021, 0x3029), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
            (0x20000, 0x2FA1F)),
}

# the scripts a language is written in (ISO 639-1 codes); unknown languages are not script-checked
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"Latin"}) for code in (
        "en", "fr", "es", "de", "sw", "it", "pt", "nl", "pl", "cs", "sk", "sl", "hr", "ro", "hu", "fi", "sv", "da",
        "no", "nb", "is", "et", "lv", "lt", "tr", "az", "id", "ms", "vi", "tl", "ca", "gl", "eu", "ga", "cy", "sq",
        "af", "yo", "ha", "ig", "zu", "xh", "so", "eo", "la", "uz", "jv", "su", "mt", "lb", "rw")},
    **{code: frozenset({"Cyrillic"}) for code in ("ru", "uk", "be", "bg", "mk", "kk", "ky", "tg", "mn")},
    "sr": frozenset({"Cyrillic", "Latin"}),
    "zh": frozenset({"Han"}),
    "ja": frozenset({"Han", "Hiragana", "Katakana"}),
    "ko": frozenset({"Hangul", "Han"}),
    "th": frozenset({"Thai"}),
    "am": frozenset({"Ethiopic"}),
    "ti": frozenset({"Ethiopic"}),
    "el": frozenset({"Greek"}),
    "hy": frozenset({"Armenian"}),
    "he": frozenset({"Hebrew"}),
    "ka": frozenset({"Georgian"}),
    **{code: frozenset({"Arabic"}) for code in ("ar", "fa", "ur", "ps")},
    **{code: frozenset({"Devanagari"}) for code in ("hi", "mr", "ne")},
    "bn": frozenset({"Bengali"}),
    "ta": frozenset({"Tamil"}),
}

# A Han character carries about a word's meaning, a Latin letter a fraction of one: counted one to one, a Chinese
# prompt that names "Python" or "SQL" looks half Latin. So a Han character weighs as much as HAN_WEIGHT letters. On
# PolyRefuse's 572 Chinese harmful test prompts, weight 1 puts 2 below half Han (lowest 0.47), weight 3 none
# (lowest 0.73); untranslated English scores 0 either way.
HAN_WEIGHT = 3.0

# Below this share of letters in the target's script a translation is flagged. On PolyRefuse's harmful and harmless
# test prompts (fr es de ru zh th) the lowest share is 0.39 (Thai prompts quoting an English title), untranslated
# English scores 0.
MIN_SCRIPT_SHARE = 0.3

# chrF of a back-translation against its source: on PolyRefuse's back-translated harmful test prompts (fr es de ru
# th, 572 each) at most 3 of 572 fall below 25 (th; median 52-71 by language), while unrelated pairs of prompts
# score below 25 for 95 %.
MIN_BACK_CHRF = 25.0

# A translation longer than MAX_LENGTH_RATIO times its source (Han characters counted HAN_WEIGHT times, plus a
# 30-character allowance) is flagged: a model that answered instead of translating writes much more. PolyRefuse's
# translations are at most 1.9 times their source (German).
MAX_LENGTH_RATIO = 3.0

# Degenerate output repeats itself ("na mimi na mimi na mimi ..."): the share of distinct character 4-grams (spaces
# removed; checked from 30 4-grams on) falls to 0.01-0.16 there, while PolyRefuse's translations stay above 0.67.
MIN_DISTINCT_4GRAMS = 0.4

FLAGS = ("empty", "unchanged", "wrong_script", "wrong_language", "refused", "extra_text", "too_long", "repetitive",
         "low_back_chrf")


def _script_of(ch: str) -> str | None:
    cp = ord(ch)
    for script, ranges in SCRIPT_RANGES.items():
        for lo, hi in ranges:
            if lo <= cp <= hi:
                return script
    return None


def script_counts(text: str) -> Counter:
    """Letters (and combining marks inside a known script's block) per script; letters outside every known block
    count as ``"Other"``. Digits, punctuation, spaces and symbols are not counted."""
    out: Counter = Counter()
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] not in "LM":
            continue
        script = _script_of(ch)
        if script is None:
            if cat[0] == "M":  # a combining mark shared by scripts (e.g. U+0301): belongs to its base letter
                continue
            script = "Other"
        out[script] += 1
    return out


def script_share(text: str, target: str) -> float | None:
    """Share of the text's letters written in the target language's scripts (Han weighted by :data:`HAN_WEIGHT`);
    ``None`` when the language's script is not known or the text has no letters."""
    scripts = LANGUAGE_SCRIPTS.get(_base(target))
    if scripts is None:
        return None
    counts = script_counts(text)
    weight = {s: n * (HAN_WEIGHT if s == "Han" else 1.0) for s, n in counts.items()}
    total = sum(weight.values())
    if not total:
        return None
    return sum(w for s, w in weight.items() if s in scripts) / total


def _base(lang: str) -> str:
    """``zh-CN`` → ``zh``, ``pt_BR`` → ``pt``."""
    return re.split(r"[-_]", lang.strip().lower())[0]


# ---------------------------------------------------------------- language identification (optional: langid)

@dataclass(frozen=True)
class LanguageId:
    """How (or whether) the language of each translation was identified."""

    checked: bool
    status: str  # "checked with langid 1.1.6 (...)" or "not checked: ..."


@lru_cache(maxsize=1)
def _langid_identifier() -> tuple[Any, frozenset[str]]:  # langid's identifier (untyped), its languages
    import langid.langid as ll  # optional: pip install langid

    ident = ll.LanguageIdentifier.from_modelstring(ll.model, norm_probs=True)
    return ident, frozenset(ident.nb_classes)


def _langid_version() -> str:
    try:
        from importlib.metadata import version

        return version("langid")
    except Exception:  # metadata missing in an unusual install: the check itself still works
        return "unknown version"


# A short prompt can be mistaken for a close neighbour (es/gl/pt, de/lb/nl, ru/uk/bg, sw/tl): the target language
# passes when it is among the identifier's first LANGID_TOP_K guesses. On PolyRefuse's 572 harmful test prompts per
# language (fr es de ru zh th), top-2 flags at most 2 good translations (es; top-1 flags 15 of the Spanish ones)
# and passes at most 10 untranslated English prompts as the target (es; none for de ru zh th); top-3 passes 24.
LANGID_TOP_K = 2


def identify_languages(texts: list[str], target: str, top_k: int = LANGID_TOP_K) -> tuple[LanguageId, list]:
    """langid's first guess per text and whether the target is among its ``top_k`` guesses.

    Returns ``(status, [(guess, ok) or None per text])``; every entry is ``None`` (and ``status.checked`` false, with
    the reason) when langid is not installed or has no model for the target language."""
    try:
        ident, known = _langid_identifier()
    except ImportError:
        return LanguageId(False, "not checked: the 'langid' package is not installed (pip install langid)"), \
            [None] * len(texts)
    code = _base(target)
    if code not in known:
        return LanguageId(False, f"not checked: langid has no model for '{target}'"), [None] * len(texts)
    out: list[tuple[str, bool] | None] = []
    for t in texts:
        if not t.strip():
            out.append(None)
            continue
        ranked = ident.rank(t)
        top = [lang for lang, _ in ranked[:top_k]]
        out.append((top[0], code in top))
    return LanguageId(True, f"checked with langid {_langid_version()} (target among its top {top_k} guesses)"), out


# ---------------------------------------------------------------- chrF (as sacrebleu's sentence chrF, defaults)

def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """Sentence-level chrF in [0, 100], as sacrebleu's default ``CHRF()`` computes it (chrF2: character n-grams of
    orders 1-6 with whitespace removed, case-sensitive, precision and recall averaged over the orders that both
    strings have, then the F-beta score with beta = 2)."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        n_hyp, n_ref = sum(h.values()), sum(r.values())
        if n_hyp == 0 or n_ref == 0:  # an order one string is too short for does not count (effective order)
            continue
        match = sum(min(c, r[g]) for g, c in h.items() if g in r)
        precisions.append(match / n_hyp)
        recalls.append(match / n_ref)
    if not precisions:
        return 0.0
    prec, rec = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if prec + rec == 0:
        return 0.0
    b2 = beta ** 2
    return 100 * (1 + b2) * prec * rec / (b2 * prec + rec)


# ---------------------------------------------------------------- the report

@dataclass
class ItemCheck:
    index: int
    flags: list[str]
    script_share: float | None = None  # share of letters in the target's scripts
    language: str | None = None  # langid's first guess (None when not checked)
    back_chrf: float | None = None  # chrF of the back-translation against the source


@dataclass
class Report:
    """Per-item flags for one target language, and what was (and was not) checked."""

    target: str
    items: list[ItemCheck]
    language_id: str  # how the language was identified, or why it was not
    back_translation: str  # "checked with chrF ..." or "not checked: ..."
    thresholds: dict = field(default_factory=dict)

    @property
    def flagged(self) -> list[ItemCheck]:
        return [i for i in self.items if i.flags]

    @property
    def flagged_share(self) -> float:
        return len(self.flagged) / len(self.items) if self.items else 0.0

    def counts(self) -> dict[str, int]:
        c = Counter(f for i in self.items for f in i.flags)
        return {f: c[f] for f in FLAGS if c[f]}

    def summary(self) -> str:
        counts = ", ".join(f"{f} {n}" for f, n in self.counts().items()) or "none"
        return (f"{self.target}: {len(self.flagged)} of {len(self.items)} translations flagged "
                f"({self.flagged_share:.1%}; {counts}). Language identification: {self.language_id}. "
                f"Back-translation: {self.back_translation}.")

    def to_dict(self) -> dict:
        return {"target": self.target, "n": len(self.items), "flagged": len(self.flagged),
                "flagged_share": round(self.flagged_share, 4), "counts": self.counts(),
                "language_id": self.language_id, "back_translation": self.back_translation,
                "thresholds": self.thresholds, "items": [asdict(i) for i in self.items]}


def _refusal_starts(target: str) -> list[str]:
    """Phrases that begin a refusal, in English and in the target language. Only the phrase lists: the openings
    ("As", "Ich bin", "作为") also begin ordinary prompts ("As a doctor, ...")."""
    from .phrases import PHRASE_LANGUAGES, refusal_phrases

    out = refusal_phrases("en")["phrases"]
    if _base(target) in PHRASE_LANGUAGES and _base(target) != "en":
        out += refusal_phrases(_base(target))["phrases"]
    return [p for p in out if p.strip()]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _paragraphs(text: str) -> int:
    return sum(1 for p in re.split(r"\n\s*\n", text) if p.strip())


def _weighted_length(text: str) -> float:
    han = script_counts(text)["Han"]
    return len(text) + (HAN_WEIGHT - 1) * han


def distinct_4grams(text: str) -> float | None:
    """Share of distinct character 4-grams (whitespace removed); ``None`` below 30 4-grams."""
    s = "".join(text.split())
    grams = [s[i:i + 4] for i in range(len(s) - 3)]
    return len(set(grams)) / len(grams) if len(grams) >= 30 else None


def check_translations(
    sources: list[str], translations: list[str], target: str, back: list[str] | None = None, *,
    source: str = "en", min_script_share: float = MIN_SCRIPT_SHARE, min_back_chrf: float = MIN_BACK_CHRF,
    langid: bool = True, max_length_ratio: float = MAX_LENGTH_RATIO,
) -> Report:
    """Flag each translation of ``sources`` into ``target``.

    Flags: ``empty``; ``unchanged`` (equal to the source, up to case and spacing, when the target differs from the
    source language); ``wrong_script`` (less than ``min_script_share`` of its letters in the target's script);
    ``wrong_language`` (langid does not rank the target among its first guesses; only when langid is installed and
    ``langid`` is true: the report says which); ``refused`` (it starts like a refusal, in English or the target
    language, where the source does not: a safety-tuned translating model declined); ``extra_text`` (more
    paragraphs than the source: an answer or a comment after the translation); ``too_long`` (over
    ``max_length_ratio`` times the source's length: an answer instead of a translation); ``repetitive``
    (degenerate, looping output); ``low_back_chrf`` (given ``back``, the back-translations into the source
    language, chrF of back-translation against source below ``min_back_chrf``: the meaning drifted)."""
    if len(translations) != len(sources):
        raise RefusalError(f"{len(translations)} translations were given for {len(sources)} source texts.",
                           "Pass one translation per source text, in the same order.")
    if back is not None and len(back) != len(sources):
        raise RefusalError(f"{len(back)} back-translations were given for {len(sources)} source texts.",
                           "Pass one back-translation per source text, in the same order, or none.")
    same_language = _base(target) == _base(source)
    if langid:
        lid, guesses = identify_languages(translations, target)
    else:
        lid, guesses = LanguageId(False, "not checked: turned off by the caller"), [None] * len(sources)
    openings = _refusal_starts(target)
    items = []
    for i, (src, tr) in enumerate(zip(sources, translations)):
        item = ItemCheck(index=i, flags=[])
        items.append(item)
        if not tr or not tr.strip():
            item.flags.append("empty")
            continue
        if not same_language and _norm(tr) == _norm(src):
            item.flags.append("unchanged")
        item.script_share = script_share(tr, target)
        if item.script_share is not None and item.script_share < min_script_share:
            item.flags.append("wrong_script")
        if guesses[i] is not None:
            item.language, ok = guesses[i]
            if not ok:
                item.flags.append("wrong_language")
        stripped = tr.lstrip(" \"'“”«»「『*")
        if any(stripped.startswith(o) for o in openings) and not any(src.lstrip().startswith(o) for o in openings):
            item.flags.append("refused")
        if _paragraphs(tr) > _paragraphs(src):
            item.flags.append("extra_text")
        if _weighted_length(tr) > max_length_ratio * _weighted_length(src) + 30:
            item.flags.append("too_long")
        distinct = distinct_4grams(tr)
        if distinct is not None and distinct < MIN_DISTINCT_4GRAMS:
            item.flags.append("repetitive")
        if back is not None:
            item.back_chrf = round(chrf(back[i], src), 2)
            if item.back_chrf < min_back_chrf:
                item.flags.append("low_back_chrf")
    back_status = ("not checked: no back-translation given" if back is None
                   else f"checked with chrF2 (back-translation against source; flagged below {min_back_chrf})")
    return Report(target=target, items=items, language_id=lid.status, back_translation=back_status,
                  thresholds={"min_script_share": min_script_share, "min_back_chrf": min_back_chrf,
                              "max_length_ratio": max_length_ratio, "min_distinct_4grams": MIN_DISTINCT_4GRAMS,
                              "langid_top_k": LANGID_TOP_K if lid.checked else None})


def require_quality(report: Report, max_flagged_share: float = 0.05, allow: bool = False) -> Report:
    """Raise unless at most ``max_flagged_share`` of the translations are flagged, or ``allow`` is true."""
    if report.flagged_share <= max_flagged_share or allow:
        return report
    examples = "; ".join(f"#{i.index}: {', '.join(i.flags)}" for i in report.flagged[:5])
    raise RefusalError(
        f"{report.flagged_share:.1%} of the {report.target} translations are flagged, above the allowed "
        f"{max_flagged_share:.1%}. {report.summary()} First flagged: {examples}.",
        "Look at the flagged items (the report lists each one), re-translate them with a better backend or fix them "
        "by hand in the translation cache; or raise the allowed share, or allow poor translations explicitly to go "
        "on anyway.",
    )
