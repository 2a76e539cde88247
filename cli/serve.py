"""`llmx serve`: turn the flags into a `ServeConfig` and a `ModelRegistry`, then run the server."""

from __future__ import annotations

from pathlib import Path

from llmx.errors import UsageError


def parse_models(default_path: Path, named: list[str]) -> dict[str, Path]:
    """The positional model under its file stem, then each --model NAME=PATH."""
    paths = {default_path.stem: default_path}
    for item in named:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--model takes NAME=PATH, not {item!r}")
        if not Path(path).is_file():
            raise UsageError(f"--model {name}: no such file {path}")
        paths[name] = Path(path)
    return paths


def describe(paths: dict[str, Path], host: str | None, port: int, socket_path: Path | None) -> str:
    where = [f"http://{host}:{port}"] if host else []
    where += [f"unix:{socket_path}"] if socket_path else []
    return f"llmx serve: listening on {' and '.join(where)}; models: {', '.join(paths)}"
