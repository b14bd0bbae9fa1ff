"""No import runs up the stack: every module of ``diffalign`` and ``rewards`` imports only from its own layer or lower
ones, per the layer map of ``docs/architecture.md`` (its ``## Layers`` table, the one place the map is declared).

Function-level (lazy) imports count: they are dependencies all the same.
"""

import ast
import re
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffalign", "rewards")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_map(text: str) -> dict[str, tuple[int, str]]:
    """``{module prefix: (layer number, layer name)}`` from the ``## Layers`` table of the architecture page."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, tuple[int, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        for prefix in re.findall(r"`([\w.]+)`", cells[2]):
            assert prefix not in layers, f"{prefix} is in two layers"
            layers[prefix] = (int(cells[0]), cells[1])
    return layers


def layer_of(module: str, layers: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The layer of the longest prefix of ``module`` (on dotted boundaries) in the map, or None."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in layers:
            return layers[prefix]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(path: Path) -> set[str]:
    """Modules of ``PACKAGES`` that ``path`` imports, at any depth of its code (relative imports resolved)."""
    own = module_name(path)
    package = own if is_package(path) else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # ``from pkg import submodule`` depends on the submodule itself.
            for alias in node.names:
                candidate = ROOT.joinpath(*f"{base}.{alias.name}".split("."))
                if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                    found.add(f"{base}.{alias.name}")
    return {name for name in found if name.split(".")[0] in PACKAGES}


def source_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


@pytest.fixture(scope="module")
def layers() -> dict[str, tuple[int, str]]:
    return layer_map(ARCHITECTURE.read_text())


def test_the_layer_map_is_declared_and_covers_every_module(layers):
    assert layer_of("rewards", layers) is not None and layer_of("diffalign", layers) is not None
    numbers = sorted({number for number, _ in layers.values()})
    assert numbers == list(range(len(numbers))), "layers are numbered 0, 1, 2, ... from the bottom"
    unmapped = [module_name(path) for path in source_files() if layer_of(module_name(path), layers) is None]
    assert not unmapped, f"modules missing from the layer map in {ARCHITECTURE.name}: {unmapped}"


def test_no_import_runs_up_the_stack(layers):
    upward = []
    for path in source_files():
        importer = module_name(path)
        own = layer_of(importer, layers)
        for imported in sorted(imported_modules(path)):
            target = layer_of(imported, layers)
            if target is not None and target[0] > own[0]:
                upward.append(f"{importer} ({own[1]}) imports {imported} ({target[1]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_rewards_never_imports_diffalign():
    offenders = [
        f"{module_name(path)} imports {name}"
        for path in (ROOT / "rewards").rglob("*.py")
        for name in imported_modules(path)
        if name.split(".")[0] == "diffalign"
    ]
    assert not offenders


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch, layers):
    """The parser itself: an import inside a function and a relative import are both found."""
    package = tmp_path / "diffalign" / "adapters"
    package.mkdir(parents=True)
    (tmp_path / "diffalign" / "trainers").mkdir()
    (tmp_path / "diffalign" / "trainers" / "grpo.py").write_text("")
    probe = package / "probe.py"
    probe.write_text("from . import base\n\ndef f():\n    from diffalign.trainers import grpo\n")
    (package / "base.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imported_modules(probe)
    assert {"diffalign.adapters", "diffalign.adapters.base", "diffalign.trainers.grpo"} <= found
    assert layer_of("diffalign.trainers.grpo", layers)[0] > layer_of("diffalign.adapters.probe", layers)[0]
