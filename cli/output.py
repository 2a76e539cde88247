"""Printing for the CLI: rich on stderr for status and errors, plain text or JSON on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def print_error(message: str) -> None:
    """One red line on stderr: what went wrong and what to do."""
    one_line = " ".join(message.split())
    _stderr().print(f"[bold red]error:[/] {escape(one_line)}")


def notice(message: str) -> None:
    _stderr().print(f"[dim]{escape(message)}[/]")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def print_pieces(ids: list[int], pieces: list[str]) -> None:
    for token_id, piece in zip(ids, pieces, strict=True):
        print(f"{token_id:>7} -> {piece!r}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_info(info: dict[str, Any]) -> None:
    console = Console(soft_wrap=True)
    console.print(_model_table(info))
    console.print(_types_table(info))
    console.print(_memory_table(info))
    if "tensors" in info:
        console.print(_tensors_table(info["tensors"]))


def _model_table(info: dict[str, Any]) -> Table:
    table = Table(title=escape(f"{info['name'] or 'model'}  ({info['path']})"), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    supported = "" if info["supported"] else "  (not supported by llmx)"
    window = info["sliding_window"]
    rows = [
        ("architecture", f"{info['architecture']}{supported}"),
        ("parameters", f"{info['parameters']:,}"),
        ("file type", str(info["file_type"])),
        ("file size", human_bytes(info["file_size"])),
        ("tensors", f"{info['tensor_count']}"),
        ("context length", str(info["context_length"])),
        ("layers", str(info["layers"])),
        ("embedding length", str(info["embedding_length"])),
        ("heads / kv heads", f"{info['heads']} / {info['kv_heads']}"),
        ("head dim", str(info["head_dim"])),
        ("sliding window", f"{window} on {info['sliding_window_layers']} layers" if window else "none"),
        ("vocab", f"{info['vocab_size']:,} tokens, {info['tokenizer']}"),
        ("chat template", info["chat_template"]),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def _types_table(info: dict[str, Any]) -> Table:
    table = Table(title="tensors by type")
    table.add_column("type")
    table.add_column("count", justify="right")
    table.add_column("bytes", justify="right")
    for name, entry in info["tensor_types"].items():
        table.add_row(name, str(entry["count"]), human_bytes(entry["bytes"]))
    return table


def _memory_table(info: dict[str, Any]) -> Table:
    memory = info["memory"]
    table = Table(title="memory", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("weights", human_bytes(memory["weights_bytes"]))
    for kv_type, per_token in memory.get("kv_bytes_per_token", {}).items():
        table.add_row(f"KV cache per token, {kv_type}", f"{per_token:,} B")
    scope = f"ctx {memory['ctx']} x {memory['parallel']} sequence(s)"
    for kv_type, total in memory.get("kv_bytes", {}).items():
        table.add_row(f"KV cache, {kv_type}, {scope}", human_bytes(total))
    device = memory.get("cuda")
    if device is not None:
        table.add_row("on the GPU: weights", human_bytes(device["weights_bytes"]))
        for kv_type, total in device["total_bytes"].items():
            table.add_row(f"on the GPU in all, KV {kv_type}, {scope}", human_bytes(total))
    if "cost" in info:
        table.add_row("GPU hours a month", f"{info['cost']['gpu_hours_per_month']:,.1f}")
        table.add_row("cost a month", f"${info['cost']['dollars_per_month']:,.2f}")
    return table


def _tensors_table(tensors: list[dict[str, Any]]) -> Table:
    table = Table(title="tensors")
    for column in ("name", "type", "shape", "bytes"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for t in tensors:
        table.add_row(t["name"], t["type"], " x ".join(map(str, t["shape"])), f"{t['bytes']:,}")
    return table
