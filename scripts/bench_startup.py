"""Start-up costs: opening a GGUF (header + vocab), building its tokenizer, and `llmx --help`.

Usage: python scripts/bench_startup.py [MODEL] [--repeat N] [--gguf-py] [--json]
Targets (issue 2): open < 0.5 s on the default model; `llmx --help` and `--version` < 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def timed(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cli_seconds(args: list[str], repeat: int) -> float:
    return timed(lambda: subprocess.run([sys.executable, "-m", "llmx.cli.main", *args],
                                        capture_output=True, check=True), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gguf-py", action="store_true", help="also time gguf.GGUFReader (slow)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from llmx.engine import resolve_model_path
    from llmx.formats.gguf_file import GGUFFile
    from llmx.formats.tokenizer import Tokenizer
    from llmx.paths import cache_dir

    path = resolve_model_path(args.model, cache_dir())
    gguf = GGUFFile.open(path)
    results = {
        "model": str(path),
        "open_header_and_vocab_s": timed(lambda: GGUFFile.open(path), args.repeat),
        "build_tokenizer_s": timed(lambda: Tokenizer.from_gguf(gguf), args.repeat),
        "cli_help_s": cli_seconds(["--help"], args.repeat),
        "cli_version_s": cli_seconds(["--version"], args.repeat),
    }
    if args.gguf_py:
        import gguf as gguf_py

        results["gguf_py_reader_s"] = timed(lambda: gguf_py.GGUFReader(path), 1)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for key, value in results.items():
        print(f"{key:<26} {value:.3f}" if isinstance(value, float) else f"{key:<26} {value}")


if __name__ == "__main__":
    main()
