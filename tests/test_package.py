"""Packaging and style: what CI and a fresh install rely on."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

from conftest import REPO


def test_subpackages_import_under_llmx():
    for name in ("cli", "engine", "quant", "formats", "server"):
        module = importlib.import_module(f"llmx.{name}")
        assert module.__name__ == f"llmx.{name}"
        assert (REPO / name).resolve() in [p.resolve() for p in map(type(REPO), module.__path__)]


def test_every_package_folder_is_in_the_distribution():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {REPO / folder for folder in config["package-dir"].values()}
    assert set(config["packages"]) == set(config["package-dir"])
    folders = {p.parent for p in REPO.rglob("__init__.py") if "tests" not in p.parts and ".venv" not in str(p)}
    folders = {f for f in folders if not any(part.startswith(".") for part in f.relative_to(REPO).parts)}
    assert folders == mapped


def test_errors_form_one_tree():
    from llmx import errors

    subclasses = [errors.ModelNotFoundError, errors.GGUFError, errors.UnsupportedModelError,
                  errors.TokenizerError, errors.ChatTemplateError, errors.UsageError]
    assert all(issubclass(cls, errors.LlmxError) for cls in subclasses)


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(type(REPO)(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
