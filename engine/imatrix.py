"""`llmx imatrix`: the importance matrix llama-imatrix collects, in its GGUF layout.

For every matmul weight, the sum over the calibration text's tokens of the squared input
activations, per input column (`<weight>.in_sum2`, float32 [n_mat=1, n_cols]), and how many
tokens went in (`<weight>.counts`). Quantizers weight each column's error by
in_sum2 / counts, as llama.cpp's do (activation-aware, like AWQ). The text is cut into chunks as
llama-perplexity cuts it (BOS first); like llama-imatrix, `output.weight` is skipped unless asked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from llmx.engine.kv_cache import KVCache
from llmx.engine.model import Model
from llmx.engine.perplexity import chunks
from llmx.formats.atomic import atomic_output


class Collector:
    def __init__(self, process_output: bool = False):
        self.sums: dict[str, np.ndarray] = {}  # float64 [n_cols]
        self.counts: dict[str, int] = {}
        self.process_output = process_output

    def __call__(self, weight: str, x: np.ndarray) -> None:
        if weight == "output.weight" and not self.process_output:
            return
        squares = np.einsum("tk,tk->k", x, x, dtype=np.float64)  # [n_cols]
        if weight in self.sums:
            self.sums[weight] += squares
            self.counts[weight] += len(x)
        else:
            self.sums[weight], self.counts[weight] = squares, len(x)


def collect(model: Model, text: str, ctx: int, max_chunks: int | None, process_output: bool = False,
            on_chunk: Callable[[int], None] = lambda i: None) -> tuple[Collector, int]:
    collector = Collector(process_output)
    model.transformer.backend.observe_matmul = collector
    n_chunks = 0
    try:
        for index, ids in enumerate(chunks(model, text, ctx, max_chunks)):
            cache = KVCache(model.config, len(ids))
            model.transformer.forward(np.asarray(ids), cache.new_sequence(), cache, logits_for="all")
            n_chunks += 1
            on_chunk(index)
    finally:
        model.transformer.backend.observe_matmul = None
    return collector, n_chunks


def write(collector: Collector, out: Path, arch: str, dataset: str, ctx: int, n_chunks: int) -> None:
    """The imatrix GGUF, written to a temporary file and renamed."""
    with atomic_output(out) as partial:
        writer = GGUFWriter(partial, arch)
        try:
            _write_imatrix(writer, collector, dataset, ctx, n_chunks)
        finally:
            writer.close()


def _write_imatrix(writer: GGUFWriter, collector: Collector, dataset: str, ctx: int, n_chunks: int) -> None:
    writer.add_string("general.type", "imatrix")
    writer.add_key_value("imatrix.datasets", [dataset], GGUFValueType.ARRAY, GGUFValueType.STRING)
    writer.add_uint32("imatrix.chunk_count", n_chunks)
    writer.add_uint32("imatrix.chunk_size", ctx)
    for name in sorted(collector.sums):
        writer.add_tensor(f"{name}.in_sum2", collector.sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[collector.counts[name]]], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
