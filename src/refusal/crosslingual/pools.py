"""A cross-lingual run's input checks: which languages it covers (given, or found in the prompt files and the
PolyRefuse-style folder) and the pool each (language, kind)'s prompts are drawn from: a per-language file, the
folder, or English rows (the folder's, the paper-style folder's or the built-in set's) to translate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import RefusalError
from .inputs import DEFAULT_LANGUAGES, KINDS, LANGUAGE_CODE, SPLITS, Pool
from .manifests import Manifests


class PromptPools(Manifests):
    """The languages and prompt pools; run by the constructor, before any model is loaded."""

    def _languages(self, given: list[str] | None) -> list[str]:
        if given is None:
            found = set(self.files)
            if self.polyrefuse is not None:
                found |= self._polyrefuse_languages()
            if found:
                from .plots import resource_order

                given = resource_order(sorted(found))[0]
            else:
                given = list(DEFAULT_LANGUAGES)
        extra = sorted(set(self.files) - set(given))
        if extra:
            raise RefusalError(f"--files gives prompts for {', '.join(extra)}, which --languages leaves out.",
                               "Add those languages to --languages, or drop their files.")
        if len(given) < 2:
            raise RefusalError(f"A cross-lingual run needs at least two languages (got {', '.join(given)}).",
                               "Give two or more, e.g. --languages en,fr.")
        return given

    def _polyrefuse_languages(self) -> set[str]:
        root = Path(self.polyrefuse).expanduser()
        if not root.is_dir():
            raise RefusalError(f"The multilingual prompt folder '{self.polyrefuse}' does not exist.",
                               "Point --polyrefuse to a folder laid out like PolyRefuse (harmful_train_fr.json, ...).")
        found = set()
        for k in KINDS:
            for s in SPLITS:
                found |= {p.stem[len(f"{k}_{s}_"):].lower() for p in root.glob(f"{k}_{s}_*.json")}
        found = {lang for lang in found if LANGUAGE_CODE.fullmatch(lang)}
        if self.paper is not None:
            found.add("en")
        if not found:
            raise RefusalError(f"The folder '{self.polyrefuse}' has no <kind>_<split>_<lang>.json files.",
                               "Lay it out like PolyRefuse (harmful_train_fr.json, harmless_test_de.json, ...).")
        return found

    def _english_pool(self, kind: str) -> Pool:
        """What translations start from: the paper-style folder when one is given, else the built-in set."""
        from ..data.sources import builtin, load_source

        if self.paper is not None and self.polyrefuse is None:
            src = load_source(self.paper, kind)
            if src.is_split and set(src.splits) != set(SPLITS):
                missing = ", ".join(f"{kind}_{s}.json" for s in SPLITS if s not in src.splits)
                raise RefusalError(f"The English folder '{self.paper}' lacks {missing}.",
                                   "Add the file(s), or leave --paper out to start from the built-in sets.")
            return Pool(src.splits, f"{self.paper} ({kind})")
        return Pool({"all": builtin(kind)}, f"builtin:{kind}")

    def _pools(self) -> dict[tuple[str, str], Pool]:
        from ..data.multilingual import load_polyrefuse, load_records

        pools: dict[tuple[str, str], Pool] = {}
        for lang, kinds in self.files.items():
            for kind, path in kinds.items():
                pools[(lang, kind)] = Pool({"all": load_records(path)}, str(path))
        rest = [(lang, kind) for lang in self.languages for kind in KINDS if (lang, kind) not in pools]
        if self.polyrefuse is not None:
            # languages the folder has are read from it; the others are translated from its English rows
            have = self._polyrefuse_languages()
            by_kinds: dict[tuple[str, ...], list[str]] = {}
            for lang in self.languages:
                kinds = tuple(k for k in KINDS if (lang, k) in rest)
                if kinds:
                    by_kinds.setdefault(kinds, []).append(lang if lang in have else f"+{lang}")
            for kinds, langs in by_kinds.items():
                read = [lang for lang in langs if not lang.startswith("+")]
                new = [lang[1:] for lang in langs if lang.startswith("+")]
                ms = load_polyrefuse(self.polyrefuse, sorted(set(read) | ({"en"} if new else set())), kinds=kinds,
                                     english=self.paper)
                for lang in read + ["en"] * bool(new):
                    for kind in kinds:
                        where = ms.origin[f"{lang}/{kind}/test"]
                        pool = Pool({s: ms.get(lang, kind, s) for s in SPLITS},
                                     str(Path(where).parent / f"{kind}_*_{lang}.json"))
                        if lang in read:
                            pools[(lang, kind)] = pool
                        for other in new:  # translated item by item from the folder's English: aligned rows
                            pools[(other, kind)] = dataclasses.replace(pool, translate=True)
        else:
            for lang, kind in rest:
                english = self._english_pool(kind)
                pools[(lang, kind)] = dataclasses.replace(english, translate=lang.split("-")[0] != "en")
        return pools

    @property
    def _translating(self) -> bool:
        return any(p.translate for p in self.pools.values())
