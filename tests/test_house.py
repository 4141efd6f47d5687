"""benchmarks/house.py: the package's shape (modules, lines, longest functions, largest files, import cycles)."""

from __future__ import annotations

import ast
import json
import textwrap

from benchmarks import house


def test_cycles_are_strongly_connected_components():
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"f": 1}, "f": {"e": 1}, "g": {"g": 1}}
    assert house.cycles(g) == [["a", "b", "c"], ["e", "f"]]  # a self-import is no cycle
    assert house.cycles({"a": {"b": 1}, "b": {}}) == []


def test_function_lengths_and_qualified_names():
    src = textwrap.dedent('''
        def top(x):
            def inner():
                return 1
            return inner()


        class K:
            @staticmethod
            def m(self):
                a = 1
                b = 2
                return a + b

            async def am(self):
                pass
    ''')
    got = dict(house.functions(ast.parse(src), "pkg.mod"))
    assert got == {"pkg.mod.top": 4, "pkg.mod.top.<locals>.inner": 2, "pkg.mod.K.m": 4, "pkg.mod.K.am": 2}


def test_house_of_a_small_tree_and_the_json_it_writes(tmp_path, capsys):
    pkg = tmp_path / "refusal"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""root"""\n')
    (pkg / "a.py").write_text("from .sub import b\n\n\ndef f():\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .. import c\n\n\ndef g():\n"
        "    from ..a import f\n    return f\n")
    (pkg / "c.py").write_text("from .sub.b import g\n")
    out = tmp_path / "house.json"
    result = house.main(["--src", str(tmp_path), "--out", str(out), "--top", "2"])
    assert json.loads(out.read_text()) == result == json.loads(capsys.readouterr().out)
    assert result["modules"] == 5 and result["lines"] == 1 + 5 + 0 + 9 + 1
    assert result["cycles"] == [["refusal.a", "refusal.sub.b"]]  # the lazy import closes it; TYPE_CHECKING does not
    assert result["import_edges"] == 3
    assert [f["name"] for f in result["longest_functions"]] == ["refusal.sub.b.g", "refusal.a.f"]
    top = result["largest_files"][0]
    assert (top["module"], top["lines"]) == ("refusal.sub.b", 9) and top["path"].endswith("refusal/sub/b.py")
    assert len(result["largest_files"]) == 2


def test_the_package_has_no_import_cycle_and_config_is_a_package():
    result = house.house()
    assert result["cycles"] == []
    assert result["modules"] > 100
    assert not [f for f in result["largest_files"] if f["module"].startswith("refusal.config") and f["lines"] > 400]
