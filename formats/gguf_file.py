"""Our GGUF reader: one validating pass over an mmap of the file.

Built on gguf-py's constants, not on `gguf.GGUFReader`: that reader makes a numpy view per
element of every array, which takes seconds on a 262,144-token vocabulary. Here numeric arrays
are single numpy views over the mmap and string arrays are one tight loop.

Everything a later stage will trust is checked before any tensor data is read: magic, version,
every length and count against the bytes left, known type ids, shapes against block sizes,
alignment, duplicate keys and names, and every tensor's bytes inside the file.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from llmx.errors import GGUFError, LlmxError, ModelNotFoundError
from llmx.quant.qtypes import QType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 62  # far beyond any real tensor; keeps byte arithmetic exact

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Fixed-size scalar value types: (struct format, numpy dtype).
_SCALARS: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.BOOL: (struct.Struct("<?"), np.dtype("<u1")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}

# Tensor types whose data gguf-py (and we) expose as typed elements; the rest as raw bytes per row.
_ELEMENT_DTYPES = {
    QType.F32: np.float32,
    QType.F16: np.float16,
    QType.F64: np.float64,
    QType.I8: np.int8,
    QType.I16: np.int16,
    QType.I32: np.int32,
    QType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the table. `shape` is in GGML order: `shape[0]` is the row length."""

    name: str
    qtype: QType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray  # view on the mmap (or the loaded copy): typed elements, or uint8 [rows, bytes per row]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; every overrun is a GGUFError."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}; the file is truncated, corrupt or not a GGUF model")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (at byte {self.pos})")

    def unpack(self, fmt: struct.Struct, what: str):
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count whose items, at `min_item_bytes` each, must fit in what is left."""
        n = self.u64(what)
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(f"{what} = {n} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8") from e

    def string_array(self, n: int, what: str) -> list[str]:
        # The hot loop of opening a model: 262,144 strings for gemma's vocab.
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = [""] * n
        try:
            for i in range(n):
                (length,) = unpack(buf, pos)
                start = pos + 8
                pos = start + length
                if pos > size:
                    raise struct.error
                out[i] = buf[start:pos].decode("utf-8")
        except struct.error as e:
            raise self.fail(f"{what} runs past the end of the file") from e
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}[{i}] is not valid UTF-8") from e
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str) -> tuple[Any, tuple[GGUFValueType, ...]]:
        """A metadata value and its type path ([ARRAY, element type] for arrays)."""
        if vtype == GGUFValueType.STRING:
            return self.string(what), (vtype,)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        value = self.unpack(_SCALARS[vtype][0], what)
        return value, (vtype,)

    def array(self, what: str) -> tuple[Any, tuple[GGUFValueType, ...]]:
        etype = self.value_type(f"element type of {what}")
        if etype == GGUFValueType.STRING:
            n = self.count(f"length of {what}", 8)
            return self.string_array(n, what), (GGUFValueType.ARRAY, etype)
        if etype == GGUFValueType.ARRAY:
            n = self.count(f"length of {what}", 12)
            items = [self.array(f"{what}[{i}]") for i in range(n)]
            inner = items[0][1] if items else ()
            return [v for v, _ in items], (GGUFValueType.ARRAY, *inner)
        dtype = _SCALARS[etype][1]
        n = self.count(f"length of {what}", dtype.itemsize)
        values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
        self.pos += n * dtype.itemsize
        if etype == GGUFValueType.BOOL:
            values = values.astype(bool)
        return values, (GGUFValueType.ARRAY, etype)


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    qtype: QType
    shape: tuple[int, ...]
    rel_offset: int
    nbytes: int


class GGUFFile:
    """A validated GGUF file: typed metadata and a tensor table with zero-copy views.

    >>> f = GGUFFile.open("model.gguf")
    >>> f.architecture, f.arch_get("block_count"), f.tensors["token_embd.weight"].qtype
    """

    def __init__(self, path: Path, buf, size: int):
        self.path = path
        self._buf = buf
        self.file_size = size
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, ...]] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        buf, size = _map_file(path)
        gguf = cls(path, buf, size)
        gguf._parse()
        return gguf

    # -- metadata helpers -------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str) or not arch:
            raise GGUFError(f"{self.path}: no {Keys.General.ARCHITECTURE} in the metadata")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]

    def arch_key(self, suffix: str) -> str:
        """`block_count` -> `gemma3.block_count`."""
        return f"{self.architecture}.{suffix}"

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(self.arch_key(suffix), default)

    def arch_require(self, suffix: str) -> Any:
        return self.require(self.arch_key(suffix))

    # -- parsing ----------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self._buf, self.file_size, self.path)
        n_tensors, n_kv = self._parse_header(cur)
        for i in range(n_kv):
            self._parse_kv(cur, i)
        self.alignment = self._alignment(cur)
        entries = [self._parse_tensor_info(cur, i) for i in range(n_tensors)]
        self._check_duplicate_names(cur, entries)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        if n_tensors and self.data_offset > self.file_size:
            raise cur.fail("tensor data section starts past the end of the file")
        for entry in entries:
            self.tensors[entry.name] = self._make_tensor(cur, entry)

    def _parse_header(self, cur: _Cursor) -> tuple[int, int]:
        if self.file_size == 0:
            raise GGUFError(f"{self.path}: the file is empty, not a GGUF model")
        cur.need(4, "magic")
        magic = bytes(self._buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            raise cur.fail(_version_problem(self.version))
        n_tensors = cur.count("tensor count", 32)  # name len + n_dims + 1 dim + type + offset
        n_kv = cur.count("metadata count", 20)  # key len + type + smallest value
        return n_tensors, n_kv

    def _parse_kv(self, cur: _Cursor, index: int) -> None:
        key = cur.string(f"metadata key #{index}")
        if key in self.metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.value_type(f"metadata {key!r}")
        value, types = cur.value(vtype, f"metadata {key!r}")
        self.metadata[key] = value
        self.value_types[key] = types

    def _alignment(self, cur: _Cursor) -> int:
        key = Keys.General.ALIGNMENT
        if key not in self.metadata:
            return DEFAULT_ALIGNMENT
        align = self.metadata[key]
        if self.value_types[key] != (GGUFValueType.UINT32,) or align <= 0 or align & (align - 1):
            raise cur.fail(f"{key} = {align!r} is not a power of two")
        return align

    def _parse_tensor_info(self, cur: _Cursor, index: int) -> _TensorEntry:
        name = cur.string(f"tensor name #{index}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
        qtype = _tensor_type(cur, cur.u32(f"type of tensor {name!r}"), name)
        rel_offset = cur.u64(f"offset of tensor {name!r}")
        nbytes = _tensor_nbytes(cur, name, qtype, shape)
        if rel_offset % self.alignment:
            raise cur.fail(f"tensor {name!r} offset {rel_offset} is not aligned to {self.alignment}")
        return _TensorEntry(name, qtype, shape, rel_offset, nbytes)

    @staticmethod
    def _check_duplicate_names(cur: _Cursor, entries: list[_TensorEntry]) -> None:
        seen: set[str] = set()
        for entry in entries:
            if entry.name in seen:
                raise cur.fail(f"tensor name {entry.name!r} appears twice")
            seen.add(entry.name)

    def _make_tensor(self, cur: _Cursor, entry: _TensorEntry) -> GGUFTensor:
        offset = self.data_offset + entry.rel_offset
        if offset + entry.nbytes > self.file_size:
            raise cur.fail(
                f"tensor {entry.name!r} ({entry.nbytes} bytes at offset {offset}) lies past the end "
                f"of the file ({self.file_size} bytes)"
            )
        return GGUFTensor(entry.name, entry.qtype, entry.shape, offset, entry.nbytes,
                          self._view(entry, offset))

    def _view(self, entry: _TensorEntry | GGUFTensor, offset: int, buf=None) -> np.ndarray:
        """The tensor's bytes at `offset` of `buf` (default: the file's mmap) as a numpy array."""
        buf = self._buf if buf is None else buf
        numpy_shape = tuple(reversed(entry.shape))  # GGML's ne0 is numpy's last axis
        dtype = _ELEMENT_DTYPES.get(entry.qtype)
        if dtype is not None:
            count = entry.nbytes // np.dtype(dtype).itemsize
            return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(numpy_shape)
        row_bytes = entry.nbytes // max(1, int(np.prod(numpy_shape[:-1], dtype=np.int64)))
        data = np.frombuffer(buf, dtype=np.uint8, count=entry.nbytes, offset=offset)
        return data.reshape(*numpy_shape[:-1], row_bytes)

    # -- loading --------------------------------------------------------------

    def load_into_memory(self, keep_mapped: frozenset[str] | set[str] = frozenset()) -> None:
        """Read the tensor data into private memory and point every tensor at it (llama.cpp's
        --no-mmap). The weights are streamed once per token, and reading them from large
        anonymous pages (numpy advises huge pages for big arrays) is faster than from the page
        cache's 4 KiB pages: gemma-3 270M decodes at 18.0 -> 14.0 ms per token on 2 threads. The
        file is read with readinto, not through the mmap, so its pages are not counted twice.
        Tensors in `keep_mapped` (ones the model repacks into its own copy) stay on the mmap, and
        only the others are copied, into one buffer of their size: one of the whole data section
        would be touched a huge page at a time, and zeroing those cost a warm start 0.05-0.15 s
        to copy gemma's 0.2 MB of norms."""
        copied = sorted((t for name, t in self.tensors.items() if name not in keep_mapped), key=lambda t: t.offset)
        starts = np.cumsum([0] + [_aligned(t.nbytes) for t in copied]).tolist()
        data = np.empty(starts[-1], np.uint8)
        try:
            with self.path.open("rb") as f:
                for tensor, at in zip(copied, starts[:-1], strict=True):
                    self._read_range(f, data, tensor.offset, at, tensor.nbytes)
        except OSError as e:
            raise LlmxError(f"{self.path}: cannot read the file ({e.strerror or e})") from e
        for tensor, at in zip(copied, starts[:-1], strict=True):
            self.tensors[tensor.name] = dataclasses.replace(tensor, data=self._view(tensor, at, data))

    def _read_range(self, f, data: np.ndarray, offset: int, at: int, n_bytes: int) -> None:
        """data[at:at + n_bytes] = the file's bytes offset..offset + n_bytes."""
        f.seek(offset)
        view = memoryview(data)
        end = at + n_bytes
        while at < end:
            n = f.readinto(view[at:end])
            if not n:
                raise GGUFError(f"{self.path}: the file ended while reading its tensors (was it changed?)")
            at += n


def _aligned(n_bytes: int) -> int:
    """n_bytes rounded up to a cache line, so that every copied tensor starts on one."""
    return -(-n_bytes // 64) * 64


def _map_file(path: Path) -> tuple[Any, int]:
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file; check the path to the .gguf model")
    if path.is_dir():
        raise GGUFError(f"{path} is a directory; give the path of a .gguf file inside it")
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size == 0:
                raise GGUFError(f"{path}: the file is empty, not a GGUF model")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise LlmxError(f"{path}: cannot read the file ({e.strerror or e})") from e


def _version_problem(version: int) -> str:
    if version == 1:
        return "GGUF version 1 is no longer supported; re-convert the model with a current llama.cpp"
    if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
        return "the file is a big-endian GGUF, which llmx does not read"
    return f"unsupported GGUF version {version} (llmx reads versions 2 and 3)"


def _tensor_type(cur: _Cursor, raw: int, name: str) -> QType:
    try:
        qtype = QType(raw)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown type id {raw}") from None
    if GGMLQuantizationType(raw) not in GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name!r} has type {qtype.name} with no known block layout")
    return qtype


def _tensor_nbytes(cur: _Cursor, name: str, qtype: QType, shape: tuple[int, ...]) -> int:
    block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    n_elements = 1
    for dim in shape:
        n_elements *= dim
        if n_elements > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} has an impossible shape {shape}")
    if shape[0] % block:
        raise cur.fail(
            f"tensor {name!r} rows of {shape[0]} values are not a whole number of "
            f"{qtype.name} blocks of {block}"
        )
    return n_elements // block * type_bytes
