"""What a cross-lingual run reads before any model work: language codes and per-language files from the command
line, each language's refusal phrases, the pools of prompts each (language, kind) draws its seeded train / val /
test rows from, and the content hashes that the run's stage digests are made of."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from .. import io
from ..errors import RefusalError

DEFAULT_LANGUAGES = ("en", "fr", "es", "de", "ru", "zh", "th", "sw", "am")
KINDS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{2,8})?")


# ---- parsing user input ----------------------------------------------------------------------------------------

@overload
def parse_languages(spec: None) -> None: ...


@overload
def parse_languages(spec: str | Sequence[str]) -> list[str]: ...


def parse_languages(spec: str | Sequence[str] | None) -> list[str] | None:
    """``"en,fr, de"`` or ``["en", "fr"]`` → ``["en", "fr", "de"]`` (lower case, duplicates dropped); ``None`` stays
    ``None`` (the sources or the default decide)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        code = str(item).strip().lower().replace("_", "-")
        if not code:
            continue
        if not LANGUAGE_CODE.fullmatch(code):
            raise RefusalError(f"'{item}' is not a language code.",
                               "Give ISO 639-1 codes separated by commas, e.g. --languages en,fr,de,sw.")
        if code not in out:
            out.append(code)
    if not out:
        raise RefusalError("No languages were given.", "Give at least two codes, e.g. --languages en,fr.")
    return out


def parse_files(spec: str | Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """Per-language prompt files: ``"fr=fr.json,de=de.csv,fr:harmless=fr_ok.json"`` (a plain ``lang=path`` is the
    harmful prompts) or a mapping ``{"fr": path}`` / ``{"fr": {"harmful": path, "harmless": path}}`` /
    ``{"fr:harmless": path}`` → ``{lang: {kind: path}}``."""
    if not spec:
        return {}
    pairs: list[tuple[str, Any]] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, path = part.partition("=")
            if not sep or not key.strip() or not path.strip():
                raise RefusalError(f"Cannot read '{part}' in --files.",
                                   "Write lang=path (harmful prompts) or lang:harmless=path, separated by commas, "
                                   "e.g. --files fr=fr.json,fr:harmless=fr_harmless.json.")
            pairs.append((key.strip(), path.strip()))
    else:
        for key, value in spec.items():
            if isinstance(value, Mapping):
                pairs += [(f"{key}:{kind}", path) for kind, path in value.items()]
            else:
                pairs.append((str(key), value))
    out: dict[str, dict[str, str]] = {}
    for key, path in pairs:
        lang, _, kind = key.partition(":")
        kind = kind.strip().lower() or "harmful"
        if kind not in KINDS:
            raise RefusalError(f"Unknown prompt kind '{kind}' in the files for '{lang}'.",
                               f"Use {' or '.join(KINDS)}, e.g. {lang}:harmless=path.")
        code = parse_languages([lang])[0]
        if kind in out.get(code, {}):
            raise RefusalError(f"Two {kind} files are given for '{code}'.", "Give one file per language and kind.")
        out.setdefault(code, {})[kind] = str(path)
    return out


def language_phrases(lang: str) -> dict:
    """The refusal phrases (for judging), refusal openings (for the refusal tokens) and their confidence for
    ``lang``: the shipped list for its base code, else English's with confidence ``low`` and a note."""
    from ..translate import PHRASE_LANGUAGES, refusal_phrases

    base = lang.split("-")[0]
    if base in PHRASE_LANGUAGES:
        d = refusal_phrases(base)
        return {"phrases": d["phrases"], "refusal_openings": d["refusal_openings"],
                "confidence": d.get("confidence", "unknown"), "list": base, "note": d.get("notes", "")}
    d = refusal_phrases("en")
    return {"phrases": d["phrases"], "refusal_openings": d["refusal_openings"], "confidence": "low", "list": "en",
            "note": f"No refusal phrase list ships for '{lang}': the English phrases and openings are used, which "
                    f"miss refusals written in {lang}."}


# ---- helpers -------------------------------------------------------------------------------------------------

def content_sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def file_sha(path: Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def direction_sha(path: Path) -> str | None:
    """sha256 of what an intervention uses of a direction file: its vectors, layer and position (not the scores in
    its metadata, whose last digits may change when selection is redone)."""
    from ..directions.base import Direction

    if not Path(path).is_file():
        return None
    d = Direction.load(path)
    h = hashlib.sha256(d.vectors.numpy().tobytes())
    h.update(json.dumps([list(d.vectors.shape), d.layer, d.pos]).encode())
    return h.hexdigest()


def own_completions_sha(folder: Path) -> str | None:
    """sha256 of the completions the transfer takes from a language's own run (its diagonal)."""
    p = Path(folder) / "completions.json"
    if not p.is_file():
        return None
    c = io.read_json(p)
    own = (("harmful", "ablation"), ("harmless", "actadd"))
    return content_sha([[r["instruction"], r["completion"]] for kind, cond in own
                        for r in c.get(kind, {}).get(cond, [])])


@dataclass
class Pool:
    """The rows one (language, kind) draws from: ``{"all": rows}`` or ``{split: rows}``; ``translate``: they are
    English rows to translate into the language."""

    rows: dict[str, list[dict]]
    origin: str
    translate: bool = False


def choose_splits(pool: Pool, sizes: Mapping[str, int], seed: int, what: str) -> dict[str, list[dict]]:
    """Seeded train/val/test from a pool, as :func:`refusal.data.make_splits` draws them (an unsplit pool is shuffled
    once and cut, a split one sampled per split). Pools of equal sizes get the same indices, so sets translated item
    by item stay aligned."""
    if "all" in pool.rows:
        rows = pool.rows["all"]
        total = sum(sizes.values())
        if total > len(rows):
            raise RefusalError(
                f"The {what} prompts ({pool.origin}) number {len(rows)}, fewer than the {total} the splits ask for "
                f"({', '.join(f'{s} {n}' for s, n in sizes.items())}).",
                "Lower data.n_train / n_val / n_test in the config, or give more prompts.")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        out, i = {}, 0
        for s, n in sizes.items():
            out[s] = [rows[j] for j in order[i:i + n]]
            i += n
        return out
    out = {}
    for s, n in sizes.items():
        rows = pool.rows[s]
        if n > len(rows):
            raise RefusalError(f"The {what} {s} prompts ({pool.origin}) number {len(rows)}, fewer than the {n} "
                               f"the config asks for.", f"Lower data.n_{s} in the config, or give more prompts.")
        out[s] = [rows[j] for j in random.Random(seed).sample(range(len(rows)), n)]
    return out


def original_text(rec: dict, lang: str) -> str | None:
    if rec.get("source_instruction") is not None:
        return " ".join(str(rec["source_instruction"]).split())
    return " ".join(rec["instruction"].split()) if lang == "en" else None
