"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def _modules_with_examples() -> list[str]:
    """Every fastrl module whose docstrings hold a ``>>>`` example (found in the source, not imported)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "fastrl"
    return sorted("fastrl." + ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                  for p in root.rglob("*.py") if ">>> " in p.read_text())


MODULES = _modules_with_examples()


# Modules whose examples must keep running: the discovery above would silently drop a module whose
# ``>>>`` lines were deleted, so the ones the op and loss suites rely on are named here (their per-file
# doctest tests were folded into test_module_doctests).
REQUIRED = {"fastrl.sampling", "fastrl.ops.selective_logprobs", "fastrl.ops.packing", "fastrl.ops.group_advantages",
            "fastrl.ops.sequence_logps", "fastrl.losses.grpo", "fastrl.losses.dpo", "fastrl.losses.preference"}


def test_doctested_modules_are_found():
    assert REQUIRED <= set(MODULES), sorted(REQUIRED - set(MODULES))


@pytest.mark.parametrize("module", MODULES)
def test_module_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


IMAGE_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "image_generation.md"
IMAGE_BLOCKS = re.findall(r"```python\n(.*?)```", IMAGE_DOC.read_text(), flags=re.S)


def test_image_doc_has_examples():
    assert len(IMAGE_BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(IMAGE_BLOCKS)))
def test_image_doc_example_runs(index, tmp_path, monkeypatch):
    """docs/image_generation.md's Python examples run as written (in a scratch directory: some write files)."""
    root = IMAGE_DOC.parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(root))  # examples/ modules the blocks import
    (tmp_path / "examples").symlink_to(root / "examples")
    exec(compile(IMAGE_BLOCKS[index], f"docs/image_generation.md[python block {index}]", "exec"), {})


MIGRATION_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migration.md"
MIGRATION_BLOCKS = re.findall(r"```python\n(.*?)```", MIGRATION_DOC.read_text(), flags=re.S)


def test_migration_doc_has_examples():
    assert len(MIGRATION_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(MIGRATION_BLOCKS)))
def test_migration_doc_example_runs(index, tmp_path, monkeypatch):
    """docs/migration.md's Python examples (TRL -> fastrl, Liger-Kernel -> fastrl) run as written."""
    monkeypatch.chdir(tmp_path)
    exec(compile(MIGRATION_BLOCKS[index], f"docs/migration.md[python block {index}]", "exec"), {})
