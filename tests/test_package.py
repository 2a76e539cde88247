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


def test_errors_form_one_tree():
    from llmx import errors

    subclasses = [errors.ModelNotFoundError, errors.GGUFError, errors.UnsupportedModelError,
                  errors.TokenizerError, errors.ChatTemplateError, errors.UsageError]
    assert all(issubclass(cls, errors.LlmxError) for cls in subclasses)


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(type(REPO)(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
