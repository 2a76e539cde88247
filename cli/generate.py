"""`llmx run` and `llmx chat`: prompt plumbing, streaming to stdout, timings to stderr."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from llmx.errors import LlmxError, UsageError


def warm_up(model, helper=None) -> float:
    """Compile or load the kernels, saying so on stderr when it takes a while (the first run);
    `helper`: `precompile.start_helper`'s process, when the cache was cold."""
    import threading

    from rich.console import Console

    status = Console(stderr=True).status("compiling kernels (first run only)")
    timer = threading.Timer(0.75, status.start)
    timer.start()
    try:
        return model.warm_up(parallel=True, helper=helper)
    finally:
        timer.cancel()
        status.stop()


def looks_like_model(arg: str) -> bool:
    return arg.endswith(".gguf") or Path(arg).is_file()


def split_model_and_prompt(args: list[str]) -> tuple[str | None, str | None]:
    """`[MODEL] [PROMPT]`: one argument is the model if it names a .gguf file, else the prompt."""
    if len(args) > 2:
        raise UsageError("run takes [MODEL] [PROMPT]; quote a prompt that has spaces")
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1:
        return (args[0], None) if looks_like_model(args[0]) else (None, args[0])
    return None, None


def read_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmxError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); convert it first") from None


def read_text_file(path: Path, label: str | None = None) -> str:
    """A UTF-8 text file; a missing or unreadable one is a usage error naming `label` (the path)."""
    try:
        return read_utf8(path.read_bytes(), str(path))
    except OSError as e:
        raise UsageError(f"cannot read {label or path}: {e.strerror}") from None


def gather_prompt(argument: str | None, prompt_file: Path | None) -> str:
    """The argument, then the file or piped stdin after it (`cat notes | llmx run m "Sum up:"`)."""
    parts = [argument] if argument else []
    if prompt_file is not None:
        parts.append(_strip_final_newline(read_text_file(prompt_file, f"the prompt file {prompt_file}")))
    elif not sys.stdin.isatty():
        piped = _strip_final_newline(read_utf8(sys.stdin.buffer.read(), "standard input"))
        if piped:
            parts.append(piped)
    if not parts:
        raise UsageError("no prompt: give one as an argument, with -f FILE, or on standard input")
    return "\n".join(parts)


def _strip_final_newline(text: str) -> str:
    """`echo` and editors end text with a newline the user did not mean as part of the prompt."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def stream(pieces, out=None) -> str:
    """Write pieces to stdout as they come (flushing each); returns the whole text."""
    out = out or sys.stdout
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)


def timings(model, stats, wall_start: float, compile_s: float = 0.0) -> dict[str, Any]:
    # like llama.cpp's eval rate: the tokens after the first, over the time after the first
    after_first = max(0, stats.completion_tokens - 1)
    gen_tps = after_first / stats.generation_seconds if stats.generation_seconds and after_first else 0.0
    return {
        "load_s": model.load_seconds,
        "compile_s": compile_s,
        "prompt_s": stats.prompt_seconds,
        "prompt_tokens_per_s": stats.prompt_tokens / stats.prompt_seconds if stats.prompt_seconds else 0.0,
        "generation_s": stats.generation_seconds,
        "generation_tokens_per_s": gen_tps,
        "time_to_first_token_s": stats.first_token_seconds,
        "total_s": time.perf_counter() - wall_start,
    }


def report_json(text: str, model, stats, wall_start: float, compile_s: float) -> None:
    print(json.dumps({
        "text": text,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "finish_reason": stats.finish_reason,
        "timings": timings(model, stats, wall_start, compile_s),
        **({"logprobs": stats.logprobs} if stats.logprobs else {}),
    }, ensure_ascii=False))


def report_verbose(model, stats, wall_start: float, compile_s: float) -> None:
    from llmx.cli.output import notice

    t = timings(model, stats, wall_start, compile_s)
    notice(f"load {t['load_s']:.2f} s | compile {t['compile_s']:.2f} s | "
           f"prompt {stats.prompt_tokens} tokens, {t['prompt_tokens_per_s']:.1f} t/s | "
           f"generation {stats.completion_tokens} tokens, {t['generation_tokens_per_s']:.1f} t/s | "
           f"first token {t['time_to_first_token_s']:.2f} s | finish {stats.finish_reason}")
    if model.speculative is not None:
        s = model.engine.stats()
        notice(f"speculative ({model.speculative['method']}): {s['accepted_tokens']} of {s['draft_tokens']} "
               f"proposed tokens accepted ({100 * s['acceptance_rate']:.0f}%), "
               f"{s['tokens_per_step']:.2f} tokens per verify step")


def response_format_from(json_schema: str | None, json_object: bool, output_format: str | None, grammar: str | None,
                         grammar_file: Path | None, regex: str | None) -> dict[str, Any] | None:
    """The engine's `response_format` from `llmx run`'s flags (at most one of them)."""
    given = [name for name, value in (("--json-schema", json_schema), ("--json-object", json_object),
                                      ("--format", output_format), ("--grammar", grammar),
                                      ("--grammar-file", grammar_file), ("--regex", regex)) if value]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each constrain the output: give one")
    if json_object or output_format == "json":
        return {"type": "json_object"}
    if json_schema is not None or output_format is not None:
        return {"type": "json_schema", "schema": _schema_argument(json_schema or output_format)}
    if grammar_file is not None:
        grammar = read_text_file(grammar_file, "grammar file")
    if grammar is not None:
        return {"type": "gbnf", "grammar": grammar}
    return {"type": "regex", "regex": regex} if regex is not None else None


def _schema_argument(value: str) -> Any:
    """A JSON schema given inline or as a file's path."""
    text = value
    if not value.lstrip().startswith(("{", "[")) and Path(value).is_file():
        text = read_text_file(Path(value), "JSON schema file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"the JSON schema is neither a file nor valid JSON: {e}") from None


def run_remote(remote, name: str, prompt, max_tokens: int, stop: list[str], sampling: dict[str, Any], verbose: bool,
               wall_start: float) -> None:
    """`llmx run` through a server: a prompt (str) to /v1/completions, messages to /v1/chat/completions."""
    body = {"model": name, "max_tokens": max_tokens, "stop": stop, **sampling}
    if isinstance(prompt, str):
        endpoint, body["prompt"] = "/v1/completions", prompt
    else:
        endpoint, body["messages"] = "/v1/chat/completions", prompt
    usage: dict[str, Any] = {}
    try:
        stream(remote.stream(endpoint, body, usage))
    finally:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()
    if verbose:
        from llmx.cli.output import notice

        notice(f"through the server at {remote.address} (model {name}) | "
               f"prompt {usage.get('prompt_tokens', 0)} tokens | "
               f"generation {usage.get('completion_tokens', 0)} tokens | "
               f"finish {usage.get('finish_reason', '')} | "
               f"total {time.perf_counter() - wall_start:.2f} s")
