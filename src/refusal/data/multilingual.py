"""Prompt sets in several languages, aligned item by item.

Three ways in:

* :func:`load_polyrefuse` — a folder laid out like PolyRefuse: ``harmful_train_<lang>.json``,
  ``harmful_val_<lang>.json``, ``harmful_test_<lang>.json`` and the same for ``harmless``, each a JSON list of
  ``{"instruction", "category"}``. Some PolyRefuse files hold the English original in ``instruction`` and the
  translation in ``instruction_translated``: the translation is taken, and the original kept as
  ``source_instruction`` (which lets :meth:`MultilingualSet.aligned` verify the alignment). English train/val may be
  missing there and come from a separate folder laid out like the paper's (``splits/harmful_train.json`` ...).
* :func:`load_language_files` — any file per language (``{"fr": "fr.json", "de": "de.csv"}``), parsed by
  :func:`refusal.data.load_file`.
* :func:`translate_builtin` — the built-in sets translated through a backend and a cache.

Items are aligned across languages by index: row i of every language is the same prompt. Where files carry the
English original, :meth:`MultilingualSet.aligned` checks it; elsewhere it checks only the lengths, so files that hold
different subsets of equal size (PolyRefuse's Chinese harmless train/val are another Alpaca sample than the other
languages') cannot be told apart: say so where it matters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RefusalError
from .sources import SPLITS, builtin, load_file

if TYPE_CHECKING:
    from ..translate import TranslationCache, Translator

KINDS = ("harmful", "harmless")
_LANG_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?")


@dataclass
class MultilingualSet:
    """``prompts[lang][kind][split]`` → records ``{"instruction", "category", "language"}`` (plus
    ``source_instruction``, the English original, where known); ``origin`` says where each came from."""

    prompts: dict[str, dict[str, dict[str, list[dict]]]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # "lang/kind/split" → file path or translation provenance

    @property
    def languages(self) -> list[str]:
        return list(self.prompts)

    def add(self, lang: str, kind: str, split: str, rows: list[dict], origin: str) -> None:
        recs = [{**r, "language": lang} for r in rows]
        self.prompts.setdefault(lang, {}).setdefault(kind, {})[split] = recs
        self.origin[f"{lang}/{kind}/{split}"] = origin

    def get(self, lang: str, kind: str, split: str = "all") -> list[dict]:
        if lang not in self.prompts:
            raise RefusalError(f"No prompts were loaded for the language '{lang}' (loaded: "
                               f"{', '.join(self.languages) or 'none'}).", "Load that language, or drop it.")
        have = self.prompts[lang].get(kind, {})
        if split not in have:
            raise RefusalError(f"No {kind} {split} prompts were loaded for '{lang}' (loaded {kind} splits: "
                               f"{', '.join(have) or 'none'}).", f"Add the {kind} {split} file for '{lang}'.")
        return have[split]

    def merge(self, other: MultilingualSet) -> MultilingualSet:
        out = MultilingualSet()
        for s in (self, other):
            for lang, kinds in s.prompts.items():
                for kind, splits in kinds.items():
                    for split, rows in splits.items():
                        out.prompts.setdefault(lang, {}).setdefault(kind, {})[split] = rows
            out.origin.update(s.origin)
        return out

    def aligned(self, kind: str, split: str = "all", languages: Sequence[str] | None = None) -> dict[str, list[dict]]:
        """The ``kind``/``split`` prompts of each language, checked to be aligned by index: equal lengths and, where
        the English originals are known in two languages, equal originals row by row."""
        langs = list(languages) if languages is not None else self.languages
        sets = {lang: self.get(lang, kind, split) for lang in langs}
        sizes = {lang: len(rows) for lang, rows in sets.items()}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{lang} {n}" for lang, n in sizes.items())
            raise RefusalError(
                f"The {kind} {split} prompts differ in length across languages ({listed}), so they are not aligned "
                "item by item.",
                "Use translations of the same prompts in every language (for PolyRefuse, English harmless train/val "
                "are not in the set: leave English out of those splits or translate them), or compare languages "
                "without pairing items.",
            )
        originals = {lang: [_original(r, lang) for r in rows] for lang, rows in sets.items()}
        known = {lang: [x for x in o if x is not None] for lang, o in originals.items() if None not in o}
        if len(known) > 1:
            (ref_lang, ref), *rest = known.items()
            for lang, o in rest:
                bad = next((i for i, (a, b) in enumerate(zip(ref, o)) if _norm(a) != _norm(b)), None)
                if bad is not None:
                    raise RefusalError(
                        f"Row {bad} of the {kind} {split} prompts is not the same prompt in '{ref_lang}' and '{lang}' "
                        f"(originals {ref[bad][:60]!r} and {o[bad][:60]!r}): the files are not aligned.",
                        "Give files that translate the same prompts in the same order.",
                    )
        return sets


def _original(rec: dict, lang: str) -> str | None:
    if rec.get("source_instruction") is not None:
        return rec["source_instruction"]
    return rec["instruction"] if lang == "en" else None


def _norm(text: str) -> str:
    return " ".join(text.split())


def load_records(path: str | Path) -> list[dict]:
    """One language's prompts from a file: as :func:`refusal.data.load_file`, except that a JSON list whose rows
    carry ``instruction_translated`` (PolyRefuse's test files) gives that translation, with the English original
    as ``source_instruction``."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".json" and p.is_file():
        try:
            rows = json.loads(p.read_text("utf-8"))
        except json.JSONDecodeError:
            rows = None  # load_file reports it
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows) \
                and any("instruction_translated" in r for r in rows):
            out = []
            for i, r in enumerate(rows):
                text = r.get("instruction_translated")
                if not isinstance(text, str):
                    raise RefusalError(f"Row {i} of '{path}' has no 'instruction_translated' text, unlike the others.",
                                       "Give every row its translation.")
                if text.strip():
                    out.append({"instruction": text, "category": r.get("category"),
                                "source_instruction": r.get("instruction")})
            if not out:
                raise RefusalError(f"'{path}' holds no instructions.", "Point to a file with at least one instruction.")
            return out
    return load_file(p)


def _paper_file(folder: Path, kind: str, split: str) -> Path | None:
    for d in (folder / "splits", folder):
        if (d / f"{kind}_{split}.json").is_file():
            return d / f"{kind}_{split}.json"
    return None


def load_polyrefuse(
    folder: str | Path, languages: Sequence[str] | None = None, *, kinds: Sequence[str] = KINDS,
    splits: Sequence[str] = SPLITS, english: str | Path | None = None,
) -> MultilingualSet:
    """Load ``<kind>_<split>_<lang>.json`` for each language, kind and split from a PolyRefuse-style folder.

    ``languages`` defaults to every language with a file in the folder. English files missing from the folder are
    taken from ``english``, a folder laid out like the paper's (``splits/<kind>_<split>.json`` or
    ``<kind>_<split>.json``). Anything still missing is an error that lists every missing file."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise RefusalError(f"The multilingual prompt folder '{folder}' does not exist.",
                           "Point to a folder laid out like PolyRefuse (harmful_train_fr.json, ...).")
    for k in kinds:
        if k not in KINDS:
            raise RefusalError(f"Unknown prompt kind '{k}'.", f"Use {' or '.join(KINDS)}.")
    for s in splits:
        if s not in SPLITS:
            raise RefusalError(f"Unknown split '{s}'.", f"Use {', '.join(SPLITS)}.")
    if languages is None:
        found = set()
        for k in kinds:
            for s in splits:
                found |= {p.stem[len(f"{k}_{s}_"):] for p in root.glob(f"{k}_{s}_*.json")}
        found = {lang for lang in found if _LANG_CODE.fullmatch(lang)}  # not "back_translated_de"
        languages = sorted(found)
        if not languages:
            raise RefusalError(f"The folder '{folder}' has no <kind>_<split>_<lang>.json files.",
                               "Lay it out like PolyRefuse (harmful_train_fr.json, harmless_test_de.json, ...).")
    eng = Path(english).expanduser() if english is not None else None
    if eng is not None and not eng.is_dir():
        raise RefusalError(f"The English prompt folder '{english}' does not exist.",
                           "Point to a folder laid out like the paper's (splits/harmful_train.json, ...).")
    out, missing = MultilingualSet(), []
    for lang in languages:
        for k in kinds:
            for s in splits:
                path = root / f"{k}_{s}_{lang}.json"
                if not path.is_file() and lang == "en" and eng is not None:
                    path = _paper_file(eng, k, s) or path
                if not path.is_file():
                    missing.append(f"{k}_{s}_{lang}.json")
                    continue
                out.add(lang, k, s, load_records(path), str(path))
    if missing:
        hint = (" English train/val are not in PolyRefuse: pass the paper's folder as the English source."
                if any(m.endswith("_en.json") for m in missing) and eng is None else "")
        raise RefusalError(
            f"The folder '{folder}' lacks {len(missing)} prompt file(s) for the languages and splits asked for: "
            f"{', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}.{hint}",
            "Add the files, or ask for fewer languages, kinds or splits.",
        )
    return out


def load_language_files(files: Mapping[str, str | Path], kind: str, split: str = "all") -> MultilingualSet:
    """One file per language (``{"fr": "prompts_fr.json", ...}``), all of one ``kind``; parsed as
    :func:`load_records` does."""
    if kind not in KINDS:
        raise RefusalError(f"Unknown prompt kind '{kind}'.", f"Use {' or '.join(KINDS)}.")
    if not files:
        raise RefusalError("No per-language prompt files were given.", 'Pass {"fr": "path.json", ...}.')
    out = MultilingualSet()
    for lang, path in files.items():
        out.add(lang, kind, split, load_records(path), str(path))
    return out


def load_back_translations(folder: str | Path, lang: str, kind: str = "harmful", split: str = "test") -> list[str]:
    """PolyRefuse's back-translations into English (``<kind>_<split>_back_translated_<lang>.json``), in row order,
    for :func:`refusal.translate.check_translations` (``back=``)."""
    path = Path(folder).expanduser() / f"{kind}_{split}_back_translated_{lang}.json"
    if not path.is_file():
        raise RefusalError(f"There is no back-translation file {path.name} in '{folder}'.",
                           "Check the language, or run the checks without back-translations.")
    rows = json.loads(path.read_text("utf-8"))
    try:
        return [r["instruction_back_translated"] for r in rows]
    except (KeyError, TypeError):
        raise RefusalError(f"'{path}' has rows without 'instruction_back_translated'.",
                           "Use PolyRefuse's back-translation files as published.") from None


def translate_builtin(
    translator: Translator | str, languages: Sequence[str], cache: TranslationCache | str | Path | None = None, *,
    kinds: Sequence[str] = KINDS, source: str = "en",
) -> MultilingualSet:
    """The built-in harmful and harmless sets in each language, translated through ``cache`` (a
    :class:`refusal.translate.TranslationCache`, a path to its file, or ``None`` for memory only).

    ``translator`` is a backend, or a backend's name to use cached translations only (offline). English (the source)
    is the original text. Each set's ``origin`` names the backend and the digest of its cached translations."""
    from ..translate import TranslationCache

    if cache is None or isinstance(cache, (str, Path)):
        cache = TranslationCache(cache)
    backend = translator if isinstance(translator, str) else translator.name
    out = MultilingualSet()
    for kind in kinds:
        rows = builtin(kind)
        texts = [r["instruction"] for r in rows]
        for lang in languages:
            if lang == source:
                out.add(lang, kind, "all", [{**r, "source_instruction": r["instruction"]} for r in rows],
                        f"builtin:{kind}")
                continue
            got = cache.translate(translator, texts, lang, source)
            recs = [{"instruction": t, "category": r["category"], "source_instruction": r["instruction"]}
                    for t, r in zip(got, rows)]
            out.add(lang, kind, "all", recs,
                    f"builtin:{kind} translated by {backend} (translations sha256 "
                    f"{cache.digest(target=lang, backend=backend, texts=texts)[:16]})")
    return out
