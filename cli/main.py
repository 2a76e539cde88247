"""The `llmx` command. Commands parse, call `llmx.engine`, and print; no math here.

Imports of the engine and rich happen inside commands so `llmx --help` stays instant.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import llmx
from llmx.paths import cache_dir

app = typer.Typer(
    name="llmx",
    help="Local, quantized LLM inference on CPU and GPU.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
)

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Path to a .gguf model; the default model (gemma-3-270m) when left out.",
                   show_default=False),
]


def _version(value: bool) -> None:
    if value:
        print(f"llmx {llmx.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Local, quantized LLM inference on CPU and GPU."""


def model_path(model: str | None) -> Path:
    from llmx.cli.output import notice
    from llmx.engine import resolve_model_path

    return resolve_model_path(model, cache_dir(), notify=notice)


@app.command()
def info(
    model: ModelArg = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor.")] = False,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", min=1,
                                            help="Context per sequence for the KV estimate "
                                                 "[default: the model's]")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1,
                                          help="Sequences served at once.")] = 1,
    requests_per_month: Annotated[float | None, typer.Option(min=0)] = None,
    tokens_per_request: Annotated[float | None, typer.Option(min=0)] = None,
    gpu_seconds_per_token: Annotated[float | None, typer.Option(min=0)] = None,
    dollars_per_hour: Annotated[float | None, typer.Option(min=0)] = None,
    device: Annotated[str, typer.Option("-d", "--device", help="Also estimate memory on this device: cuda.")] = "cpu",
) -> None:
    """Show a model's architecture, tensors, tokenizer and memory needs."""
    from llmx.cli.output import print_info, print_json
    from llmx.engine import describe_model, tensor_table

    cost = _cost_inputs(requests_per_month, tokens_per_request, gpu_seconds_per_token, dollars_per_hour)
    path = model_path(model)
    if device not in ("cpu", "cuda"):
        from llmx.errors import UsageError

        raise UsageError(f"--device {device!r}: info estimates cpu or cuda")
    described = describe_model(path, ctx=ctx, parallel=parallel, cost=cost, device=device)
    if tensors:
        described["tensors"] = tensor_table(path)
    if json_out:
        print_json(described)
    else:
        print_info(described)


def _cost_inputs(*values: float | None):
    from llmx.engine import CostInputs
    from llmx.errors import UsageError

    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise UsageError(
            "the cost estimate needs all four of --requests-per-month, --tokens-per-request, "
            "--gpu-seconds-per-token and --dollars-per-hour"
        )
    return CostInputs(*values)


@app.command()
def tokenize(
    args: Annotated[list[str], typer.Argument(metavar="[MODEL] TEXT",
                                              help="Optional model path, then the text ('-' reads stdin).")],
    pieces: Annotated[bool, typer.Option("--pieces", help="Show each token's text beside its id.")] = False,
    special: Annotated[bool, typer.Option("--special", help="Parse special tokens such as <bos>.")] = False,
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Do not add the BOS token.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of ids.")] = False,
) -> None:
    """Turn text into token ids, like llama.cpp's llama-tokenize."""
    from llmx.cli.output import print_json, print_pieces
    from llmx.engine import load_tokenizer
    from llmx.errors import UsageError

    if len(args) > 2:
        raise UsageError("tokenize takes [MODEL] TEXT; quote the text if it has spaces")
    model, text = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    if text == "-":
        text = read_stdin_text()
    tokenizer = load_tokenizer(model_path(model))
    ids = tokenizer.tokenize(text, add_bos=not no_bos, special=special)
    if json_out:
        print_json(ids)
    elif pieces:
        print_pieces(ids, [tokenizer.piece(i) for i in ids])
    else:
        print(ids)


Temp = Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")]
Server = Annotated[str | None, typer.Option("--server", help="Use the llmx serve at URL or unix:PATH.")]
NoServer = Annotated[bool, typer.Option("--no-server", help="Load the model here even if a server runs.")]
Isa = Annotated[str | None, typer.Option(
    "--isa", help="Kernels for this instruction set: avx2, vnni or portable [default: the CPU's best].")]
Device = Annotated[str, typer.Option(
    "-d", "--device", help="cpu, cuda (an NVIDIA GPU, pip install 'llmx[cuda]'), or auto (CUDA when present).")]
Lookup = Annotated[int, typer.Option("--lookup", min=0, max=16, metavar="K",
                                     help="Prompt lookup: propose up to K tokens copied from the prompt/output.")]
Draft = Annotated[Path | None, typer.Option("--draft", help="A draft model (same vocabulary) to speculate with.")]
DraftMax = Annotated[int, typer.Option("--draft-max", min=1, max=16, help="Tokens the draft proposes per step.")]


@app.command()
def run(
    args: Annotated[list[str] | None, typer.Argument(
        metavar="[MODEL] [PROMPT]", show_default=False,
        help="A .gguf model (default: gemma-3-270m), then the prompt.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("-f", "--file", help="Read the prompt from a file.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", min=1, help="Tokens to generate at most.")] = 256,
    temperature: Temp = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 40,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", min=0.0)] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same text.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")] = None,
    threads: Annotated[int | None, typer.Option("-t", "--threads", min=1)] = None,
    ctx: Annotated[int, typer.Option("-c", "--ctx-size", min=1, help="Context size in tokens.")] = 4096,
    chat_mode: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the chat template.")] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message (implies --chat).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    logprobs: Annotated[int | None, typer.Option("--logprobs", min=0,
                                                 help="With --json: logprob of each token and the N best.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Timings on stderr.")] = False,
    json_schema: Annotated[str | None, typer.Option(
        "--json-schema", help="Output valid under this JSON schema (a file or inline JSON).")] = None,
    json_object: Annotated[bool, typer.Option("--json-object", help="Output one JSON object.")] = False,
    output_format: Annotated[str | None, typer.Option(
        "--format", help="'json' (as Ollama's), or a JSON schema inline.")] = None,
    grammar: Annotated[str | None, typer.Option("--grammar", help="A GBNF (or Lark) grammar for the output.")] = None,
    grammar_file: Annotated[Path | None, typer.Option("--grammar-file", help="Read the grammar from a file.")] = None,
    regex: Annotated[str | None, typer.Option("--regex", help="Output matching this regular expression.")] = None,
    lookup: Lookup = 0,
    draft: Draft = None,
    draft_max: DraftMax = 7,
    isa: Isa = None,
    device: Device = "cpu",
    server: Server = None,
    no_server: NoServer = False,
) -> None:
    """Generate text from a prompt, streamed to stdout (through a running `llmx serve` that serves
    the model, when one answers on the default socket)."""
    import time

    from llmx.cli.generate import gather_prompt, split_model_and_prompt

    wall_start = time.perf_counter()
    model_arg, prompt_arg = split_model_and_prompt(args or [])
    prompt = gather_prompt(prompt_arg, prompt_file)
    path = model_path(model_arg)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repeat_penalty=repeat_penalty, seed=seed)
    from llmx.cli.generate import response_format_from

    response_format = response_format_from(json_schema, json_object, output_format, grammar, grammar_file, regex)
    if response_format is not None:
        sampling["response_format"] = response_format
    speculative = _speculative_option(lookup, draft, draft_max)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    as_chat = chat_mode or system is not None
    if server is not None and (json_out or logprobs is not None):
        from llmx.errors import UsageError

        raise UsageError("--json and --logprobs run in this process; leave out --server")
    here = json_out or logprobs is not None or isa or speculative is not None or device != "cpu"
    if server is not None and speculative is not None:
        from llmx.errors import UsageError

        raise UsageError("--lookup and --draft run in this process; leave out --server")
    found = None if no_server or here else _server_for(server, path)
    if found is not None:
        from llmx.cli.generate import run_remote

        run_remote(*found, messages if as_chat else prompt, max_tokens, stop or [], sampling, verbose, wall_start)
        return
    if server is not None and not no_server:
        from llmx.errors import LlmxError

        raise LlmxError(f"the server at {server} does not answer or does not serve {path}")
    _run_here(path, prompt, messages if as_chat else None, max_tokens, stop or [], sampling, threads, ctx,
              json_out, logprobs, verbose, wall_start, isa, speculative, device)


def _speculative_option(lookup: int, draft: Path | None, draft_max: int) -> dict | None:
    """--lookup K or --draft MODEL --draft-max K, as the engine's `speculative` (the draft a path for now)."""
    if lookup and draft is not None:
        from llmx.errors import UsageError

        raise UsageError("--lookup and --draft are two ways to speculate: pick one")
    if draft is not None:
        return {"method": "draft", "model": model_path(str(draft)), "k": draft_max}
    return {"method": "ngram", "k": lookup} if lookup else None


def _server_for(explicit: str | None, path: Path):
    from llmx.cli.remote import find_server

    return find_server(explicit, cache_dir() / "llmx.sock", path, os.environ.get("LLMX_API_KEY"))


def _run_here(path: Path, prompt: str, messages, max_tokens: int, stop: list[str], sampling: dict, threads, ctx: int,
              json_out: bool, logprobs, verbose: bool, wall_start: float, isa: str | None = None,
              speculative: dict | None = None, device: str = "cpu") -> None:
    from llmx.cli.generate import report_json, report_verbose, stream, warm_up
    from llmx.engine.backends import resolve_device
    from llmx.engine.model import GenerationStats, Model
    from llmx.engine.precompile import start_helper
    from llmx.quant.cpu.simd import isa_named

    isa_named(isa)  # a set this CPU lacks: one line, before a compile helper starts
    device = resolve_device(device)  # no GPU: one line, before anything loads
    # on a cold cache: the CPU kernels compile in a helper while the model loads
    helper = start_helper(path, isa, threads) if device == "cpu" else None
    model = Model(path, threads=threads, ctx=ctx, isa=isa, device=device)
    compile_s = warm_up(model, helper)
    if speculative is not None and speculative["method"] == "draft":
        draft = Model(speculative["model"], threads=threads, ctx=ctx, isa=isa, compute=model.compute)
        compile_s += warm_up(draft)
        speculative = {**speculative, "model": draft}
    model.speculative = speculative
    stats = GenerationStats()
    if messages is not None:
        note_builtin_template(model)
        pieces = model.chat(messages, max_tokens, stop, stats, logprobs=logprobs, **sampling)
    else:
        pieces = model.generate(prompt, max_tokens, stop, stats, logprobs=logprobs, **sampling)
    if json_out:
        report_json("".join(pieces), model, stats, wall_start, compile_s)
        return
    try:
        stream(pieces)
    finally:
        if sys.stdout.isatty():  # end the line for the shell; pipes get the generated text only
            sys.stdout.write("\n")
            sys.stdout.flush()
    if verbose:
        report_verbose(model, stats, wall_start, compile_s)
        from llmx.cli.output import notice

        notice("ran in this process (no server serves this model; `llmx serve` makes runs instant)")


def note_builtin_template(model) -> None:
    """One stderr line when the file has no chat template: most such files are base models."""
    origin = model.chat_template.origin
    if origin != "file":
        from llmx.cli.output import notice

        notice(f"{model.path.name} has no chat template of its own, so it is likely a base model that continues "
               f"text rather than answering; using the {origin} template (chat with an instruction-tuned GGUF)")


@app.command()
def chat(
    model_arg: ModelArg = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", min=1)] = 512,
    temperature: Temp = 0.8,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    threads: Annotated[int | None, typer.Option("-t", "--threads", min=1)] = None,
    ctx: Annotated[int, typer.Option("-c", "--ctx-size", min=1)] = 4096,
    device: Device = "cpu",
    server: Server = None,
    no_server: NoServer = False,
) -> None:
    """Chat with a model: /clear forgets the conversation, /exit (or Ctrl-D) leaves."""
    from rich.console import Console

    from llmx.cli.generate import stream

    path = model_path(model_arg)
    found = None if no_server or device != "cpu" else _server_for(server, path)
    if found is None:
        from llmx.cli.generate import warm_up
        from llmx.engine.backends import resolve_device
        from llmx.engine.model import Model
        from llmx.engine.precompile import start_helper

        device = resolve_device(device)
        # on a cold cache: the CPU kernels compile in a helper while the model loads
        helper = start_helper(path, threads=threads) if device == "cpu" else None
        model = Model(path, threads=threads, ctx=ctx, device=device)
        warm_up(model, helper)
        note_builtin_template(model)

        def reply_to(history):
            return model.chat(history, max_tokens, temperature=temperature, seed=seed)
    else:
        remote, name = found

        def reply_to(history):
            body = {"model": name, "messages": history, "max_tokens": max_tokens, "temperature": temperature,
                    "seed": seed}
            return remote.stream("/v1/chat/completions", body, {})
    interactive = sys.stdin.isatty()
    console = Console(stderr=True, highlight=False)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            console.print("[bold cyan]>>> [/]", end="")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/clear":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = stream(reply_to(history))
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})


@app.command()
def perplexity(
    model_arg: ModelArg = None,
    text_file: Annotated[Path | None, typer.Option("-f", "--file", help="The text to score.")] = None,
    ctx: Annotated[int, typer.Option("-c", "--ctx-size", min=8, help="Tokens per chunk.")] = 512,
    max_chunks: Annotated[int | None, typer.Option("--chunks", min=1, help="Score at most this many chunks.")] = None,
    threads: Annotated[int | None, typer.Option("-t", "--threads", min=1)] = None,
    kld_base: Annotated[Path | None, typer.Option(
        "--kl-divergence-base", help="Save the log-probabilities here (or, with --kl-divergence, read them).")] = None,
    kld: Annotated[bool, typer.Option(
        "--kl-divergence", help="Compare this model with --kl-divergence-base's (its text and chunks).")] = False,
    device: Device = "cpu",
) -> None:
    """Perplexity of a text, as llama-perplexity computes it (BOS first, second half of each chunk)."""
    from llmx.cli.generate import read_text_file, warm_up
    from llmx.engine.model import Model
    from llmx.errors import UsageError

    if kld:
        if kld_base is None:
            raise UsageError("--kl-divergence needs --kl-divergence-base FILE (written by an earlier run)")
        return kl_divergence(model_arg, kld_base, max_chunks, threads, device)
    if text_file is None:
        raise UsageError("perplexity needs the text: -f FILE")
    text = read_text_file(text_file)
    model = Model(model_path(model_arg), threads=threads, ctx=ctx, device=device)
    warm_up(model)
    writer = None
    if kld_base is not None:
        from llmx.engine.kl_divergence import BaseWriter

        writer = BaseWriter(kld_base, ctx, model.config.n_vocab)
    ppl, error = model.compute.call(scored_text, model, text, ctx, max_chunks, writer)  # where warm_up ran
    print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {error:.5f}")


def scored_text(model, text: str, ctx: int, max_chunks: int | None, writer) -> tuple[float, float]:
    """Run llama-perplexity's loop, printing [i]ppl as it goes; with a base writer, keep its file
    only when every chunk is in."""
    from llmx.engine.perplexity import perplexity as compute

    def progress(result, running_ppl: float) -> None:
        sys.stdout.write(f"[{result.index + 1}]{running_ppl:.4f},")
        sys.stdout.flush()

    try:
        result = compute(model, text, ctx, max_chunks, on_chunk=progress,
                         save_logits=None if writer is None else writer.add)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.finish()
    return result


def kl_divergence(model_arg: str | None, base_path: Path, max_chunks: int | None, threads: int | None,
                  device: str = "cpu") -> None:
    import numpy as np

    from llmx.cli.generate import warm_up
    from llmx.engine.kl_divergence import Base, compare, report
    from llmx.engine.model import Model

    base = Base(base_path)
    model = Model(model_path(model_arg), threads=threads, ctx=base.ctx, device=device)
    warm_up(model)
    print(f"{'chunk':>5} {'PPL(Q)':>10} {'KLD':>10} {'same top':>9}")

    def progress(index: int, stats) -> None:
        print(f"{index + 1:5d} {np.exp(stats.nll_q.mean()):10.4f} {stats.kld.mean():10.6f} "
              f"{100 * stats.same_top.mean():8.3f}%", flush=True)

    print("\n" + report(model.compute.call(compare, model, base, max_chunks, progress)))


@app.command()
def quantize(
    src: Annotated[Path, typer.Argument(metavar="IN", help="The model to quantize (.gguf).", show_default=False)],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Where to write the result.", show_default=False)],
    type_name: Annotated[str, typer.Argument(
        metavar="TYPE", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S/M/L Q4_K_S/M Q5_K_S/M Q6_K.",
        show_default=False)],
    threads: Annotated[int | None, typer.Option("-t", "--threads", min=1)] = None,
    imatrix: Annotated[Path | None, typer.Option("--imatrix", help="Importance matrix from `llmx imatrix`.")] = None,
    allow_requantize: Annotated[bool, typer.Option(
        "--allow-requantize", help="Accept an already quantized input (quality drops).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (type and size per tensor); write nothing.")
                       ] = False,
) -> None:
    """Write a model in another quantization mix, with llama.cpp's per-tensor rules."""
    from llmx.cli.progress import quantize_progress
    from llmx.engine.model import check_threads, max_threads
    from llmx.formats.gguf_file import GGUFFile
    from llmx.quant import model_quantize as Q

    check_threads(threads)
    mix = Q.mix_named(type_name)
    Q.check_paths(src, out)
    gguf = GGUFFile.open(src)
    plans = Q.make_plan(gguf, mix, allow_requantize)
    if dry_run:
        print_plan(plans)
        return
    importance, extra = None, {}
    if imatrix is not None:
        importance, extra = Q.load_imatrix(imatrix)
    if allow_requantize and any(p.tensor.qtype not in Q.FLOATS and p.target != p.tensor.qtype for p in plans):
        from llmx.cli.output import notice

        notice("requantizing an already quantized model: quality drops compared with quantizing the original")
    with quantize_progress(plans) as on_tensor:
        Q.write_model(gguf, plans, out, mix, threads or max_threads(), importance, extra, on_tensor)


@app.command()
def imatrix(
    model_arg: ModelArg = None,
    text_file: Annotated[Path, typer.Option("-f", "--file", help="Calibration text.")] = ...,
    out: Annotated[Path, typer.Option("-o", "--output", help="Where to write the imatrix (GGUF).")] = Path(
        "imatrix.gguf"),
    ctx: Annotated[int, typer.Option("-c", "--ctx-size", min=8, help="Tokens per chunk.")] = 512,
    max_chunks: Annotated[int | None, typer.Option("--chunks", min=1, help="Use at most this many chunks.")] = None,
    threads: Annotated[int | None, typer.Option("-t", "--threads", min=1)] = None,
    process_output: Annotated[bool, typer.Option("--process-output", help="Collect output.weight too.")] = False,
) -> None:
    """Collect an importance matrix (mean squared activations per matmul input) for `quantize --imatrix`."""
    from llmx.cli.generate import read_text_file, warm_up
    from llmx.engine import imatrix as I
    from llmx.engine.model import Model
    from llmx.errors import UsageError

    text = read_text_file(text_file)
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory")
    model = Model(model_path(model_arg), threads=threads, ctx=ctx)
    warm_up(model)

    def progress(index: int) -> None:
        sys.stderr.write(f"[{index + 1}]")
        sys.stderr.flush()

    collector, n_chunks = model.compute.call(I.collect, model, text, ctx, max_chunks, process_output, progress)
    I.write(collector, out, model.gguf.architecture, text_file.name, ctx, n_chunks)
    sys.stderr.write(f"\nsaved {len(collector.sums)} entries from {n_chunks} chunks to {out}\n")


def print_plan(plans) -> None:
    mib = 2**20
    for i, p in enumerate(plans, 1):
        t = p.tensor
        print(f"[{i:4d}/{len(plans)}] {t.name:40s} {str(list(t.shape)):>16s} {t.qtype.name:>6s} -> {p.target.name:<6s}"
              f" {t.nbytes / mib:9.2f} MiB -> {p.nbytes / mib:9.2f} MiB")
    before, after = sum(p.tensor.nbytes for p in plans), sum(p.nbytes for p in plans)
    print(f"total: {before / mib:.2f} MiB -> {after / mib:.2f} MiB ({len(plans)} tensors)")


def int_list(text: str, flag: str) -> list[int]:
    """llama-bench's list syntax: "1,2,4" (repeating the flag also works)."""
    from llmx.errors import UsageError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{flag} takes non-negative integers, got {text!r}")
    return values


@app.command()
def bench(
    model_arg: ModelArg = None,
    n_prompt: Annotated[list[str] | None, typer.Option(
        "-p", "--n-prompt", help="Prompt lengths (pp tests) [default: 512].")] = None,
    n_gen: Annotated[list[str] | None, typer.Option(
        "-n", "--n-gen", help="Generated lengths (tg tests) [default: 128].")] = None,
    prompt_gen: Annotated[list[str] | None, typer.Option("-pg", help="Prompt then generation, e.g. 512,128.")] = None,
    threads: Annotated[list[str] | None, typer.Option("-t", "--threads", help="Thread counts, e.g. 1,2.")] = None,
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", min=1, help="Timed runs per test.")] = 5,
    batches: Annotated[list[str] | None, typer.Option(
        "-b", "--batch", help="Batched decode: sequences decoding together, e.g. 1,4,16.")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="md (table) or json.")] = "md",
    isa: Isa = None,
    device: Device = "cpu",
) -> None:
    """Speed, as llama-bench measures it: pp (prompt) and tg (generation) tokens per second."""
    import json

    from llmx.cli.generate import warm_up
    from llmx.engine import bench as B
    from llmx.engine.model import Model, check_threads, max_threads
    from llmx.errors import UsageError

    if output not in ("md", "json"):
        raise UsageError(f"-o takes md or json, got {output!r}")
    pairs = []
    for text in prompt_gen or []:
        values = int_list(text, "-pg")
        if len(values) != 2:
            raise UsageError(f"-pg takes two integers, prompt,gen; got {text!r}")
        pairs.append((values[0], values[1]))
    tests = B.plan(sum((int_list(t, "-p") for t in n_prompt or ["512"]), []),
                   sum((int_list(t, "-n") for t in n_gen or ["128"]), []),
                   pairs, sum((int_list(t, "-b") for t in batches or []), []))
    thread_counts = sum((int_list(t, "-t") for t in threads), []) if threads else [max_threads()]
    for n in thread_counts:
        check_threads(n)
    if not tests:
        raise UsageError("nothing to run: every test length is 0")
    model = Model(model_path(model_arg), threads=thread_counts[0], ctx=0, isa=isa, device=device)
    warm_up(model)
    desc = B.model_description(model)
    if output == "md":
        print(B.markdown_header(), flush=True)

    def show(result) -> None:
        if output == "md":
            print(B.markdown_row(desc, result), flush=True)

    results = model.compute.call(B.run_all, B.Bench(model), tests, thread_counts, repetitions, show)
    if output == "json":
        print(json.dumps([B.json_record(desc, r, llmx.__version__) for r in results], indent=2))


def read_stdin_text() -> str:
    from llmx.cli.generate import read_utf8

    return read_utf8(sys.stdin.buffer.read(), "standard input")


CacheType = Annotated[str, typer.Option(help="KV cache type: f16 or q8_0.")]


@app.command()
def serve(
    model_arg: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8080,
    socket_path: Annotated[Path | None, typer.Option(
        "--socket", help="Unix socket [default: $LLMX_CACHE_DIR/llmx.sock].")] = None,
    no_socket: Annotated[bool, typer.Option("--no-socket", help="Do not listen on a Unix socket.")] = False,
    models: Annotated[list[str] | None, typer.Option("--model", help="Serve NAME=PATH too (repeatable).")] = None,
    api_keys: Annotated[list[str] | None, typer.Option(
        "--api-key", help="Require this bearer key (repeatable; or $LLMX_API_KEY).")] = None,
    rate_limit: Annotated[int, typer.Option("--rate-limit", min=0, help="Requests per minute per key.")] = 0,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Waiting requests per model.")] = 64,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1, help="Requests computed at once.")] = 16,
    ctx: Annotated[int, typer.Option("-c", "--ctx-size", min=8, help="Context per request.")] = 4096,
    max_batched_tokens: Annotated[int, typer.Option("--max-batched-tokens", min=1)] = 512,
    kv_cache_tokens: Annotated[int, typer.Option("--kv-cache-tokens", min=16)] = 32768,
    cache_type_k: CacheType = "f16",
    cache_type_v: CacheType = "f16",
    threads: Annotated[int | None, typer.Option("-t", "--threads", min=1)] = None,
    response_cache: Annotated[int, typer.Option("--response-cache", min=0,
                                                help="Deterministic responses to keep.")] = 0,
    max_loaded: Annotated[int, typer.Option("--max-loaded", min=0, help="Models in memory at once (0: all).")] = 0,
    max_body: Annotated[int, typer.Option("--max-body-bytes", min=1024)] = 1 << 20,
    lookup: Lookup = 0,
    draft: Draft = None,
    draft_max: DraftMax = 7,
    isa: Isa = None,
    device: Device = "cpu",
) -> None:
    """Serve models over an OpenAI-compatible HTTP API on loopback and a Unix socket."""
    from llmx.cli.output import notice
    from llmx.cli.serve import describe, parse_models
    from llmx.engine.model import check_threads
    from llmx.errors import UsageError
    from llmx.server.app import ServeConfig, create_app
    from llmx.server.registry import EngineSettings, ModelRegistry
    from llmx.server.run import is_loopback, run_server, tcp_socket, unix_socket

    for name, kind in (("--cache-type-k", cache_type_k), ("--cache-type-v", cache_type_v)):
        if kind not in ("f16", "q8_0"):
            raise UsageError(f"{name} {kind!r}: use f16 or q8_0")
    check_threads(threads)
    paths = parse_models(model_path(model_arg), models or [])
    keys = tuple(api_keys or ([os.environ["LLMX_API_KEY"]] if os.environ.get("LLMX_API_KEY") else []))
    if not is_loopback(host) and not keys:
        notice(f"warning: listening on {host} without an API key: anyone who reaches it can use it (--api-key)")
    from llmx.quant.cpu.simd import isa_named

    isa_named(isa)  # a set this CPU lacks: one line now, not at the first request
    from llmx.engine.backends import resolve_device

    device = resolve_device(device)  # no GPU: one line now, not at the first request
    if lookup and draft is not None:
        raise UsageError("--lookup and --draft are two ways to speculate: pick one")
    settings = EngineSettings(threads, ctx, parallel, max_batched_tokens, kv_cache_tokens, cache_type_k, cache_type_v,
                              isa, lookup, model_path(str(draft)) if draft is not None else None, draft_max, device)
    registry = ModelRegistry(paths, next(iter(paths)), settings, max_loaded)
    config = ServeConfig(keys, rate_limit, max_queue, response_cache, max_body)
    unix_path = None if no_socket else (socket_path or cache_dir() / "llmx.sock")
    sockets = [tcp_socket(host, port)]
    if unix_path is not None:
        sockets.append(unix_socket(unix_path))
    notice(describe(paths, host, sockets[0].getsockname()[1], unix_path))
    run_server(create_app(registry, config), sockets, unix_path, preload=lambda: registry.engine(registry.default))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one red line and exit 1 (2 for usage) on errors; --debug for tracebacks."""
    from llmx.cli.output import print_error
    from llmx.errors import LlmxError, UsageError

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: typer reports its own usage errors (exit 2), --help and --version.
        app(args=args, prog_name="llmx")
        return 0
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C into exit 130
            print_error("interrupted")
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except BrokenPipeError:
        return 0  # the reader went away (`llmx ... | head`); nothing more to say
    except LlmxError as e:
        if debug:
            raise
        print_error(str(e))
        return 2 if isinstance(e, UsageError) else 1
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, never a traceback
        if debug:
            raise
        print_error(f"internal error: {type(e).__name__}: {e} (rerun with --debug and report it)")
        return 1

FAST_EXIT_COMMANDS = ("run", "chat")


def entry() -> None:
    """The `llmx` command. After `run` and `chat`, whose work is all done and written when main()
    returns, the process ends without tearing the interpreter down: unloading Numba's compiled
    kernels and the modules took ~0.2 s of a 1 s warm run."""
    code = main()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command not in FAST_EXIT_COMMANDS:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):  # a reader that went away
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
