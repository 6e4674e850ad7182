"""The code's structure, read from the source with ``ast`` (no import, no paddle): which package may import which,
and that every public function that raises says so in a ``Raises:`` section.

Public: a function or method (``__init__`` included) whose name, class names and module path have no leading
underscore, outside protoc's generated modules. It raises when its own body (not a nested function's) has
``raise X`` or ``raise X(...)``.

Package layers, each importing only those below it (issue 23)::

    distill_base                      the ground: protos, config, codec, err_no table, JSON form, endpoints, TLS ...
    discovery                         ZooKeeper: teachers register, students subscribe
    teachers, distill_reader          the teacher server; the student product

``teachers`` and ``distill_reader`` never import each other: they meet on the wire, through ``distill_base``.
"""
from __future__ import annotations

import ast
import os
import re
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


# Submodule names that distill_reader/dist.py (PaddleSlim's name, an alias module) registers in sys.modules.
ALIASES = {"distill_reader.dist.merge": "distill_reader.inprocess.program_merge",
           "distill_reader.dist.": "distill_reader.inprocess."}


def _module_file(module: str) -> str | None:
    """The file of first-party ``module`` in this checkout, or None."""
    for old, new in ALIASES.items():
        if module == old or (old.endswith(".") and module.startswith(old)):
            module = new + module[len(old):] if old.endswith(".") else new
            break
    path = os.path.join(ROOT, *module.split("."))
    for candidate in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _binds(path: str, name: str) -> bool:
    """True when the module at ``path`` binds ``name`` at its top level (a def, class, assignment or import), or
    may (a star import; a module ``__getattr__`` that serves the name as a string)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    bound: set[str] = set()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
    lazy = "__getattr__" in bound and re.search(rf"[\"']{name}[\"']", text) is not None
    return name in bound or "*" in bound or lazy


def test_every_first_party_import_names_a_module_of_this_checkout():
    """After a rename no import may name the old path: an editable install of another checkout would otherwise
    serve the old module silently. ``from X import y`` needs ``y`` to be a submodule or a name in X's source."""
    first_party = (*PACKAGES, "tests", "benchmarks")
    broken = []
    for folder in (*PACKAGES, "tests", "benchmarks", "examples", "scripts"):
        for module, path, tree in _modules(folder):
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    wanted = [(alias.name, None) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    name = next(iter(_imported(module, path, ast.Module([node], []))))[0]
                    wanted = [(name, alias.name) for alias in node.names]
                else:
                    continue
                for name, attribute in wanted:
                    if name.split(".")[0] not in first_party:
                        continue
                    source = _module_file(name)
                    if source is None:
                        broken.append(f"{module}:{node.lineno} {name}")
                    elif attribute not in (None, "*") and _module_file(f"{name}.{attribute}") is None:
                        if not _binds(source, attribute):
                            broken.append(f"{module}:{node.lineno} {name}.{attribute}")
    assert broken == []


def test_the_checker_sees_lazy_and_relative_imports():
    """The graph is only worth its verdict if it sees the imports that hide: a lazy one in a function body,
    a relative one."""
    tree = ast.parse("def f():\n    from discovery.student import X\nfrom ..client import Y\nfrom . import z\n")
    assert sorted(_imported("distill_reader.knowledge.reader", "distill_reader/knowledge/reader.py", tree)) == [
        ("discovery.student", 2), ("distill_reader.client", 3), ("distill_reader.knowledge", 4)]


def _own_raises(function: ast.AST) -> list[str]:
    """The exceptions ``function``'s own body raises by name (a bare ``raise`` re-raises: not counted)."""
    found, stack = [], list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            found.append(ast.unparse(node.exc.func if isinstance(node.exc, ast.Call) else node.exc))
        stack.extend(ast.iter_child_nodes(node))
    return found


def public_raisers() -> dict[str, bool]:
    """{"path:line qualified.name": has a ``Raises:`` section} for every public function that raises."""
    out: dict[str, bool] = {}

    def visit(body: list, prefix: str, path: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.", path)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not node.name.startswith("_") or node.name == "__init__") and _own_raises(node):
                out[f"{path}:{node.lineno} {prefix}{node.name}"] = "Raises:" in (ast.get_docstring(node) or "")

    for package in PACKAGES:
        for module, path, tree in _modules(package):
            generated = "_pb2" in module   # protoc's output (scripts/gen_proto.sh)
            private = any(part.startswith("_") and not part.startswith("__") for part in module.split("."))
            if not generated and not private:
                visit(tree.body, "", os.path.relpath(path, ROOT))
    return out


def test_every_public_function_that_raises_has_a_raises_section():
    raisers = public_raisers()
    missing = sorted(name for name, documented in raisers.items() if not documented)
    assert not missing, f"{len(missing)} public functions raise without a 'Raises:' section: {missing}"
    assert len(raisers) > 100   # the walk found the library (130 when this test was written)


def test_the_raises_check_sees_what_it_must():
    tree = ast.parse("def f(x):\n    def inner():\n        raise KeyError\n    if x:\n        raise ValueError(x)\n"
                     "    try:\n        pass\n    except OSError:\n        raise\n")
    assert _own_raises(tree.body[0]) == ["ValueError"]
