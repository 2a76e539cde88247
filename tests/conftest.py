"""Shared fixtures: llama.cpp's reference data and the real model.

The reference folder is `../shared/reference` beside the clone; LLMX_REFERENCE_DIR overrides it.
Without it (a clone outside this workplace) the tests that need it skip, all with one reason;
`.ci/run` counts any skip as a failure, so CI always runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# CUDA kernels run on numba's simulator here (every test runs everywhere); on a GPU,
# `NUMBA_ENABLE_CUDASIM=0 pytest -m cuda` runs the same tests on the device. Set before numba loads.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Tests give subprocesses their own LLMX_CACHE_DIR (a fresh model cache, a private socket); the
# compiled kernels stay shared, so that each subprocess does not compile them all again.
from llmx.paths import kernel_cache_dir  # noqa: E402

os.environ["NUMBA_CACHE_DIR"] = str(kernel_cache_dir())
REFERENCE_DIR = Path(os.environ.get("LLMX_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
MODELS_DIR = REFERENCE_DIR / "models"
TINY_MODELS = sorted(MODELS_DIR.glob("*.gguf"))


HAVE_REFERENCE = (REFERENCE_DIR / "reference.json").is_file() and bool(TINY_MODELS)
MISSING_REFERENCE = f"llama.cpp's reference data is not in {REFERENCE_DIR} (set LLMX_REFERENCE_DIR)"
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason=MISSING_REFERENCE)


def require_reference() -> None:
    """For fixtures that read the reference data: skip with the one reason when it is absent."""
    if not HAVE_REFERENCE:
        pytest.skip(MISSING_REFERENCE)


@pytest.fixture(scope="session")
def reference() -> dict:
    require_reference()
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


def with_chat_template(source: Path, template: str, dest: Path) -> Path:
    """A copy of the GGUF `source` whose metadata also holds `template` as its chat template. The
    key goes first; a Jinja comment pads it to a multiple of 32 bytes (the files' alignment), so
    every later offset moves by a whole number of alignment units."""
    data = source.read_bytes()
    key = b"tokenizer.chat_template"
    fixed = 8 + len(key) + 4 + 8  # key length, key, value type, value length
    value = template.encode() + b"{#"
    value += b" " * (-(fixed + len(value) + 2) % 32) + b"#}"
    entry = len(key).to_bytes(8, "little") + key + (8).to_bytes(4, "little") + len(value).to_bytes(8, "little") + value
    n_kv = int.from_bytes(data[16:24], "little")
    dest.write_bytes(data[:16] + (n_kv + 1).to_bytes(8, "little") + entry + data[24:])
    return dest


def kl_against_llama_cpp(gemma, cache_type: str = "f16") -> tuple[float, float]:
    """Mean KL(llama.cpp || llmx) over the reference's 2,044 positions, and top-1 agreement."""
    from llmx.engine.kl_divergence import reference_kl

    return reference_kl(gemma, REFERENCE_DIR / "gemma_kld_gpl3.npz", cache_type)
