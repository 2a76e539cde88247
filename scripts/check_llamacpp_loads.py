"""Files written by `llmx quantize` load and run in llama.cpp (llama-cpp-python, benchmark-only).

Quantizes a model to each mix with llmx into a temporary folder, loads every file with
llama.cpp, evaluates a fixed prompt, and compares llama.cpp's logits with llmx's on the same
file (max |diff| relative to the logits' std, and argmax agreement). Prints one line per mix
and exits 1 if llama.cpp refused a file.

Usage: python scripts/check_llamacpp_loads.py [SOURCE.gguf] [--mixes Q8_0,Q4_K_M,...]
(default source: ../shared/reference/models/tiny-llama-f16.gguf)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from llmx.engine.model import Model

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared/reference/models/tiny-llama-f16.gguf"
ALL_MIXES = "F16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K"
PROMPT = "The quick brown fox jumps over the lazy dog because"


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def check(source: Path, mix: str, folder: Path) -> bool:
    out = folder / f"{mix}.gguf"
    subprocess.run([sys.executable, "-m", "llmx.cli.main", "quantize", str(source), str(out), mix],
                   check=True, stderr=subprocess.DEVNULL)
    model = Model(out, ctx=256)
    ids = model.tokenize(PROMPT)
    ours = model.logits(ids)
    try:
        theirs = llama_cpp_logits(out, ids)
    except Exception as e:  # noqa: BLE001 - report any refusal and go on
        print(f"{mix:7s} llama.cpp refused the file: {e}")
        return False
    err = np.abs(ours - theirs).max() / theirs.std()
    agree = (ours.argmax(axis=1) == theirs.argmax(axis=1)).mean()
    print(f"{mix:7s} loads in llama.cpp; {len(ids)} positions: max |llmx - llama.cpp| = {err:.4f} std, "
          f"argmax agreement {100 * agree:.0f}%")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--mixes", default=ALL_MIXES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [check(args.source, mix, Path(folder)) for mix in args.mixes.split(",")]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
