"""The shape of the package: modules and lines, the longest functions, the largest files, import cycles.

``python -m benchmarks.house [--out FILE] [--src DIR] [--top N]`` prints (and with ``--out`` writes) one JSON
object: the number of modules and lines under ``src/refusal``, the ``N`` longest functions (qualified name, lines,
measured with :mod:`ast` from the ``def`` line to the last line of the body, decorators excluded), the ``N`` largest
files, and the import cycles between ``refusal`` modules.

The import graph counts what ``tests/test_architecture_layers.py`` counts: every ``import`` / ``from ... import`` of
a ``refusal`` module, at module level or inside a function, and not those under ``if TYPE_CHECKING:``. A cycle is a
strongly connected component of more than one module. What the closing note of a restructuring quotes: modules and
lines before and after, the longest functions, zero cycles.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(src: Path, package: str = "refusal") -> dict[str, Path]:
    """``{dotted name: path}`` of every module of ``package`` under ``src``."""
    return {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _targets(node: ast.AST, package: str, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base_name = ".".join(base + ([node.module] if node.module else []))
    else:
        base_name = node.module or ""
    # ``from pkg import sub`` imports the submodule; ``from mod import name`` imports mod
    subs = [f"{base_name}.{a.name}" for a in node.names if f"{base_name}.{a.name}" in mods]
    return subs if subs else [base_name]


def import_graph(mods: dict[str, Path], root: str = "refusal") -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}``, lazy imports included, ``TYPE_CHECKING`` imports not."""
    out: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text("utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip = _type_checking_lines(tree)
        found: dict[str, int] = {}
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            for t in _targets(node, package, mods):
                if t.startswith(root) and t != name and t in mods:
                    found.setdefault(t, node.lineno)  # type: ignore[attr-defined]
        out[name] = found
    return out


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = []
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        work.append((root, sorted(graph.get(root, {}))))
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop(0)
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, sorted(graph.get(w, {}))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def functions(tree: ast.AST, module: str) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function and method of ``tree``, nested ones included."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                out.append((name, (child.end_lineno or child.lineno) - child.lineno + 1))
                visit(child, f"{name}.<locals>")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}.{child.name}")
            else:
                visit(child, prefix)

    visit(tree, module)
    return out


def house(src: Path = SRC, top: int = 15) -> dict[str, Any]:
    """The package's shape as plain data (see the module docstring)."""
    mods = modules(src)
    lines = {m: len(p.read_text("utf-8").splitlines()) for m, p in mods.items()}
    funcs: list[tuple[str, int]] = []
    for m, p in mods.items():
        funcs += functions(ast.parse(p.read_text("utf-8")), m)
    funcs.sort(key=lambda f: (-f[1], f[0]))
    graph = import_graph(mods)
    found = cycles(graph)
    return {
        "modules": len(mods),
        "lines": sum(lines.values()),
        "functions": len(funcs),
        "functions_over_60_lines": sum(1 for _, n in funcs if n > 60),
        "longest_functions": [{"name": n, "lines": k} for n, k in funcs[:top]],
        "largest_files": [{"module": m, "path": str(mods[m].relative_to(src.parent)), "lines": k}
                          for m, k in sorted(lines.items(), key=lambda x: (-x[1], x[0]))[:top]],
        "import_edges": sum(len(v) for v in graph.values()),
        "cycles": found,
    }


def at_commit(commit: str, top: int = 15) -> dict[str, Any]:
    """:func:`house` of the package as it was at ``commit`` (``git archive`` of ``src`` into a temporary folder)."""
    import subprocess
    import tarfile
    import tempfile

    root = SRC.parent
    info = subprocess.run(["git", "log", "-1", "--format=%h%x00%cI%x00%s", commit], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip().split("\0")
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=root, capture_output=True,
                                 check=True).stdout
        tar = Path(tmp) / "src.tar"
        tar.write_bytes(archive)
        with tarfile.open(tar) as t:
            t.extractall(tmp, filter="data")
        return {"commit": info[0], "date": info[1], "subject": info[2][:120], **house(Path(tmp) / "src", top)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--src", default=str(SRC), help="the folder holding the refusal package (default: src)")
    ap.add_argument("--top", type=int, default=15, help="how many functions and files to list")
    ap.add_argument("--commits", nargs="+", help="measure these commits instead (each `git archive`d to a temporary "
                    "folder); the JSON then holds one entry per commit, with its date and subject")
    args = ap.parse_args(argv)
    if args.commits:
        result: dict[str, Any] = {"command": "python -m benchmarks.house " + " ".join(argv or []),
                                  "commits": {c: at_commit(c, args.top) for c in args.commits}}
    else:
        result = house(Path(args.src), args.top)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", "utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
