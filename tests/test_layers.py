"""The package's layers, read from the source (no import needed): core < integration < app < launch,
each importing only from the layers before it; the core never imports Lightning or Hydra; no module
over 450 lines; public names documented."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_sp

PACKAGE = Path(lightning_sp.__file__).parent
LAYERS = ("core", "integration", "app", "launch")
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the module, wherever it stands (functions and
    ``TYPE_CHECKING`` blocks included); ``from X import y`` counts as X.y, which may be a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return found


def _layer(module: str) -> int | None:
    """Index of the module's layer in LAYERS; None for modules outside them (the root facade)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "lightning_sp" and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer():
    outside = [name for name in MODULES if _layer(name) is None and name != "lightning_sp"]
    assert not outside, f"modules outside the layers {LAYERS}: {outside}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    layer = _layer(name)
    if layer is None:  # the root __init__: the facade, exempt
        return
    bad = []
    for line, target in _imports(name, MODULES[name]):
        top = target.split(".")[0]
        if LAYERS[layer] == "core" and top in FRAMEWORKS:
            bad.append(f"line {line}: the core imports {target}")
        if top == "lightning_sp":
            other = _layer(target)  # None: the facade (or an alias it makes), which imports every layer
            if other is None or other > layer:
                bad.append(f"line {line}: {LAYERS[layer]} imports {target} "
                           f"({'the facade' if other is None else LAYERS[other]})")
    assert not bad, f"{name} imports upward:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines, more than {MAX_LINES}; split it by concern"


def test_public_names_are_documented():
    missing = [name for name in lightning_sp.__all__ if not (getattr(lightning_sp, name).__doc__ or "").strip()]
    assert not missing, f"lightning_sp.__all__ names without a docstring: {missing}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) == 0))
def test_core_definitions_are_documented(name):
    tree = ast.parse(MODULES[name].read_text())
    missing = [node.name for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               and not node.name.startswith("_") and not ast.get_docstring(node)]
    assert not missing, f"{name}: public definitions without a docstring: {missing}"


def test_the_checks_see_violations(tmp_path):
    """The import reader resolves relative imports and finds imports inside functions."""
    module = tmp_path / "mod.py"
    module.write_text("from ...app import lm\n\ndef f():\n    import hydra\n    from . import layout\n")
    found = [target for _, target in _imports("lightning_sp.core.attention.mod", module)]
    assert found == ["lightning_sp.app.lm", "hydra", "lightning_sp.core.attention.layout"]
    assert _layer("lightning_sp.app.lm") == 2 > _layer("lightning_sp.core.attention.layout") == 0
