"""How the families' files depend on each other: a family's engine files import no other family's
files and no private names (what two families share lives in a shared module), and each ONNX
Runtime form is its own file beside its engine mapping."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ddpm_fast
from ddpm_fast.engine.families import MAPPINGS
from ddpm_fast.models import FAMILIES

PACKAGE = Path(ddpm_fast.__file__).parent
# The module name of each family's files: models/<name>.py, engine/families/<name>.py.
FAMILY_MODULES = {m.__name__.rsplit(".", 1)[1] for m in FAMILIES.values()}
ENGINE_FILES = sorted(
    p for p in (PACKAGE / "engine" / "families").glob("*.py") if p.stem != "__init__"
)
MODEL_FILES = sorted(PACKAGE / "models" / f"{name}.py" for name in FAMILY_MODULES)


def imports(path: Path) -> list[tuple[str, str]]:
    """(absolute module, name) for every ``from ... import name`` of the file (name "" for a
    plain ``import module``)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def family_of_file(path: Path) -> str:
    """The family module a family's file is of (``dd_pytorch_v1_onnx``: ``dd_pytorch_v1``)."""
    return path.stem.removesuffix("_onnx")


@pytest.mark.parametrize("path", ENGINE_FILES + MODEL_FILES, ids=lambda p: p.stem)
def test_a_family_file_imports_no_other_familys_file_and_no_private_name(path):
    own = family_of_file(path)
    for module, name in imports(path):
        parts = module.split(".")
        targets = {t.removesuffix("_onnx") for t in ([*parts, name] if name else parts)}
        others = FAMILY_MODULES & targets - {own}
        assert not others, f"{path.name} imports {module}.{name}: {others} is another family's"
        if name.startswith("_") and module.startswith("ddpm_fast"):
            pytest.fail(f"{path.name} imports the private name {name} of {module}")


@pytest.mark.parametrize("family", sorted(MAPPINGS))
def test_an_onnx_runtime_form_is_its_own_file_beside_the_mapping(family):
    fast = MAPPINGS[family]
    for name in ("onnx_form", "onnx_time_rows"):
        if hasattr(fast, name):
            where = getattr(fast, name).__module__
            assert where == f"{fast.__name__}_onnx", f"{family}: {name} is in {where}"
    if hasattr(fast, "onnx_time_rows"):
        assert hasattr(fast, "onnx_form"), f"{family}: onnx_time_rows without an onnx_form"
