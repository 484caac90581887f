"""The layout is the architecture: packages depend only downwards, and the engine, planner,
recovery and CLI name no factorization method (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import decompose
from decompose import methods

PKG = Path(decompose.__file__).resolve().parent

#: package (first name under decompose) -> layer; a module may import its own package and
#: lower layers only. Leaves (errors, progress) sit at 0.
LAYER = {"errors": 0, "progress": 0, "kernels": 1, "methods": 2, "report": 3, "config": 3,
         "engine": 3, "models": 3, "data": 4, "measure": 4, "io": 4, "planning": 5,
         "recover": 5, "api": 6, "sweep": 7, "compare": 7, "cli": 8, "__init__": 9}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every decompose module ``name`` imports (lazy imports inside functions included; imports
    for type checking only are not imports)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    known = _modules()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("decompose"):
                continue
            for a in node.names:  # "from .. import methods" imports a module
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("decompose")}
    return found


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    assert {_package(m) for m in _modules()} <= set(LAYER)


def test_imports_only_point_down():
    upward = []
    for name, path in _modules().items():
        for target in _imports(name, path):
            a, b = _package(name), _package(target)
            if a != b and LAYER[b] > LAYER[a]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_modules():
    graph = {n: {t for t in _imports(n, p) if t in _modules() and t != n}
             for n, p in _modules().items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> bool:
        state[n] = 1
        for t in graph[n]:
            if _package(t) == _package(n) and t.startswith(n + "."):
                continue  # a package importing its own submodules
            if state.get(t) == 1 and not n.startswith(t + "."):
                cycle.extend(stack + [n, t])
                return True
            if t not in state and visit(t, stack + [n]):
                return True
        state[n] = 2
        return False

    for n in graph:
        if n not in state and visit(n, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_only_method_packages_name_a_method():
    """Outside decompose/methods and decompose/kernels, no module imports a specific method."""
    generic = {"decompose.methods", "decompose.methods.base", "decompose.methods.module",
               "decompose.methods.registry", "decompose.methods.convs"}
    specific = {m for m in _modules() if m.startswith("decompose.methods.") and m not in generic}
    offenders = []
    for name, path in _modules().items():
        if _package(name) in ("methods", "kernels", "io"):
            continue  # io upgrades files written before the registry (format 1: ND layers)
        for t in _imports(name, path):
            if any(t == s or t.startswith(s + ".") for s in specific):
                offenders.append(f"{name} -> {t}")
    assert not offenders, "\n".join(sorted(offenders))


def test_public_api_is_small_and_shadows_no_submodule():
    assert len(decompose.__all__) <= 13
    for name in decompose.__all__:
        obj = getattr(decompose, name)
        assert not (PKG / name).is_dir() and not (PKG / f"{name}.py").exists() or \
            type(obj).__name__ == "module", f"decompose.{name} shadows a submodule"


def test_the_worked_example_in_docs_runs():
    """docs/architecture.md's method, registered from the doc's own code, plans and builds."""
    import re

    import torch
    from torch import nn

    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    try:
        exec(compile(code, "docs/architecture.md", "exec"), {})
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
        x = torch.randn(1, 8, 8, 8)
        want = model(x)
        rep = decompose.decompose_(model, method="rank1-channel", input_shape=(8, 8, 8))
        assert rep.decomposed[0].method == "rank1-channel"
        with torch.no_grad():
            got = model(x)
            dense = torch.nn.functional.conv2d(x, model[0].weight, model[0].bias, padding=1)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
        err = float((got - want).norm() / want.norm())
        assert 0 < err < 1.5
    finally:
        methods.registry._METHODS.pop("rank1-channel", None)
