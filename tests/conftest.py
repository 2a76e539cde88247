"""Shared fixtures: llama.cpp's reference data and the real model.

The reference folder is `../shared/reference` beside the clone; LLMX_REFERENCE_DIR overrides it.
Missing data is an error, never a skip: CI has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("LLMX_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
MODELS_DIR = REFERENCE_DIR / "models"
TINY_MODELS = sorted(MODELS_DIR.glob("*.gguf"))


def _require_reference() -> None:
    if not (REFERENCE_DIR / "reference.json").is_file() or not TINY_MODELS:
        raise RuntimeError(f"reference data not found in {REFERENCE_DIR}; set LLMX_REFERENCE_DIR")


@pytest.fixture(scope="session")
def reference() -> dict:
    _require_reference()
    return json.loads((REFERENCE_DIR / "reference.json").read_text())


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory) -> Path:
    """The default model, set up through llmx's own default-model path into a fresh cache."""
    from llmx.engine import resolve_model_path

    cache = tmp_path_factory.mktemp("llmx-cache")
    return resolve_model_path(None, cache)


def run_llmx(*args: str, stdin: bytes | None = None, env: dict | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `llmx` CLI in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "llmx.cli.main", *args],
        input=stdin, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
