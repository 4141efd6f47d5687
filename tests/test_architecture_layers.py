"""The package's import graph: no cycle between modules, and no import from a lower layer to a higher one.

Every ``import`` / ``from ... import`` of a ``refusal`` module counts, at module level or inside a function (a lazy
import is still an arrow: it only moves the failure from import time to call time). Imports under
``if TYPE_CHECKING:`` do not run and are not counted. The exceptions below are each allowed for a stated reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import house

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module may import its own layer and the layers below it. The data flow of design.md is config ->
# data -> models -> directions -> scoring -> interventions -> ...; in imports, interventions sit below scoring, since
# scoring measures candidates by intervening (scoring.engine ablates, scoring.plans applies plans), and interventions
# need no score.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # no model, no config: errors, atomic files, the names config checks, HTTP endpoint helpers, small linear
    # algebra, batching; the package root resolves its exports by name on first use (importlib), importing nothing
    ("foundation", ("refusal", "refusal.errors", "refusal.io", "refusal.names", "refusal.endpoints", "refusal.linalg",
                    "refusal.batching")),
    ("config", ("refusal.config",)),
    ("data", ("refusal.data", "refusal.templates")),
    ("models", ("refusal.models", "refusal.layout")),
    ("directions", ("refusal.directions",)),
    ("interventions", ("refusal.interventions",)),
    ("scoring", ("refusal.scoring",)),
    ("generation", ("refusal.generation",)),
    ("translate", ("refusal.translate",)),  # a local translation model decodes with generation
    ("evaluation", ("refusal.evaluation",)),
    ("export", ("refusal.export",)),
    ("runs", ("refusal.runs",)),
    ("crosslingual", ("refusal.crosslingual",)),
    ("report", ("refusal.report",)),  # reads finished runs (and draws with crosslingual's plots): above both
    ("cli", ("refusal.cli", "refusal.__main__")),
]

# (importer, imported): why this arrow against the layers is allowed
ALLOWED_BACK_ARROWS: dict[tuple[str, str], str] = {
    ("refusal.directions.base", "refusal.interventions.hooks"):
        "Direction.ablate / Direction.add, the value type's apply methods (style.md, habit 2; public API used in the "
        "package docstring); imported when called, and interventions import nothing of directions at run time, so "
        "there is no cycle",
    ("refusal.data.multilingual", "refusal.translate"):
        "translating missing languages of a multilingual data folder on request (TranslationCache); the "
        "cross-lingual redesign (issue 26, item 2) moves translation out of data loading",
}

ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path]:
    return house.modules(SRC)


def _imports(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` for every refusal module, lazy imports included
    (:func:`benchmarks.house.import_graph`, which the code-shape figures use too)."""
    return house.import_graph(modules)


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS")
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return _imports(_modules())


def test_every_module_has_a_layer(graph):
    for m in graph:
        _layer(m)


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    bad = []
    for m, targets in graph.items():
        for t, line in targets.items():
            if _layer(t) > _layer(m) and (m, t) not in ALLOWED_BACK_ARROWS:
                bad.append(f"{m}:{line} imports {t} ({LAYERS[_layer(m)][0]} -> {LAYERS[_layer(t)][0]})")
    assert not bad, "back arrows:\n" + "\n".join(sorted(bad))
    stale = [k for k in ALLOWED_BACK_ARROWS if k[1] not in graph.get(k[0], {})]
    assert not stale, f"allowed back arrows that no longer exist (remove them): {stale}"


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module, each sorted (:func:`benchmarks.house.cycles`)."""
    return house.cycles(graph)


def test_no_import_cycle(graph):
    cycles = [c for c in _cycles(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_a_back_arrow_and_a_cycle(graph):
    """The test itself: a planted back arrow and a planted cycle are found."""
    planted = {k: dict(v) for k, v in graph.items()}
    planted["refusal.config"]["refusal.interventions.hooks"] = 1  # config -> interventions: a back arrow
    assert _layer("refusal.interventions.hooks") > _layer("refusal.config")
    planted["refusal.linalg"]["refusal.batching"] = 1
    planted["refusal.batching"]["refusal.linalg"] = 1
    assert ["refusal.batching", "refusal.linalg"] in _cycles(planted)


def test_lazy_imports_are_counted():
    """A function-level import is an arrow too."""
    g = _imports(_modules())
    assert "refusal.interventions.hooks" in g["refusal.directions.base"]  # imported inside Direction.ablate


def test_config_and_the_implementations_share_the_names():
    """config validates against refusal.names; the interventions and judges use the same names."""
    from refusal import names
    from refusal.evaluation.judges.base import _BUILTIN
    from refusal.interventions.scopes import SITES, TOKENS

    assert (SITES, TOKENS) == (names.SITES, names.TOKENS)
    assert set(_BUILTIN) == set(names.JUDGES)
