"""`QType`: GGML's tensor type ids as our own enum, with block geometry from gguf-py.

A leaf module (numpy-free) so the GGUF reader can name tensor types without loading kernels.
"""

from enum import IntEnum

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QType = IntEnum("QType", {t.name: t.value for t in GGMLQuantizationType})
QType.__doc__ = "A GGML tensor type; values are the ids stored in GGUF files."


def block_size(qtype: QType) -> int:
    """Elements per block (1 for plain float and integer types)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def type_size(qtype: QType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][1]


def row_nbytes(qtype: QType, n_elements: int) -> int:
    """Bytes for `n_elements` values of `qtype`; `n_elements` must be a whole number of blocks."""
    return n_elements // block_size(qtype) * type_size(qtype)
