"""`llmx quantize`: a GGUF model to another type mix, one tensor at a time.

Metadata is copied (with the new `general.file_type` and `general.quantization_version`);
tensors keep their order. Each tensor is read from the input's mmap, turned into float32 once
(a view when the input is F32), quantized in row chunks on `threads` threads (the quantizers
release the GIL) and written; the output goes to a hidden temporary file in the target
directory that is renamed onto OUT only when complete.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, Keys

from llmx.errors import LlmxError, UsageError
from llmx.formats.atomic import atomic_output
from llmx.formats.gguf_file import GGUFFile, GGUFTensor
from llmx.quant.formats import FORMATS, dequantize, quantize
from llmx.quant.mixes import FLOATS, MIXES, Mix, TensorSpec, plan
from llmx.quant.qtypes import QType, row_nbytes

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
CHUNK_ELEMENTS = 1 << 20  # rows are quantized in chunks of about this many values


@dataclass(frozen=True)
class TensorPlan:
    tensor: GGUFTensor
    target: QType

    @property
    def nbytes(self) -> int:
        rows = self.tensor.n_elements // self.tensor.shape[0]
        return rows * row_nbytes(self.target, self.tensor.shape[0])


def mix_named(name: str) -> Mix:
    mix = MIXES.get(name.upper())
    if mix is None:
        raise UsageError(f"unknown type {name!r}; choose one of {', '.join(MIXES)}")
    return mix


def llama_cpp_order(name: str) -> tuple[int, str]:
    """llama.cpp's weight order (and so its output's): tensors outside blocks, then by layer, by name."""
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else -1, name)


def make_plan(gguf: GGUFFile, mix: Mix, allow_requantize: bool) -> list[TensorPlan]:
    tensors = sorted(gguf.tensors.values(), key=lambda t: llama_cpp_order(t.name))
    n_head = gguf.arch_get("attention.head_count", 1)
    n_gqa = int(n_head // max(1, gguf.arch_get("attention.head_count_kv", n_head) or 1))
    targets = plan(mix, [TensorSpec(t.name, t.shape) for t in tensors], n_gqa)
    plans = [TensorPlan(t, t.qtype if target is None else target) for t, target in zip(tensors, targets, strict=True)]
    for p in plans:
        if p.target not in FORMATS:
            raise UsageError(f"{p.tensor.name}: llmx cannot write {p.target.name} yet")
        requantized = p.target != p.tensor.qtype and p.tensor.qtype not in FLOATS
        if requantized and not allow_requantize:
            raise UsageError(f"the input is already quantized ({p.tensor.name} is {p.tensor.qtype.name}); "
                             "pass --allow-requantize to requantize it (quality drops)")
        if p.tensor.qtype not in FORMATS:
            raise UsageError(f"{p.tensor.name}: llmx cannot read {p.tensor.qtype.name} tensors")
    return plans


def load_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """An imatrix GGUF (llama.cpp's layout): per weight, `<name>.in_sum2` / `<name>.counts` = the
    mean squared activation of each input column; and the keys llama-quantize records about it."""
    imatrix = GGUFFile.open(path)
    importance = importance_of(imatrix, path)
    return importance, imatrix_metadata(imatrix, path, len(importance))


def importance_of(imatrix: GGUFFile, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in imatrix.tensors.items():
        if name.endswith(".in_sum2"):
            weight = name.removesuffix(".in_sum2")
            counts = imatrix.tensors.get(weight + ".counts")
            if counts is None:
                raise LlmxError(f"{path}: {name} has no {weight}.counts")
            sums = tensor.data.astype(np.float32).reshape(-1, tensor.shape[0])  # [n_mat, n_cols]
            out[weight] = (sums[0] / max(float(counts.data.reshape(-1)[0]), 1.0)).astype(np.float32)
    if not out:
        raise LlmxError(f"{path} holds no importance matrix (no *.in_sum2 tensors)")
    return out


def imatrix_metadata(imatrix: GGUFFile, path: Path, entries: int) -> dict[str, tuple]:
    datasets = imatrix.get("imatrix.datasets")
    meta = {"quantize.imatrix.file": (str(path), GGUFValueType.STRING),
            "quantize.imatrix.entries_count": (entries, GGUFValueType.INT32),
            "quantize.imatrix.chunks_count": (int(imatrix.get("imatrix.chunk_count", 0)), GGUFValueType.INT32)}
    if datasets is not None and len(datasets):
        meta["quantize.imatrix.dataset"] = (str(datasets[0]), GGUFValueType.STRING)
    return meta


def convert(tensor: GGUFTensor, target: QType, importance: np.ndarray | None, pool: ThreadPoolExecutor,
            threads: int) -> np.ndarray:
    """The tensor's data in `target`, as uint8 [rows, row_bytes]."""
    raw = tensor.data.view(np.uint8).reshape(-1, row_nbytes(tensor.qtype, tensor.shape[0]))
    if target == tensor.qtype:
        return raw
    rows = raw.shape[0]
    out = np.empty((rows, row_nbytes(target, tensor.shape[0])), np.uint8)
    # rows per task: at most ~1M values, and enough tasks to keep every thread busy on small tensors
    step = max(1, min(CHUNK_ELEMENTS // tensor.shape[0], -(-rows // (2 * threads))))

    def work(start: int) -> None:
        part = raw[start : start + step]
        x = part.view(np.float32) if tensor.qtype == QType.F32 else dequantize(part, tensor.qtype)
        out[start : start + step] = quantize(x, target, importance)

    list(pool.map(work, range(0, rows, step)))
    return out


_ARRAY_DTYPES = {GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "<u2",
                 GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
                 GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "u1", GGUFValueType.UINT64: "<u8",
                 GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}


class PackedArray(list):
    """A metadata array already in GGUF's byte layout (element type, count, elements)."""

    def __init__(self, element_type: GGUFValueType, values):
        super().__init__([None])  # a non-empty Sequence, as gguf-py's writer checks
        if element_type == GGUFValueType.STRING:
            encoded = [v.encode("utf-8") for v in values]
            body = b"".join(struct.pack("<Q", len(e)) + e for e in encoded)
        else:
            body = np.asarray(values).astype(_ARRAY_DTYPES[element_type]).tobytes()
        self.payload = struct.pack("<IQ", element_type, len(values)) + body


class Writer(GGUFWriter):
    """gguf-py's writer, packing metadata arrays whole: one by one, a 262k-token vocabulary takes
    gguf-py 1.7 s, a good part of quantizing a small model."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype == GGUFValueType.ARRAY and isinstance(val, PackedArray):
            return (struct.pack("<I", vtype) if add_vtype else b"") + val.payload
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def copy_metadata(gguf: GGUFFile, writer: GGUFWriter, mix: Mix, extra: dict[str, tuple]) -> None:
    skip = {Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION,
            Keys.General.ALIGNMENT}
    for key, value in gguf.metadata.items():
        if key in skip:
            continue
        vtypes = gguf.value_types[key]
        if vtypes[0] == GGUFValueType.ARRAY and len(vtypes) == 2:
            writer.add_key_value(key, PackedArray(vtypes[1], value), vtypes[0], vtypes[1])
        elif vtypes[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtypes[0], vtypes[1])
        else:
            writer.add_key_value(key, value, vtypes[0])
    if gguf.get(Keys.General.ALIGNMENT) is not None:
        writer.add_custom_alignment(int(gguf.get(Keys.General.ALIGNMENT)))
    writer.add_uint32(Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION)
    writer.add_uint32(Keys.General.FILE_TYPE, int(mix.file_type))
    for key, (value, vtype) in extra.items():
        writer.add_key_value(key, value, vtype)


def check_paths(src: Path, out: Path) -> None:
    if src.resolve() == out.resolve() or (out.exists() and os.path.samefile(src, out)):
        raise UsageError("OUT is the input file; write the quantized model to another path")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory")


def importance_per_tensor(plans: list[TensorPlan], importance: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The imatrix entry each quantized tensor uses, checked against its width before anything is written."""
    chosen = {}
    for p in plans:
        weights = None if importance is None or p.target in FLOATS else importance.get(p.tensor.name)
        if weights is None:
            continue
        if weights.size != p.tensor.shape[0]:
            raise UsageError(f"the imatrix has {weights.size} columns for {p.tensor.name}, the model "
                             f"{p.tensor.shape[0]}: it was made for another model")
        chosen[p.tensor.name] = weights
    return chosen


def write_model(gguf: GGUFFile, plans: list[TensorPlan], out: Path, mix: Mix, threads: int,
                importance: dict[str, np.ndarray] | None = None, extra: dict[str, tuple] | None = None,
                on_tensor: Callable[[TensorPlan], None] = lambda p: None) -> None:
    """Quantize and write; OUT appears only when every tensor is written (else nothing does)."""
    weights = importance_per_tensor(plans, importance)
    try:
        with atomic_output(out) as partial:
            writer = Writer(partial, gguf.architecture)
            try:
                _write(writer, gguf, plans, mix, threads, weights, extra or {}, on_tensor)
            finally:
                writer.close()
    except OSError as e:
        raise LlmxError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None


def _write(writer: Writer, gguf: GGUFFile, plans: list[TensorPlan], mix: Mix, threads: int,
           weights: dict[str, np.ndarray], extra: dict[str, tuple], on_tensor: Callable[[TensorPlan], None]) -> None:
    copy_metadata(gguf, writer, mix, extra)
    for p in plans:
        numpy_shape = (*reversed(p.tensor.shape[1:]), row_nbytes(p.target, p.tensor.shape[0]))
        writer.add_tensor_info(p.tensor.name, numpy_shape, np.dtype(np.uint8), p.nbytes,
                               raw_dtype=GGMLQuantizationType(p.target))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Tensor i is written by its own thread while tensor i + 1 is quantized.
    with ThreadPoolExecutor(max_workers=threads) as pool, ThreadPoolExecutor(max_workers=1) as disk:
        pending, previous = None, None
        for p in plans:
            data = convert(p.tensor, p.target, weights.get(p.tensor.name), pool, threads)
            if pending is not None:
                pending.result()
                on_tensor(previous)
            pending, previous = disk.submit(writer.write_tensor_data, data), p
        if pending is not None:
            pending.result()
            on_tensor(previous)
