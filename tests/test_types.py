"""The type check (issue 26, item 7) is strict where it must be: an untyped ``run`` parameter in ``refusal.runs`` or
``refusal.cli`` fails it.

The config test reads pyproject.toml's mypy overrides; the probe test runs mypy itself, with the project's config,
on tiny modules placed where those overrides apply (``refusal/runs/probe.py``, ``refusal/cli/probe.py`` in a
temporary folder), so it proves the setting works rather than only that it is written down."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
STRICT_FLAGS = ("disallow_untyped_defs", "disallow_incomplete_defs")
STRICT_PACKAGES = ("refusal.runs", "refusal.cli")


def _mypy_overrides() -> list[dict]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["mypy"]["overrides"]


def _modules(override: dict) -> list[str]:
    m = override["module"]
    return [m] if isinstance(m, str) else list(m)


def test_runs_and_cli_are_strict_and_not_ignored() -> None:
    overrides = _mypy_overrides()
    strict = {m for o in overrides if all(o.get(f) for f in STRICT_FLAGS) for m in _modules(o)}
    ignored = {m for o in overrides if o.get("ignore_errors") for m in _modules(o)}
    for pkg in STRICT_PACKAGES:
        assert f"{pkg}.*" in strict, f"{pkg}.* is not under {STRICT_FLAGS} in pyproject.toml"
        hidden = sorted(m for m in ignored if m == pkg or m.startswith(pkg + "."))
        assert not hidden, f"ignore_errors hides {hidden} from the strict check"


UNTYPED = "def generate(run, started: float) -> None:\n    pass\n"
TYPED = "def generate(run: object, started: float) -> None:\n    pass\n"


def _mypy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: dict[str, str]) -> tuple[str, int]:
    api = pytest.importorskip("mypy.api")
    for rel, text in {"refusal/__init__.py": "", **sources}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.parent / "__init__.py").touch()
        p.write_text(text)
    monkeypatch.chdir(tmp_path)  # the probe package is found from here, named refusal.<package>.probe
    stdout, stderr, status = api.run(["--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / ".cache"),
                                      "--no-error-summary", *sources])
    return stdout + stderr, status


@pytest.mark.parametrize("package", ["runs", "cli"])
def test_mypy_catches_an_untyped_run_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               package: str) -> None:
    out, status = _mypy(tmp_path, monkeypatch, {f"refusal/{package}/probe.py": UNTYPED})
    assert status == 1, out
    assert f"refusal/{package}/probe.py:1: error: Function is missing a type annotation for one or more " \
           "parameters" in out, out


def test_mypy_passes_the_same_module_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, status = _mypy(tmp_path, monkeypatch, {"refusal/runs/probe.py": TYPED, "refusal/cli/probe.py": TYPED})
    assert status == 0, out
