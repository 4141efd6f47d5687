"""A cross-lingual run's input checks: which languages it covers (given, or found in the prompt files and the
PolyRefuse-style folder), the pool each (language, kind)'s prompts are drawn from (a per-language file, the folder,
or English rows, the folder's, the paper-style folder's or the built-in set's, to translate) and the seeded draw:
a :class:`PromptPlan`, made before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import RefusalError
from .inputs import DEFAULT_LANGUAGES, KINDS, LANGUAGE_CODE, SPLITS, Pool, choose_splits


@dataclass
class PromptPlan:
    """What every language's prompts come from: the languages, the pools per (language, kind) and each pool's seeded
    train / val / test draw (``chosen``), at the config's sizes and seed."""

    languages: list[str]
    sizes: dict[str, int]
    seed: int
    pools: dict[tuple[str, str], Pool]
    chosen: dict[tuple[str, str], dict[str, list[dict]]]

    @property
    def translating(self) -> bool:
        return any(p.translate for p in self.pools.values())


def plan_prompts(given: list[str] | None, files: Mapping[str, Mapping[str, str]], polyrefuse: str | None,
                 paper: str | None, sizes: dict[str, int], seed: int) -> PromptPlan:
    """The languages, their pools and the seeded draw; every check on the inputs (no model needed)."""
    languages = find_languages(given, files, polyrefuse, paper)
    pools = build_pools(languages, files, polyrefuse, paper)
    chosen = {key: choose_splits(pool, sizes, seed, f"{key[1]} {key[0]}") for key, pool in pools.items()}
    return PromptPlan(languages, dict(sizes), seed, pools, chosen)


def find_languages(given: list[str] | None, files: Mapping[str, Mapping[str, str]], polyrefuse: str | None,
                   paper: str | None) -> list[str]:
    """The languages given, else those of the files and the folder (by resource level), else the default nine."""
    if given is None:
        found = set(files)
        if polyrefuse is not None:
            found |= polyrefuse_languages(polyrefuse, paper)
        if found:
            from .plots import resource_order

            given = resource_order(sorted(found))[0]
        else:
            given = list(DEFAULT_LANGUAGES)
    extra = sorted(set(files) - set(given))
    if extra:
        raise RefusalError(f"--files gives prompts for {', '.join(extra)}, which --languages leaves out.",
                           "Add those languages to --languages, or drop their files.")
    if len(given) < 2:
        raise RefusalError(f"A cross-lingual run needs at least two languages (got {', '.join(given)}).",
                           "Give two or more, e.g. --languages en,fr.")
    return given


def polyrefuse_languages(polyrefuse: str, paper: str | None) -> set[str]:
    root = Path(polyrefuse).expanduser()
    if not root.is_dir():
        raise RefusalError(f"The multilingual prompt folder '{polyrefuse}' does not exist.",
                           "Point --polyrefuse to a folder laid out like PolyRefuse (harmful_train_fr.json, ...).")
    found = set()
    for k in KINDS:
        for s in SPLITS:
            found |= {p.stem[len(f"{k}_{s}_"):].lower() for p in root.glob(f"{k}_{s}_*.json")}
    found = {lang for lang in found if LANGUAGE_CODE.fullmatch(lang)}
    if paper is not None:
        found.add("en")
    if not found:
        raise RefusalError(f"The folder '{polyrefuse}' has no <kind>_<split>_<lang>.json files.",
                           "Lay it out like PolyRefuse (harmful_train_fr.json, harmless_test_de.json, ...).")
    return found


def english_pool(kind: str, paper: str | None) -> Pool:
    """What translations start from without a PolyRefuse folder: the paper-style folder when one is given, else the
    built-in set."""
    from ..data.sources import builtin, load_source

    if paper is not None:
        src = load_source(paper, kind)
        if src.is_split and set(src.splits) != set(SPLITS):
            missing = ", ".join(f"{kind}_{s}.json" for s in SPLITS if s not in src.splits)
            raise RefusalError(f"The English folder '{paper}' lacks {missing}.",
                               "Add the file(s), or leave --paper out to start from the built-in sets.")
        return Pool(src.splits, f"{paper} ({kind})")
    return Pool({"all": builtin(kind)}, f"builtin:{kind}")


def build_pools(languages: list[str], files: Mapping[str, Mapping[str, str]], polyrefuse: str | None,
                paper: str | None) -> dict[tuple[str, str], Pool]:
    from ..data.multilingual import load_records

    pools: dict[tuple[str, str], Pool] = {}
    for lang, kinds in files.items():
        for kind, path in kinds.items():
            pools[(lang, kind)] = Pool({"all": load_records(path)}, str(path))
    rest = [(lang, kind) for lang in languages for kind in KINDS if (lang, kind) not in pools]
    if polyrefuse is not None:
        pools.update(_polyrefuse_pools(languages, rest, polyrefuse, paper))
    else:
        for lang, kind in rest:
            pools[(lang, kind)] = dataclasses.replace(english_pool(kind, paper), translate=lang.split("-")[0] != "en")
    return pools


def _polyrefuse_pools(languages: list[str], rest: list[tuple[str, str]], polyrefuse: str,
                      paper: str | None) -> dict[tuple[str, str], Pool]:
    """The languages the folder has are read from it; the others are translated from its English rows."""
    from ..data.multilingual import load_polyrefuse

    have = polyrefuse_languages(polyrefuse, paper)
    by_kinds: dict[tuple[str, ...], list[str]] = {}
    for lang in languages:
        kinds = tuple(k for k in KINDS if (lang, k) in rest)
        if kinds:
            by_kinds.setdefault(kinds, []).append(lang)
    pools: dict[tuple[str, str], Pool] = {}
    for kinds, langs in by_kinds.items():
        read = [lang for lang in langs if lang in have]
        new = [lang for lang in langs if lang not in have]
        ms = load_polyrefuse(polyrefuse, sorted(set(read) | ({"en"} if new else set())), kinds=kinds, english=paper)
        for lang in read + ["en"] * bool(new):
            for kind in kinds:
                where = ms.origin[f"{lang}/{kind}/test"]
                pool = Pool({s: ms.get(lang, kind, s) for s in SPLITS},
                            str(Path(where).parent / f"{kind}_*_{lang}.json"))
                if lang in read:
                    pools[(lang, kind)] = pool
                for other in new:  # translated item by item from the folder's English: aligned rows
                    pools[(other, kind)] = dataclasses.replace(pool, translate=True)
    return pools
