"""Packaging and style: what CI and a fresh install rely on."""

from __future__ import annotations

import importlib
import os
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
    tracked = subprocess.run(["git", "ls-files", "*__init__.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()  # not build/ or a venv: what the clone holds
    folders = {(REPO / p).parent for p in tracked if not p.startswith("tests/")}
    assert folders == mapped


def test_kernels_compile_into_the_cache_dir_not_the_package(tmp_path):
    """A cold kernel lands under $LLMX_CACHE_DIR/numba; nothing is written beside the sources."""
    def written_beside_sources():
        return {p for p in REPO.rglob("*.nb[ic]") if not any(part.startswith(".") for part in p.parts)}

    before = written_beside_sources()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"LLMX_CACHE_DIR": str(tmp_path)}
    code = "import numpy as np, llmx.quant.cpu.activations as a; a.quantize_q8_0(np.ones((2, 64), np.float32))"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert any(p.name.startswith("activations.quantize_q8_0") for p in (tmp_path / "numba").rglob("*.nbi"))
    assert written_beside_sources() == before


def test_errors_form_one_tree():
    from llmx import errors

    subclasses = [errors.ModelNotFoundError, errors.GGUFError, errors.UnsupportedModelError,
                  errors.TokenizerError, errors.ChatTemplateError, errors.UsageError]
    assert all(issubclass(cls, errors.LlmxError) for cls in subclasses)


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(type(REPO)(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
