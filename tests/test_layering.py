"""The package's layers, enforced: every module imports only from its own layer or the ones below.

Each `import` of a gptfast module in gptfast/ is an edge (module-level and function-level alike;
imports under `if TYPE_CHECKING:` are for annotations and never run, so they are left aside). An
edge to a higher layer fails, named `importer -> imported (file:line)`; a module missing from
`LAYERS` fails too, so a new module gets its place when it is added. The one exception is
`WHITELIST`. Importing a submodule runs its packages' `__init__` first; those implicit edges are
not counted (`gptfast/__init__.py` loads its heavy parts lazily for that reason).
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gptfast"

# Lowest first. A name covers the module and, for a package, every module under it that has no
# entry of its own (`ops` holds the op files, `ops._triton` sits lower than they do).
LAYERS: list[tuple[str, ...]] = [
    ("config", "tokenizer", "settings", "hub", "ops._triton", "_C", "_cpu"),
    ("weights",),
    ("ops",),
    ("kv_cache",),
    ("model", "quant"),
    ("sequence", "scheduler", "batch", "sampler", "graphs", "processors"),
    ("engine", "beam"),
    # HF argument resolution, HF-model conversion, the lock-step collector and generate(); the
    # package's own face (`import gptfast` re-exports generate) sits with them
    ("hf_args", "hf_convert", "collector", "generation", "__init__"),
    # what the `gptfast` subcommands share (dtype spellings, the device check, one-line errors)
    ("cli_common",),
    # the benchmarks: they use every layer below
    ("bench",),
    # the `gptfast` command on top: it dispatches to generate, the bench and the kernel inspector
    ("cli", "__main__"),
]

# (importing module, the function whose imports may point up): `GPT2.generate` is a convenience
# for `gptfast.generate(model, ...)`, imported when called.
WHITELIST = {("model", "GPT2.generate")}


@dataclass(frozen=True)
class Edge:
    importer: str  # module name inside the package, e.g. "model", "ops.gemv"
    imported: str
    where: str  # "gptfast/model.py:384"
    function: str | None  # the enclosing function's qualified name, None at module level
    names: tuple[str, ...] = ()  # what `from imported import ...` takes from it (modules excluded)


def module_name(path: Path, root: Path) -> str:
    """`root/ops/gemv.py` -> "ops.gemv"; a package's `__init__.py` -> the package's name
    ("__init__" for the root package itself)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(root: Path, package: list[str], node: ast.ImportFrom | ast.Import) -> list[tuple[str, str | None]]:
    """The package modules an import statement names (module names inside the package), each with
    the name taken from it (None when the module itself is what is imported)."""

    def existing(parts: list[str]) -> str:
        """The deepest module of `parts` that exists under root (a name imported from a module
        is an attribute of it, not a module; the compiled extension counts as a module)."""
        for n in range(len(parts), 0, -1):
            base = root.joinpath(*parts[:n])
            extension = [p for p in base.parent.glob(base.name + ".*") if p.suffix in (".so", ".pyd")]
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or extension:
                return ".".join(parts[:n])
        return "__init__"

    found = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE:
                found.append((existing(parts[1:]), None))
        return found
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != PACKAGE:
            return []
        base = parts[1:]
    else:
        base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    for alias in node.names:  # `from . import gemv` names a module; `from .gemv import f` does not
        full = base + [alias.name]
        target = existing(full)
        found.append((target, None if target == ".".join(full) else alias.name))
    return found


def imports(root: Path) -> tuple[list[str], list[Edge]]:
    """Every module under `root` (the package folder) and every edge between them."""
    modules, edges = [], []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        modules.append(name)
        rel = path.relative_to(root)
        # the package a relative import starts from: the module's folder
        package = list(rel.parent.parts)
        where = f"{root.name}/{rel.as_posix()}"

        def visit(node: ast.AST, scope: list[str]) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for other in child.orelse:
                        visit_one(other, scope)
                    continue
                visit_one(child, scope)

        def visit_one(node: ast.AST, scope: list[str]) -> None:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                taken: dict[str, list[str]] = {}
                for target, attribute in _resolve(root, package, node):
                    taken.setdefault(target, []).extend([attribute] if attribute else [])
                for target, names in taken.items():
                    if target != name:
                        edges.append(Edge(name, target, f"{where}:{node.lineno}",
                                          ".".join(scope) if scope else None, tuple(names)))
                return
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node, scope + [node.name])
                return
            visit(node, scope)

        visit(ast.parse(path.read_text(), filename=str(path)), [])
    return modules, edges


def layer_of(module: str) -> int | None:
    """The layer index of a module (its longest matching table entry), None when it has none."""
    best, best_len = None, -1
    for index, names in enumerate(LAYERS):
        for entry in names:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def problems(root: Path) -> list[str]:
    """What breaks the layering under `root`: unknown modules, then upward edges."""
    modules, edges = imports(root)
    found = [f"{PACKAGE}.{m}: not in the layer table; add it to the layer table (tests/test_layering.py LAYERS)"
             for m in modules if layer_of(m) is None]
    for e in edges:
        low, high = layer_of(e.importer), layer_of(e.imported)
        if low is None or high is None or high <= low:
            continue
        if (e.importer, e.function) in WHITELIST:
            continue
        inside = f" in {e.function}()" if e.function else ""
        found.append(f"upward edge {e.importer} -> {e.imported} ({e.where}{inside}): layer "
                     f"{' / '.join(LAYERS[low])} must not import layer {' / '.join(LAYERS[high])}")
    return found


def private_imports(root: Path) -> list[str]:
    """Names with a leading underscore imported from a module of another part of the package (a
    part: a top-level module, or a subpackage with everything under it). A private name is its
    module's business; what another part needs is public."""
    _, edges = imports(root)
    found = []
    for e in edges:
        if e.importer.split(".")[0] == e.imported.split(".")[0]:
            continue
        for taken in e.names:
            if taken.startswith("_") and not taken.startswith("__"):
                inside = f" in {e.function}()" if e.function else ""
                found.append(f"private import {e.importer} -> {e.imported}.{taken} ({e.where}{inside})")
    return found


def test_every_import_goes_down_the_layers():
    found = problems(REPO / PACKAGE)
    assert not found, f"{len(found)} layering problem(s):\n" + "\n".join(found)


def test_no_module_imports_another_parts_private_names():
    found = private_imports(REPO / PACKAGE)
    assert not found, f"{len(found)} private import(s):\n" + "\n".join(found)


# ------------------------------------------------------------------------ the checks themselves


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A copy of the package (the compiled extension included: `from . import _C` names it)."""
    root = tmp_path / PACKAGE
    shutil.copytree(REPO / PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + "\n" + text)


def test_an_upward_import_added_to_a_copy_fails(package_copy):
    before = set(problems(package_copy))
    # module level, and inside a method of a class: both are edges
    _append(package_copy / "config.py", "from .engine import Engine\n")
    _append(package_copy / "kv_cache.py", "class _Probe:\n    def f(self):\n        from . import model\n")
    new = set(problems(package_copy)) - before
    assert sorted(new) == sorted([
        f"upward edge config -> engine ({PACKAGE}/config.py:{_last_line(package_copy / 'config.py')}): layer "
        "config / tokenizer / settings / hub / ops._triton / _C / _cpu must not import layer engine / beam",
        f"upward edge kv_cache -> model ({PACKAGE}/kv_cache.py:{_last_line(package_copy / 'kv_cache.py')} in "
        "_Probe.f()): layer kv_cache must not import layer model / quant",
    ]), new


def _last_line(path: Path) -> int:
    return len(path.read_text().rstrip("\n").splitlines())


def test_type_checking_imports_downward_ones_and_the_whitelist_pass(package_copy):
    before = set(problems(package_copy))
    _append(package_copy / "config.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from .model import GPT2\n    import gptfast.engine\n")
    _append(package_copy / "engine.py", "def _probe():\n    from .ops import gemv\n    import gptfast.config\n")
    assert set(problems(package_copy)) == before
    _append(package_copy / "config.py", "if TYPE_CHECKING:\n    pass\nelse:\n    from gptfast import engine\n")
    new = set(problems(package_copy)) - before
    assert len(new) == 1 and next(iter(new)).startswith("upward edge config -> engine"), new


def test_whitelist_is_the_import_inside_gpt2_generate_only(package_copy):
    _, edges = imports(package_copy)
    allowed = [e for e in edges if (e.importer, e.function) in WHITELIST]
    assert allowed and all(layer_of(e.imported) > layer_of("model") for e in allowed), allowed
    before = set(problems(package_copy))
    _append(package_copy / "model.py", "def _not_generate():\n    from .generation import generate\n")
    new = set(problems(package_copy)) - before
    assert len(new) == 1 and "model -> generation" in next(iter(new)), new


def test_a_private_name_imported_across_parts_fails(package_copy):
    before = set(private_imports(package_copy))
    _append(package_copy / "engine.py", "from .kv_cache import _probe, AttnMetadata\n"
                                        "from .ops import _triton\n")  # a private module: not a name
    _append(package_copy / "ops" / "gemv.py", "from .common import _probe_too\n")  # inside ops: its business
    new = set(private_imports(package_copy)) - before
    line = _last_line(package_copy / "engine.py") - 1
    assert new == {f"private import engine -> kv_cache._probe ({PACKAGE}/engine.py:{line})"}, new


def test_a_module_outside_the_table_fails(package_copy):
    (package_copy / "newthing.py").write_text("X = 1\n")
    (package_copy / "ops" / "new_op.py").write_text("from .common import BenchCase\n")  # under `ops`: known
    found = problems(package_copy)
    assert f"{PACKAGE}.newthing: not in the layer table; add it to the layer table (tests/test_layering.py " \
           "LAYERS)" in found
    assert not any("new_op" in p for p in found)


def test_module_names_and_import_resolution(package_copy):
    root = package_copy
    assert module_name(root / "__init__.py", root) == "__init__"
    assert module_name(root / "ops" / "__init__.py", root) == "ops"
    assert module_name(root / "ops" / "gemv.py", root) == "ops.gemv"
    node = ast.parse("from . import gemv, dispatch").body[0]
    assert _resolve(root, ["ops"], node) == [("ops.gemv", None), ("ops", "dispatch")]  # a name in ops/__init__
    node = ast.parse("from ..kv_cache import KVCache").body[0]
    assert _resolve(root, ["ops"], node) == [("kv_cache", "KVCache")]
    node = ast.parse("import gptfast.ops.common, torch").body[0]
    assert _resolve(root, [], node) == [("ops.common", None)]
    node = ast.parse("from gptfast import generate, _C").body[0]
    assert _resolve(root, ["bench"], node) == [("__init__", "generate"), ("_C", None)]
    assert layer_of("ops._triton") == 0 and layer_of("ops.gemv") == layer_of("ops") == 2
    assert layer_of("bench.e2e") == len(LAYERS) - 2 and layer_of("cli") == len(LAYERS) - 1
    assert layer_of("nothing") is None
