"""The code's structure, read from the source with ``ast`` (no import, no paddle): which package may import which,
and that every public function that raises says so in a ``Raises:`` section.

Package layers, each importing only those below it (issue 23)::

    distill_base                      the ground: protos, config, codec, err_no table, JSON form, endpoints, TLS ...
    discovery                         ZooKeeper: teachers register, students subscribe
    teachers, distill_reader          the teacher server; the student product

``teachers`` and ``distill_reader`` never import each other: they meet on the wire, through ``distill_base``.
"""
from __future__ import annotations

import ast
import os
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("distill_base", "discovery", "teachers", "distill_reader")
ALLOWED = {
    "distill_base": set(),
    "discovery": {"distill_base"},
    "teachers": {"distill_base", "discovery"},
    "distill_reader": {"distill_base", "discovery"},
}


def _modules(package: str) -> Iterator[tuple[str, str, ast.Module]]:
    """(dotted module name, path, tree) of every .py file of ``package``."""
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path, encoding="utf-8") as f:
                    yield module, path, ast.parse(f.read(), path)


def _imported(module: str, path: str, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in ``tree``, lazy ones (inside functions) included."""
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            else:
                yield node.module, node.lineno


def package_graph() -> dict[tuple[str, str], list[str]]:
    """{(importer package, imported package): ["module:line", ...]} over the four packages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for module, path, tree in _modules(package):
            for name, line in _imported(module, path, tree):
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    edges.setdefault((package, top), []).append(f"{module}:{line} -> {name}")
    return edges


def test_package_arrows_point_down_only():
    edges = package_graph()
    wrong = {pair: where for pair, where in edges.items() if pair[1] not in ALLOWED[pair[0]]}
    assert not wrong, f"imports against the layers {ALLOWED}: {wrong}"
    assert ("teachers", "distill_base") in edges and ("distill_reader", "distill_base") in edges


def test_no_two_packages_import_each_other():
    edges = package_graph()
    assert [pair for pair in edges if pair[::-1] in edges] == []


def test_the_checker_sees_lazy_and_relative_imports():
    """The graph is only worth its verdict if it sees the imports that hide: a lazy one in a function body,
    a relative one."""
    tree = ast.parse("def f():\n    from discovery.student import X\nfrom ..client import Y\nfrom . import z\n")
    assert sorted(_imported("distill_reader.knowledge.reader", "distill_reader/knowledge/reader.py", tree)) == [
        ("discovery.student", 2), ("distill_reader.client", 3), ("distill_reader.knowledge", 4)]
