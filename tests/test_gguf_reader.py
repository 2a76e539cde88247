"""The GGUF reader against gguf-py's own GGUFReader, and its validation of bad files."""

from __future__ import annotations

import contextlib
import mmap
import shutil
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import HAVE_REFERENCE, MODELS_DIR, TINY_MODELS, needs_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmx.engine.archs import config_from_gguf
from llmx.errors import GGUFError, LlmxError, ModelNotFoundError
from llmx.formats.gguf_file import GGUFFile
from llmx.formats.tokenizer import Tokenizer

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared


def assert_same_as_gguf_py(path: Path) -> None:
    ours = GGUFFile.open(path)
    theirs = gguf.GGUFReader(path)
    header_fields = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    fields = {k: f for k, f in theirs.fields.items() if k not in header_fields}
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert list(ours.value_types[key]) == list(field.types), key
        expected = field.contents()
        if isinstance(expected, list):
            assert len(ours.metadata[key]) == len(expected), key
            assert all(a == b for a, b in zip(ours.metadata[key], expected, strict=True)), key
        else:
            assert ours.metadata[key] == expected, key
    assert ours.alignment == theirs.alignment
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype.value == t.tensor_type.value
        assert mine.shape == tuple(int(d) for d in t.shape)
        assert (mine.offset, mine.nbytes, mine.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        assert np.array_equal(mine.data, t.data, equal_nan=True), t.name


@pytest.mark.parametrize("path", TINY_MODELS, ids=lambda p: p.name)
def test_tiny_models_read_like_gguf_py(path):
    assert_same_as_gguf_py(path)


def test_reference_has_all_tiny_models():
    assert len(TINY_MODELS) == 21


@pytest.mark.slow
def test_default_model_reads_like_gguf_py(gemma_path):
    assert_same_as_gguf_py(gemma_path)


def test_tensor_views_are_zero_copy(gemma_path):
    f = GGUFFile.open(gemma_path)
    t = f.tensors["token_embd.weight"]
    assert not t.data.flags.owndata and not t.data.flags.writeable


@pytest.mark.parametrize("path", TINY_MODELS, ids=lambda p: p.name)
def test_load_into_memory_gives_the_same_tensors_off_the_mmap(path):
    mapped, loaded = GGUFFile.open(path), GGUFFile.open(path)
    loaded.load_into_memory()
    assert list(loaded.tensors) == list(mapped.tensors)
    for name, tensor in loaded.tensors.items():
        before = mapped.tensors[name]
        assert tensor.data.dtype == before.data.dtype and tensor.data.shape == before.data.shape
        assert tensor.data.tobytes() == before.data.tobytes(), name
        assert not np.shares_memory(tensor.data, before.data)
        assert not isinstance(tensor.data.base, mmap.mmap) and tensor.data.base is not None


@pytest.mark.parametrize("path", TINY_MODELS[:2], ids=lambda p: p.name)
def test_tensors_kept_mapped_stay_on_the_mmap_and_the_rest_is_read(path):
    """The tensors a model repacks stay on the mmap (the private copy never holds them); the
    tensors before, between and after them are read whole."""
    mapped, loaded = GGUFFile.open(path), GGUFFile.open(path)
    names = list(mapped.tensors)
    kept = {names[0], names[len(names) // 2], names[len(names) // 2 + 1], names[-1]}
    on_the_mmap = {name: t.data for name, t in loaded.tensors.items()}
    loaded.load_into_memory(keep_mapped=kept)
    for name, tensor in loaded.tensors.items():
        assert tensor.data.tobytes() == mapped.tensors[name].data.tobytes(), name
        assert (tensor.data is on_the_mmap[name]) == (name in kept), name


def test_load_into_memory_reports_a_truncated_file(tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copy(TINY, copy)
    f = GGUFFile.open(copy)
    with copy.open("r+b") as handle:  # the file shrinks after it was opened
        handle.truncate(copy.stat().st_size - 100)
    with pytest.raises(GGUFError, match="ended while reading"):
        f.load_into_memory()


# -- validation ---------------------------------------------------------------

TINY = MODELS_DIR / "tiny-llama-q8_0.gguf"


def patched_copy(tmp_path: Path, edits: dict[int, bytes], src: Path = TINY) -> Path:
    data = bytearray(src.read_bytes())
    for pos, raw in edits.items():
        data[pos : pos + len(raw)] = raw
    out = tmp_path / "patched.gguf"
    out.write_bytes(bytes(data))
    return out


def tensor_info_positions(path: Path, index: int) -> dict[str, int]:
    """Byte positions of the type and offset fields of tensor `index`, found by gguf-py's reader."""
    reader = gguf.GGUFReader(path)
    field = reader.tensors[index].field
    pos, starts = field.offset, []
    for part in field.parts:
        starts.append(pos)
        pos += part.nbytes
    # parts: name length, name, n_dims, dims, type, offset
    return {"type": starts[4], "offset": starts[5], "dims": starts[3]}


def test_tensor_offset_past_end(tmp_path):
    where = tensor_info_positions(TINY, 3)
    path = patched_copy(tmp_path, {where["offset"]: struct.pack("<Q", 1 << 40)})
    with pytest.raises(GGUFError, match="past the end"):
        GGUFFile.open(path)


def test_unknown_type_id(tmp_path):
    where = tensor_info_positions(TINY, 3)
    path = patched_copy(tmp_path, {where["type"]: struct.pack("<I", 99)})
    with pytest.raises(GGUFError, match="unknown type id 99"):
        GGUFFile.open(path)


def test_removed_type_id(tmp_path):
    where = tensor_info_positions(TINY, 3)
    path = patched_copy(tmp_path, {where["type"]: struct.pack("<I", 4)})  # Q4_2, long gone
    with pytest.raises(GGUFError, match="unknown type id 4"):
        GGUFFile.open(path)


def test_misaligned_offset(tmp_path):
    where = tensor_info_positions(TINY, 3)
    offset = GGUFFile.open(TINY).tensors[gguf.GGUFReader(TINY).tensors[3].name].offset
    rel = offset - GGUFFile.open(TINY).data_offset
    path = patched_copy(tmp_path, {where["offset"]: struct.pack("<Q", rel + 4)})
    with pytest.raises(GGUFError, match="not aligned"):
        GGUFFile.open(path)


def test_shape_not_whole_blocks(tmp_path):
    reader = gguf.GGUFReader(TINY)
    index = next(i for i, t in enumerate(reader.tensors) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    where = tensor_info_positions(TINY, index)
    ne0 = int(reader.tensors[index].shape[0])
    path = patched_copy(tmp_path, {where["dims"]: struct.pack("<Q", ne0 + 1)})
    with pytest.raises(GGUFError, match="whole number"):
        GGUFFile.open(path)


def test_duplicate_tensor_name(tmp_path):
    path = tmp_path / "dup.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("a", np.zeros(32, np.float32))
    writer.add_tensor("b", np.zeros(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    # Rename tensor "b" to "a" in the tensor table (both names have length 1).
    first = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00a")
    second = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b", first)
    path.write_bytes(data[: second + 8] + b"a" + data[second + 9 :])
    with pytest.raises(GGUFError, match="appears twice"):
        GGUFFile.open(path)


@pytest.mark.parametrize(("version", "message"), [(1, "version 1"), (4, "version 4"),
                                                  (0x03000000, "big-endian")])
def test_versions(tmp_path, version, message):
    path = patched_copy(tmp_path, {4: struct.pack("<I", version)})
    with pytest.raises(GGUFError, match=message):
        GGUFFile.open(path)


def test_huge_counts_are_rejected_before_allocating(tmp_path):
    path = patched_copy(tmp_path, {16: struct.pack("<Q", 1 << 60)})  # metadata count
    with pytest.raises(GGUFError, match="cannot fit"):
        GGUFFile.open(path)


def test_version_2_reads(tmp_path):
    # v2 differs from v3 only in what it may contain; the layout of this file is valid v2 too.
    path = patched_copy(tmp_path, {4: struct.pack("<I", 2)})
    assert GGUFFile.open(path).version == 2


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelNotFoundError):
        GGUFFile.open(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="directory"):
        GGUFFile.open(tmp_path)


def load_everything(path: Path) -> None:
    f = GGUFFile.open(path)
    Tokenizer.from_gguf(f).tokenize("hello there, the cat", special=True)
    config_from_gguf(f)


def header_regions(path: Path) -> list[tuple[int, int]]:
    """Byte ranges worth mutating: the fixed header and first keys, and the tensor table."""
    tensor_table_start = gguf.GGUFReader(path).tensors[0].field.offset
    return [(0, 2048), (tensor_table_start, GGUFFile.open(path).data_offset)]


REGIONS = header_regions(TINY) if HAVE_REFERENCE else []


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers_load_or_raise_llmx_error(data):
    edits = {}
    for _ in range(data.draw(st.integers(1, 8))):
        start, end = REGIONS[data.draw(st.integers(0, len(REGIONS) - 1))]
        edits[data.draw(st.integers(start, end - 1))] = bytes([data.draw(st.integers(0, 255))])
    with tempfile.TemporaryDirectory() as tmp:
        path = patched_copy(Path(tmp), edits)
        with contextlib.suppress(LlmxError):  # loading or LlmxError; anything else fails the test
            load_everything(path)


def test_unmodified_copy_loads(tmp_path):
    path = tmp_path / "copy.gguf"
    shutil.copy(TINY, path)
    load_everything(path)


def test_fuzz_script_300_mutants_load_or_fail_in_one_line():
    """scripts/fuzz_gguf.py (10,000 by default) in CI's size: no crash, hang, traceback or blow-up."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_gguf.py"
    result = subprocess.run([sys.executable, str(script), "--count", "300", "--seed", "1", "--json",
                             "--models", str(MODELS_DIR)], capture_output=True, text=True, timeout=900)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and report["bad"] == [], report["bad"]
    assert report["outcomes"]["refused"] >= 150 and report["outcomes"].get("ran", 0) >= 1, report
    assert sum(report["mutations"].values()) == 300 and len(report["mutations"]) >= 8
