"""SIMD building blocks for the CPU kernels: LLVM vectors as Numba values, and small intrinsics.

Numba's own loops do not emit `vpmaddubsw`, so the kernels are written in Numba over a vector
type (`Vec`) whose values are LLVM vectors kept in registers, combined by tiny intrinsics written
in llvmlite IR. Each intrinsic that has an x86 form takes an instruction-set marker first:

- `AVX2` (a numpy int16 scalar): `llvm.x86.avx2.pmadd.ub.sw` / `pmadd.wd`;
- `PORTABLE` (a numpy int8 scalar): plain LLVM vector IR that any target lowers (ARM NEON, ...);
- `VNNI` (a numpy int32 scalar): AVX2, with the byte dot products in one `vpdpbusd`
  (`llvm.x86.avx512.vpdpbusd.256`, AVX512-VNNI + VL or AVX-VNNI) instead of pmaddubsw + pmaddwd.

The marker's *type* picks the implementation, so each choice is compiled and cached separately
and tests can run the portable path on an AVX2 machine.

Lane convention of the integer dot products: lane i of the 8 x i32 result is the sum of the
products of elements 4i..4i+3, on every instruction set (so 16-element sub-blocks are lanes 0-3
and 4-7).
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

PORTABLE = np.int8(0)
AVX2 = np.int16(0)
VNNI = np.int32(0)

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V32I8, _V16I8 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 16)
_V16I16, _V32I16 = ir.VectorType(_I16, 16), ir.VectorType(_I16, 32)
_V8I32, _V16I32 = ir.VectorType(_I32, 8), ir.VectorType(_I32, 16)
_V8F32 = ir.VectorType(_F32, 8)

llvm.initialize_native_asmparser()  # for the inline asm of `dot_i16x16` (Numba initializes only the printer)


@functools.cache  # asking LLVM for the host's features costs ~150 us, and every matmul needs the answer
def host_isa():
    """The best instruction-set marker for this CPU."""
    features = llvm.get_host_cpu_features()
    if not (features.get("avx2") and features.get("fma")):
        return PORTABLE
    vnni = features.get("avxvnni") or (features.get("avx512vnni") and features.get("avx512vl"))
    return VNNI if vnni else AVX2


@functools.cache
def _host_has(feature: str) -> bool:
    return bool(llvm.get_host_cpu_features().get(feature))


def has_avx2() -> bool:
    """Whether this CPU runs the AVX2 paths (the AVX2 and VNNI markers)."""
    return host_isa() is not PORTABLE


ISA_NAMES = {"portable": PORTABLE, "avx2": AVX2, "vnni": VNNI}


def isa_named(name: str | None):
    """The marker for "avx2", "vnni" or "portable" (None: the host's best); a set this CPU lacks
    is an error. Forcing "avx2" on an AVX-512 host measures what AVX2-only laptops run."""
    from llmx.errors import UsageError

    if name is None:
        return host_isa()
    if name not in ISA_NAMES:
        raise UsageError(f"unknown instruction set {name!r}; use one of {', '.join(ISA_NAMES)}")
    isa = ISA_NAMES[name]
    if isa is not PORTABLE and (host_isa() is PORTABLE or (isa is VNNI and host_isa() is not VNNI)):
        raise UsageError(f"this CPU cannot run the {name} path; it runs {isa_name(host_isa())}")
    return isa


def isa_name(isa) -> str:
    return {PORTABLE.dtype: "portable", AVX2.dtype: "avx2", VNNI.dtype: "vnni"}[np.asarray(isa).dtype]


def _is_avx2(marker_type) -> bool:
    """AVX2 instructions allowed (the AVX2 and VNNI markers)."""
    if marker_type in (types.int16, types.int32):
        return True
    if marker_type == types.int8:
        return False
    raise TypeError(f"expected an ISA marker (simd.AVX2, simd.VNNI or simd.PORTABLE), got {marker_type}")


def _is_vnni(marker_type) -> bool:
    return _is_avx2(marker_type) and marker_type == types.int32


class Vec(types.Type):
    """An LLVM vector of `count` x `dtype`, held in registers."""

    def __init__(self, dtype, count: int):
        self.dtype, self.count = dtype, count
        super().__init__(name=f"Vec({dtype} x {count})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.count))


I8x32 = Vec(types.int8, 32)
I16x16 = Vec(types.int16, 16)
I32x8 = Vec(types.int32, 8)
F32x8 = Vec(types.float32, 8)


def _splat(builder, value, vector_type):
    undef = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, vector_type.count), None))


def _const_vec(vector_type, value):
    return ir.Constant(vector_type, [ir.Constant(vector_type.element, value)] * vector_type.count)


def _zero(vec):
    """An intrinsic for `vec`'s all-zero vector."""
    @intrinsic
    def zero(typingctx):
        def codegen(context, builder, signature, args):
            return ir.Constant(context.get_value_type(signature.return_type), None)

        return vec(), codegen

    return zero


def _pointer(context, builder, array_type, array, byte_offset, element_type):
    """Address `byte_offset` bytes into an array's data, typed as `element_type`*."""
    data = cgutils.create_struct_proxy(array_type)(context, builder, value=array).data
    raw = builder.bitcast(data, _I8.as_pointer())
    return builder.bitcast(builder.gep(raw, [byte_offset]), element_type.as_pointer())


def _call(builder, name, return_type, args):
    fnty = ir.FunctionType(return_type, [a.type for a in args])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


def _shuffle(builder, vector, indices):
    mask = ir.Constant(ir.VectorType(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])
    return builder.shuffle_vector(vector, ir.Constant(vector.type, ir.Undefined), mask)


def _concat(builder, low, high):
    """Two vectors of n lanes -> one of 2n: `low`'s lanes, then `high`'s (two 256-bit halves
    back into one 512-bit value)."""
    lanes = range(2 * low.type.count)
    mask = ir.Constant(ir.VectorType(_I32, len(lanes)), [ir.Constant(_I32, i) for i in lanes])
    return builder.shuffle_vector(low, high, mask)


# -- buffers ----------------------------------------------------------------------

LINE = 64  # bytes in a cache line: a 512-bit load from an address that is not a multiple of it reads two


@njit
def line_aligned_empty(n, dtype):
    """np.empty(n, dtype), starting on a cache line. Numba's allocator aligns arrays to 32 bytes and
    numpy's to 16: activations read with 512-bit loads from such a buffer cost two lines a load, and
    the token-lane kernel at 16 tokens on 4096 x 4096 ran ~10% slower whenever its activations
    started 16, 32 or 48 bytes past a line (measured), which made its speed change from one process
    to the next."""
    spare = np.empty(n + LINE, dtype)  # LINE elements: at least LINE bytes to skip into
    skip = (-spare.ctypes.data) % LINE // spare.itemsize
    return spare[skip:skip + n]


def np_line_aligned_empty(n: int, dtype) -> np.ndarray:
    """`line_aligned_empty` for Python callers (numpy, no compilation)."""
    spare = np.empty(n + LINE, dtype)
    skip = -spare.ctypes.data % LINE // spare.itemsize
    return spare[skip:skip + n]


# -- loads ----------------------------------------------------------------------


@intrinsic
def load_i8x32(typingctx, array, byte_offset):
    """32 bytes at `byte_offset` of a 1-D byte array (unaligned)."""
    sig = I8x32(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = _pointer(context, builder, signature.args[0], args[0], offset, _V32I8)
        return builder.load(ptr, align=1)

    return sig, codegen


@intrinsic
def load_nibbles_i8x32(typingctx, array, byte_offset):
    """16 bytes -> 32 values 0..15: low nibbles are elements 0..15, high nibbles 16..31."""
    sig = I8x32(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        packed = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V16I8), align=1)
        # the 16 bytes in both halves (a broadcast load), the upper half shifted by 4 (`vpsrlvq`), one mask
        twice = builder.bitcast(_shuffle(builder, packed, [i % 16 for i in range(32)]), ir.VectorType(_I64, 4))
        shifted = builder.lshr(twice, ir.Constant(ir.VectorType(_I64, 4), [ir.Constant(_I64, n) for n in (0, 0, 4, 4)]))
        return builder.and_(builder.bitcast(shifted, _V32I8), _const_vec(_V32I8, 0x0F))

    return sig, codegen


@intrinsic
def load_f16(typingctx, array, byte_offset):
    """A little-endian float16 at `byte_offset`, widened to float32."""
    sig = types.float32(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = _pointer(context, builder, signature.args[0], args[0], offset, ir.HalfType())
        return builder.fpext(builder.load(ptr, align=1), _F32)

    return sig, codegen


@intrinsic
def load_u32(typingctx, array, byte_offset):
    sig = types.uint32(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _I32), align=1)

    return sig, codegen


# -- byte arithmetic --------------------------------------------------------------


@intrinsic
def field_i8x32(typingctx, v, shift, mask):
    """(v >> shift) & mask on each unsigned byte."""
    sig = I8x32(I8x32, types.int32, types.int32)

    def codegen(context, builder, signature, args):
        vec, shift_by, keep = args
        shift_v = _splat(builder, builder.trunc(shift_by, _I8), _V32I8)
        mask_v = _splat(builder, builder.trunc(keep, _I8), _V32I8)
        return builder.and_(builder.lshr(vec, shift_v), mask_v)

    return sig, codegen


@intrinsic
def q5_0_codes_i8x32(typingctx, nibbles, bits):
    """Q5_0's signed codes, nibble + 16 x (bit j of `bits`) - 16: the nibble where the bit is set,
    the nibble - 16 where it is clear (one masked subtract)."""
    sig = I8x32(I8x32, types.uint32)

    def codegen(context, builder, signature, args):
        nib, word = args
        set_bits = builder.bitcast(word, ir.VectorType(ir.IntType(1), 32))
        return builder.select(set_bits, nib, builder.sub(nib, _const_vec(_V32I8, 16)))

    return sig, codegen


@intrinsic
def shl_i8x32(typingctx, v, shift):
    sig = I8x32(I8x32, types.int32)

    def codegen(context, builder, signature, args):
        return builder.shl(args[0], _splat(builder, builder.trunc(args[1], _I8), _V32I8))

    return sig, codegen


@intrinsic
def or_i8x32(typingctx, a, b):
    sig = I8x32(I8x32, I8x32)

    def codegen(context, builder, signature, args):
        return builder.or_(args[0], args[1])

    return sig, codegen


@intrinsic
def add_i8x32(typingctx, v, k):
    """v + k on each byte (wrapping), e.g. k = -8 to centre Q4_0 codes."""
    sig = I8x32(I8x32, types.int32)

    def codegen(context, builder, signature, args):
        return builder.add(args[0], _splat(builder, builder.trunc(args[1], _I8), _V32I8))

    return sig, codegen


@intrinsic
def bits_i8x32(typingctx, bits, value):
    """Bit j of a uint32 -> byte j equal to `value` where set, else 0 (Q5_0/Q5_1 high bits)."""
    sig = I8x32(types.uint32, types.int32)

    def codegen(context, builder, signature, args):
        as_bits = builder.bitcast(args[0], ir.VectorType(ir.IntType(1), 32))
        ones = builder.zext(as_bits, _V32I8)
        return builder.mul(ones, _splat(builder, builder.trunc(args[1], _I8), _V32I8))

    return sig, codegen


# -- integer dot products -----------------------------------------------------------


def _portable_dot(builder, a, b, a_unsigned):
    """8 x i32, lane i = sum of a[j] * b[j] for j in 4i..4i+3, in plain vector IR."""
    wide_a = builder.zext(a, _V32I16) if a_unsigned else builder.sext(a, _V32I16)
    products = builder.mul(wide_a, builder.sext(b, _V32I16))  # |a*b| <= 128*128 fits in i16
    evens = builder.sext(_shuffle(builder, products, range(0, 32, 2)), _V16I32)
    odds = builder.sext(_shuffle(builder, products, range(1, 32, 2)), _V16I32)
    pairs = builder.add(evens, odds)
    return builder.add(_shuffle(builder, pairs, range(0, 16, 2)), _shuffle(builder, pairs, range(1, 16, 2)))


def _avx2_dot_unsigned(builder, u, s, vnni=False):
    if vnni:  # no 16-bit saturation either way: |u * s| pairs stay below 2^15 in our callers
        words = [builder.bitcast(u, _V8I32), builder.bitcast(s, _V8I32)]
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_const_vec(_V8I32, 0), *words])
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u, s])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, _const_vec(_V16I16, 1)])


@intrinsic
def dot_i8x32(typingctx, isa, a, b):
    """Signed x signed bytes (|values| <= 127) -> 8 x i32 partial sums."""
    avx2, vnni = _is_avx2(isa), _is_vnni(isa)
    sig = I32x8(isa, I8x32, I8x32)

    def codegen(context, builder, signature, args):
        _, a_v, b_v = args
        if not avx2:
            return _portable_dot(builder, a_v, b_v, a_unsigned=False)
        # pmaddubsw needs one unsigned operand: |a| times b with a's sign moved onto it (psignb).
        abs_a = _call(builder, "llvm.abs.v32i8", _V32I8, [a_v, ir.Constant(ir.IntType(1), 0)])
        signed_b = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [b_v, a_v])
        return _avx2_dot_unsigned(builder, abs_a, signed_b, vnni)

    return sig, codegen


@intrinsic
def dot_u8i8x32(typingctx, isa, u, s):
    """Unsigned (0..127) x signed bytes -> 8 x i32 partial sums."""
    avx2, vnni = _is_avx2(isa), _is_vnni(isa)
    sig = I32x8(isa, I8x32, I8x32)

    def codegen(context, builder, signature, args):
        _, u_v, s_v = args
        if avx2:
            return _avx2_dot_unsigned(builder, u_v, s_v, vnni)
        return _portable_dot(builder, u_v, s_v, a_unsigned=True)

    return sig, codegen


# -- 16 x i16: decoded k-quant weights and activations (`kmatmul`) ---------------------


@intrinsic
def widen_i16x16(typingctx, v, half):
    """Bytes 16*half .. 16*half + 15 of `v` (unsigned) as 16 x i16; `half` is 0 or 1."""
    sig = I16x16(I8x32, types.int32)

    def codegen(context, builder, signature, args):
        vec, which = args
        low = builder.zext(_shuffle(builder, vec, range(16)), _V16I16)
        high = builder.zext(_shuffle(builder, vec, range(16, 32)), _V16I16)
        return builder.select(builder.icmp_signed("==", which, ir.Constant(_I32, 0)), low, high)

    return sig, codegen


@intrinsic
def widen_signed_i16x16(typingctx, v, half):
    """Bytes 16*half .. 16*half + 15 of `v` (signed) as 16 x i16; `half` is 0 or 1."""
    sig = I16x16(I8x32, types.int32)

    def codegen(context, builder, signature, args):
        vec, which = args
        low = builder.sext(_shuffle(builder, vec, range(16)), _V16I16)
        high = builder.sext(_shuffle(builder, vec, range(16, 32)), _V16I16)
        return builder.select(builder.icmp_signed("==", which, ir.Constant(_I32, 0)), low, high)

    return sig, codegen


# Lane order of `dot_i16x16` made to match `dot_*8x32`: within each 32 values, lane i of a dot over
# the first 16 int16 sums values 4i, 4i + 1, over the second 16 values 4i + 2, 4i + 3 (so adding both
# gives the byte dots' lane i: values 4i..4i+3).
CHUNK_ORDER = tuple(4 * (p // 2) + p % 2 for p in range(16)) + tuple(4 * (p // 2) + 2 + p % 2 for p in range(16))


@intrinsic
def chunk_order_i8x32(typingctx, v):
    """32 bytes in `CHUNK_ORDER`."""
    def codegen(context, builder, signature, args):
        return _shuffle(builder, args[0], CHUNK_ORDER)

    return I8x32(I8x32), codegen


@intrinsic
def scale_codes_i16x16(typingctx, v, scale_a, scale_b):
    """v * [scale_a x8, scale_b x8] on each i16: in `CHUNK_ORDER`, the first 8 of each 16 hold
    values 0..15 of their 32, the last 8 values 16..31 (sub-blocks of 16 have one scale each)."""
    sig = I16x16(I16x16, types.int32, types.int32)

    def codegen(context, builder, signature, args):
        vec, a, b = args
        pair = builder.insert_element(ir.Constant(ir.VectorType(_I16, 2), ir.Undefined), builder.trunc(a, _I16),
                                      ir.Constant(_I32, 0))
        pair = builder.insert_element(pair, builder.trunc(b, _I16), ir.Constant(_I32, 1))
        return builder.mul(vec, _shuffle(builder, pair, [0] * 8 + [1] * 8))

    return sig, codegen


@intrinsic
def load_i16x16(typingctx, array, byte_offset):
    sig = I16x16(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V16I16), align=1)

    return sig, codegen


@intrinsic
def store_i16x16(typingctx, array, byte_offset, v):
    sig = types.void(array, types.intp, I16x16)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        builder.store(args[2], _pointer(context, builder, signature.args[0], args[0], offset, _V16I16), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_i16x16(typingctx, isa, acc, a, b):
    """acc + pairwise products: lane i gains a[2i] * b[2i] + a[2i+1] * b[2i+1] (`vpdpwssd` on VNNI
    hosts, `vpmaddwd` + `vpaddd` on AVX2)."""
    avx2, vnni = _is_avx2(isa), _is_vnni(isa)
    sig = I32x8(isa, I32x8, I16x16, I16x16)

    def codegen(context, builder, signature, args):
        _, total, a_v, b_v = args
        if vnni and _host_has("avx512vnni"):
            # Inline asm (the EVEX form: AVX512-VNNI hosts only). LLVM splits the vpdpwssd intrinsic
            # back into vpmaddwd + vpaddd on this tuning (a latency choice); with many independent
            # accumulators one uop is faster (100 -> 116 GMAC/s, Q4_K 4096 x 4096 at 16 tokens, 2 threads).
            asm_type = ir.FunctionType(_V8I32, [_V8I32, _V8I32, _V8I32])
            fused = ir.InlineAsm(asm_type, "vpdpwssd $2, $1, $0", "=v,v,v,0")
            return builder.call(fused, [builder.bitcast(a_v, _V8I32), builder.bitcast(b_v, _V8I32), total])
        if vnni:  # AVX-VNNI
            words = [builder.bitcast(a_v, _V8I32), builder.bitcast(b_v, _V8I32)]
            return _call(builder, "llvm.x86.avx512.vpdpwssd.256", _V8I32, [total, *words])
        if avx2:
            pairs = _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [a_v, b_v])
        else:
            products = builder.mul(builder.sext(a_v, _V16I32), builder.sext(b_v, _V16I32))
            evens, odds = _shuffle(builder, products, range(0, 16, 2)), _shuffle(builder, products, range(1, 16, 2))
            pairs = builder.add(evens, odds)
        return builder.add(total, pairs)

    return sig, codegen


@intrinsic
def hsum8_i32x8(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """[sum(v0), ..., sum(v7)]: eight horizontal sums at once, by transposing adds."""
    def codegen(context, builder, signature, args):
        def level(a, b, low, high):
            def pick(indices):
                mask = ir.Constant(ir.VectorType(_I32, 8), [ir.Constant(_I32, i) for i in indices])
                return builder.shuffle_vector(a, b, mask)

            return builder.add(pick(low), pick(high))

        dwords = ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])
        p01, p23, p45, p67 = (level(args[i], args[i + 1], *dwords) for i in range(0, 8, 2))
        qwords = ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
        q0, q1 = level(p01, p23, *qwords), level(p45, p67, *qwords)
        return level(q0, q1, [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])

    return I32x8(*([I32x8] * 8)), codegen


@intrinsic
def pair_scales_f32x8(typingctx, array, byte_offset, xa, xb):
    """4 float32 s0..s3 at `byte_offset` -> [s0*xa, s0*xb, s1*xa, s1*xb, ..., s3*xb], each product
    rounded to float32 as the scalar product would be."""
    sig = F32x8(array, types.intp, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        four = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, ir.VectorType(_F32, 4)),
                            align=1)
        scales = _shuffle(builder, four, [0, 0, 1, 1, 2, 2, 3, 3])
        xs = builder.insert_element(ir.Constant(ir.VectorType(_F32, 2), ir.Undefined), args[2], ir.Constant(_I32, 0))
        xs = builder.insert_element(xs, args[3], ir.Constant(_I32, 1))
        return builder.fmul(scales, _shuffle(builder, xs, [0, 1] * 4))

    return sig, codegen


@intrinsic
def sub_scaled_f32x8(typingctx, acc, scale, ints):
    """acc - scale * float(ints), rounded after the product and after the difference (no FMA)."""
    def codegen(context, builder, signature, args):
        total, factor, vec = args
        return builder.fsub(total, builder.fmul(factor, builder.sitofp(vec, _V8F32)))

    return F32x8(F32x8, F32x8, I32x8), codegen


@intrinsic
def ggml_expf_f32x8(typingctx, x, c):
    """ggml_v_expf (AVX2) on 8 lanes of x <= 0 (softmax inputs): c holds its
    constants (shift, log2e, ln2 hi, ln2 lo, c1..c5). Lanes whose 2^n would be below 2^-126 give 0."""
    sig = F32x8(F32x8, types.UniTuple(types.float32, 9))

    def codegen(context, builder, signature, args):
        vec = args[0]
        shift, log2e, ln2_hi, ln2_lo, c1, c2, c3, c4, c5 = (
            _splat(builder, builder.extract_value(args[1], i), _V8F32) for i in range(9))

        def fma(a, b, c):
            return _call(builder, "llvm.fma.v8f32", _V8F32, [a, b, c])

        z = fma(vec, log2e, shift)
        n = builder.fsub(z, shift)
        minus_n = builder.fneg(n)
        b = fma(minus_n, ln2_lo, fma(minus_n, ln2_hi, vec))
        u = builder.fmul(b, b)
        j = fma(fma(fma(c5, b, c4), u, fma(c3, b, c2)), u, builder.fmul(c1, b))
        exponent = builder.add(builder.fptosi(n, _V8I32), _const_vec(_V8I32, 127))
        k = builder.bitcast(builder.shl(exponent, _const_vec(_V8I32, 23)), _V8F32)
        tiny = builder.fcmp_ordered("<", n, _const_vec(_V8F32, -126.0))
        return builder.select(tiny, _const_vec(_V8F32, 0.0), fma(j, k, k))

    return sig, codegen


@intrinsic
def keep_lanes_f32x8(typingctx, v, start, first, last, fill):
    """v with lane i set to `fill` unless first <= start + i <= last."""
    sig = F32x8(F32x8, types.int64, types.int64, types.int64, types.float32)

    def codegen(context, builder, signature, args):
        vec, at, lo, hi, other = args
        i64x8 = ir.VectorType(ir.IntType(64), 8)
        index = builder.add(_splat(builder, at, i64x8), ir.Constant(i64x8, [ir.Constant(ir.IntType(64), i)
                                                                           for i in range(8)]))
        inside = builder.and_(builder.icmp_signed(">=", index, _splat(builder, lo, i64x8)),
                              builder.icmp_signed("<=", index, _splat(builder, hi, i64x8)))
        return builder.select(inside, vec, _splat(builder, other, _V8F32))

    return sig, codegen


@intrinsic
def max_f32x8(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return F32x8(F32x8, F32x8), codegen


@intrinsic
def mul_f32x8(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1])

    return F32x8(F32x8, F32x8), codegen


@intrinsic
def round_f16_f32x8(typingctx, v):
    """Each lane float32 -> nearest float16 -> float32."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.VectorType(ir.HalfType(), 8)), _V8F32)

    return F32x8(F32x8), codegen


@intrinsic
def lane_f32x8(typingctx, v, i):
    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], args[1])

    return types.float32(F32x8, types.int64), codegen


@intrinsic
def dot_u8i8_acc_i32x8(typingctx, isa, acc, u, s):
    """acc + the byte dots of unsigned u (0..127) and signed s (lane i: values 4i..4i+3): one
    `vpdpbusd` with VNNI, which takes the accumulator in the same instruction."""
    avx2, vnni = _is_avx2(isa), _is_vnni(isa)
    sig = I32x8(isa, I32x8, I8x32, I8x32)

    def codegen(context, builder, signature, args):
        _, total, u_v, s_v = args
        if vnni:
            words = [builder.bitcast(u_v, _V8I32), builder.bitcast(s_v, _V8I32)]
            return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [total, *words])
        dot = _avx2_dot_unsigned(builder, u_v, s_v) if avx2 else _portable_dot(builder, u_v, s_v, a_unsigned=True)
        return builder.add(total, dot)

    return sig, codegen


@intrinsic
def neg_sums128_i32x8(typingctx, s):
    """-128 times the sums of signed bytes per lane (4 values): pmaddubsw against 128s (pairs stay
    within 128 * 254), then pmaddwd against -1s."""
    def codegen(context, builder, signature, args):
        pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_const_vec(_V32I8, -128), args[0]])
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [pairs, _const_vec(_V16I16, -1)])

    return I32x8(I8x32), codegen


@intrinsic
def load_i32x8(typingctx, array, byte_offset):
    sig = I32x8(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V8I32), align=1)

    return sig, codegen


# -- 8 x i32 and 8 x f32 ----------------------------------------------------------------


zero_i32x8, zero_f32x8 = _zero(I32x8), _zero(F32x8)


@intrinsic
def add_i32x8(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return I32x8(I32x8, I32x8), codegen


@intrinsic
def scale_i32x8(typingctx, v, low, high):
    """v * [low x4, high x4]: one integer scale per 16-element half of a 32-element dot."""
    sig = I32x8(I32x8, types.int32, types.int32)

    def codegen(context, builder, signature, args):
        vec, lo, hi = args
        both = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), ir.Undefined), lo, ir.Constant(_I32, 0))
        both = builder.insert_element(both, hi, ir.Constant(_I32, 1))
        return builder.mul(vec, _shuffle(builder, both, [0, 0, 0, 0, 1, 1, 1, 1]))

    return sig, codegen


@intrinsic
def fma_f32x8(typingctx, acc, v, scale):
    """acc + float(v) * scale."""
    sig = F32x8(F32x8, I32x8, types.float32)

    def codegen(context, builder, signature, args):
        total, ints, factor = args
        floats = builder.sitofp(ints, _V8F32)
        return _call(builder, "llvm.fmuladd.v8f32", _V8F32, [floats, _splat(builder, factor, _V8F32), total])

    return sig, codegen


@intrinsic
def hsum_f32x8(typingctx, v):
    def codegen(context, builder, signature, args):
        vec = args[0]
        quad = builder.fadd(_shuffle(builder, vec, [0, 1, 2, 3]), _shuffle(builder, vec, [4, 5, 6, 7]))
        pair = builder.fadd(_shuffle(builder, quad, [0, 1]), _shuffle(builder, quad, [2, 3]))
        zero, one = ir.Constant(_I32, 0), ir.Constant(_I32, 1)
        return builder.fadd(builder.extract_element(pair, zero), builder.extract_element(pair, one))

    return types.float32(F32x8), codegen


@intrinsic
def hsum_i32x8(typingctx, v):
    def codegen(context, builder, signature, args):
        vec = args[0]
        quad = builder.add(_shuffle(builder, vec, [0, 1, 2, 3]), _shuffle(builder, vec, [4, 5, 6, 7]))
        pair = builder.add(_shuffle(builder, quad, [0, 1]), _shuffle(builder, quad, [2, 3]))
        zero, one = ir.Constant(_I32, 0), ir.Constant(_I32, 1)
        return builder.add(builder.extract_element(pair, zero), builder.extract_element(pair, one))

    return types.int32(I32x8), codegen


def _prefetch(locality: int, doc: str):
    @intrinsic
    def prefetch(typingctx, array, byte_offset):
        sig = types.void(array, types.intp)

        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            ptr = _pointer(context, builder, signature.args[0], args[0], offset, _I8)
            read, data = ir.Constant(_I32, 0), ir.Constant(_I32, 1)
            _call(builder, "llvm.prefetch.p0", ir.VoidType(), [ptr, read, ir.Constant(_I32, locality), data])
            return context.get_dummy_value()

        return sig, codegen

    prefetch.__doc__ = doc
    return prefetch


prefetch = _prefetch(3, "Hint the cache line at `byte_offset` into L1 ahead of use (no fault if out of range).")
prefetch_once = _prefetch(0, """`prefetch` for a line read once (prefetchnta): one token's weights.
A decode step streams ~250 MB of them; as ordinary lines they evict, from every level, the code,
tables and buffers that the step's small operations reuse. (gemma, one thread, AVX-512: a decode
step took 0.90-1.01x, mean 0.966x, of its time with `prefetch`, in eight alternated runs.)""")


# -- float vectors (F32/F16/BF16 weights) ------------------------------------------------


@intrinsic
def load_f32x8(typingctx, array, byte_offset):
    sig = F32x8(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V8F32), align=1)

    return sig, codegen


@intrinsic
def load_f16x8(typingctx, array, byte_offset):
    sig = F32x8(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        halves = ir.VectorType(ir.HalfType(), 8)
        return builder.fpext(builder.load(_pointer(context, builder, signature.args[0], args[0], offset, halves),
                                          align=1), _V8F32)

    return sig, codegen


@intrinsic
def load_bf16x8(typingctx, array, byte_offset):
    """8 bfloat16 values: their bits are the top half of a float32's."""
    sig = F32x8(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        raw = builder.load(_pointer(context, builder, signature.args[0], args[0], offset,
                                    ir.VectorType(_I16, 8)), align=1)
        wide = builder.shl(builder.zext(raw, _V8I32), _const_vec(_V8I32, 16))
        return builder.bitcast(wide, _V8F32)

    return sig, codegen


@intrinsic
def store_f32x8(typingctx, array, byte_offset, v):
    sig = types.void(array, types.intp, F32x8)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        builder.store(args[2], _pointer(context, builder, signature.args[0], args[0], offset, _V8F32), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def sub_f32x8(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.fsub(args[0], args[1])

    return F32x8(F32x8, F32x8), codegen


@intrinsic
def splat_f32x8(typingctx, value):
    def codegen(context, builder, signature, args):
        return _splat(builder, args[0], _V8F32)

    return F32x8(types.float32), codegen


@intrinsic
def fmadd_f32x8(typingctx, acc, a, b):
    """acc + a * b."""
    def codegen(context, builder, signature, args):
        total, x, y = args
        return _call(builder, "llvm.fmuladd.v8f32", _V8F32, [x, y, total])

    return F32x8(F32x8, F32x8, F32x8), codegen


@intrinsic
def round_f16(typingctx, value):
    """float32 -> nearest float16 -> float32 (ggml stores many scales as float16)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), _F32)

    return types.float32(types.float32), codegen


@intrinsic
def round_bf16(typingctx, value):
    """float32 -> nearest-even bfloat16 -> float32, as ggml_compute_fp32_to_bf16 (NaN kept quiet)."""
    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        lsb = builder.and_(builder.lshr(bits, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        rounded = builder.add(bits, builder.add(ir.Constant(_I32, 0x7FFF), lsb))
        is_nan = builder.icmp_unsigned(">", builder.and_(bits, ir.Constant(_I32, 0x7FFFFFFF)),
                                       ir.Constant(_I32, 0x7F800000))
        quiet = builder.or_(bits, ir.Constant(_I32, 0x00400000))
        chosen = builder.select(is_nan, quiet, rounded)
        return builder.bitcast(builder.and_(chosen, ir.Constant(_I32, 0xFFFF0000)), _F32)

    return types.float32(types.float32), codegen


@intrinsic
def load_f32(typingctx, array, byte_offset):
    sig = types.float32(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _F32), align=1)

    return sig, codegen


@intrinsic
def store_f32(typingctx, array, byte_offset, value):
    """array[byte_offset / 4] = value, without the index arithmetic of a negative-index check."""
    sig = types.void(array, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        builder.store(args[2], _pointer(context, builder, signature.args[0], args[0], offset, _F32), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load_i64(typingctx, array, byte_offset):
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, ir.IntType(64)), align=1)

    return types.int64(array, types.intp), codegen


@intrinsic
def load_bf16(typingctx, array, byte_offset):
    sig = types.float32(array, types.intp)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        raw = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _I16), align=1)
        return builder.bitcast(builder.shl(builder.zext(raw, _I32), ir.Constant(_I32, 16)), _F32)

    return sig, codegen


@intrinsic
def bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)

    return types.float32(types.uint32), codegen


@intrinsic
def add_f32x8(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return F32x8(F32x8, F32x8), codegen


@intrinsic
def hadd_sum_f32x8(typingctx, v):
    """Sum of 8 lanes in the order of ggml's AVX reduction (two `haddps`):
    t = low half + high half, then (t0 + t1) + (t2 + t3). (`hsum_f32x8` is tinyBLAS's order.)"""
    def codegen(context, builder, signature, args):
        vec = args[0]
        quad = builder.fadd(_shuffle(builder, vec, [0, 1, 2, 3]), _shuffle(builder, vec, [4, 5, 6, 7]))
        pair = builder.fadd(_shuffle(builder, quad, [0, 2]), _shuffle(builder, quad, [1, 3]))
        zero, one = ir.Constant(_I32, 0), ir.Constant(_I32, 1)
        return builder.fadd(builder.extract_element(pair, zero), builder.extract_element(pair, one))

    return types.float32(F32x8), codegen


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a * b + c with one rounding (`vfmadd`), as ggml's vector exp computes."""
    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.fma.f32", _F32, list(args))

    return types.float32(types.float32, types.float32, types.float32), codegen


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


@intrinsic
def iq4_nl_i8x32(typingctx, isa, nibbles):
    """32 indices 0..15 -> IQ4_NL's non-linear values: `vpshufb` on AVX2 (the 16-entry table in
    both lanes), a chain of selects elsewhere."""
    avx2 = _is_avx2(isa)

    def codegen(context, builder, signature, args):
        index = args[1]
        if avx2:
            table = ir.Constant(_V32I8, [ir.Constant(_I8, v) for v in IQ4_NL_VALUES * 2])
            return _call(builder, "llvm.x86.avx2.pshuf.b", _V32I8, [table, index])
        result = _const_vec(_V32I8, 0)
        for i, value in enumerate(IQ4_NL_VALUES):
            hit = builder.icmp_signed("==", index, _const_vec(_V32I8, i))
            result = builder.select(hit, _const_vec(_V32I8, value), result)
        return result

    return I8x32(isa, I8x32), codegen


@intrinsic
def f16_bits(typingctx, value):
    """float32 -> the bits of the nearest float16 (round half to even), as uint16."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(types.float32), codegen


# -- 512-bit vectors (AVX-512 hosts; `pairmatmul`) -----------------------------------------------
# Two tokens side by side: lanes 0..7 of a 16 x i32 / f32 belong to one token, 8..15 to the next,
# each half laid out exactly as the 8-lane vectors above.

I8x64 = Vec(types.int8, 64)
I16x32 = Vec(types.int16, 32)
I32x16 = Vec(types.int32, 16)
F32x16 = Vec(types.float32, 16)
_V64I8, _V16F32 = ir.VectorType(_I8, 64), ir.VectorType(_F32, 16)


def has_avx512_pairs() -> bool:
    """Whether this CPU runs `pairmatmul` (AVX-512 with VNNI, byte/word and 256-bit forms)."""
    return host_isa() is VNNI and all(_host_has(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))


def _load_vec(vector_type):
    @intrinsic
    def load(typingctx, array, byte_offset):
        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            return builder.load(_pointer(context, builder, signature.args[0], args[0], offset, vector_type), align=1)

        vec = {_V64I8: I8x64, _V16F32: F32x16, _V32I16: I16x32}[vector_type]
        return vec(array, types.intp), codegen

    return load


load_i8x64 = _load_vec(_V64I8)
load_f32x16 = _load_vec(_V16F32)
load_i16x32 = _load_vec(_V32I16)


def _store_vec(vector_type):
    @intrinsic
    def store(typingctx, array, byte_offset, v):
        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            builder.store(args[2], _pointer(context, builder, signature.args[0], args[0], offset, vector_type), align=1)
            return context.get_dummy_value()

        return types.void(array, types.intp, {_V32I8: I8x32, _V8I32: I32x8}[vector_type]), codegen

    return store


store_i8x32 = _store_vec(_V32I8)
store_i32x8 = _store_vec(_V8I32)


def _load_twice(vector_type):
    """Load a 256-bit vector into both halves of a 512-bit one (one `vbroadcasti64x4`): one weight
    block facing two tokens."""
    count = vector_type.count

    @intrinsic
    def load_twice(typingctx, array, byte_offset):
        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            half = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, vector_type), align=1)
            return _shuffle(builder, half, [i % count for i in range(2 * count)])

        return {_V32I8: I8x64, _V8I32: I32x16, _V16I16: I16x32}[vector_type](array, types.intp), codegen

    return load_twice


load_twice_i8x64 = _load_twice(_V32I8)
load_twice_i32x16 = _load_twice(_V8I32)
load_twice_i16x32 = _load_twice(_V16I16)


@intrinsic
def load_pair_f32x16(typingctx, array, byte_offset):
    """Two float32 a, b at `byte_offset` -> [a x8, b x8]: one scale per token of a pair."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        two = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, ir.VectorType(_F32, 2)),
                           align=1)
        return _shuffle(builder, two, [0] * 8 + [1] * 8)

    return F32x16(array, types.intp), codegen


@intrinsic
def load_f16_f32x16(typingctx, array, byte_offset):
    """16 float16 at `byte_offset`, widened."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        halves = builder.load(_pointer(context, builder, signature.args[0], args[0], offset,
                                       ir.VectorType(ir.HalfType(), 16)), align=1)
        return builder.fpext(halves, _V16F32)

    return F32x16(array, types.intp), codegen


@intrinsic
def load_twice_f16_f32x16(typingctx, array, byte_offset):
    """8 float16 at `byte_offset`, widened, in both halves: one key's 8 values facing two heads."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        halves = builder.load(_pointer(context, builder, signature.args[0], args[0], offset,
                                       ir.VectorType(ir.HalfType(), 8)), align=1)
        return builder.fpext(_shuffle(builder, halves, [i % 8 for i in range(16)]), _V16F32)

    return F32x16(array, types.intp), codegen


@intrinsic
def fmadd_f32x16(typingctx, acc, a, b):
    """acc + a * b."""
    def codegen(context, builder, signature, args):
        total, x, y = args
        return _call(builder, "llvm.fmuladd.v16f32", _V16F32, [x, y, total])

    return F32x16(F32x16, F32x16, F32x16), codegen


@intrinsic
def splat_f32x16(typingctx, value):
    def codegen(context, builder, signature, args):
        return _splat(builder, args[0], _V16F32)

    return F32x16(types.float32), codegen


@intrinsic
def add_f32x16(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return F32x16(F32x16, F32x16), codegen


@intrinsic
def store_f32x16(typingctx, array, byte_offset, v):
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        builder.store(args[2], _pointer(context, builder, signature.args[0], args[0], offset, _V16F32), align=1)
        return context.get_dummy_value()

    return types.void(array, types.intp, F32x16), codegen


def _halves_sums(builder, vectors, add):
    """Four 16-lane vectors -> [sum of each one's lanes 0..7, then of each one's lanes 8..15], each
    sum in `hsum_f32x8`'s order ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7)), by transposing adds."""
    def pick(a, b, indices):
        mask = ir.Constant(ir.VectorType(_I32, 8), [ir.Constant(_I32, i) for i in indices])
        return builder.shuffle_vector(a, b, mask)

    quads = [add(_shuffle(builder, a, [0, 1, 2, 3, 8, 9, 10, 11]), _shuffle(builder, a, [4, 5, 6, 7, 12, 13, 14, 15]))
             for a in vectors]
    pairs = [add(pick(x, y, [0, 1, 8, 9, 4, 5, 12, 13]), pick(x, y, [2, 3, 10, 11, 6, 7, 14, 15]))
             for x, y in ((quads[0], quads[1]), (quads[2], quads[3]))]
    ab, cd = pairs  # vectors 0, 1 and 2, 3 half reduced
    return add(pick(ab, cd, [0, 2, 8, 10, 4, 6, 12, 14]), pick(ab, cd, [1, 3, 9, 11, 5, 7, 13, 15]))


@intrinsic
def hsum_halves_f32x8(typingctx, a0, a1, a2, a3):
    """[hsum(low(a0)), .., hsum(low(a3)), hsum(high(a0)), .., hsum(high(a3))], bit for bit `hsum_f32x8`."""
    def codegen(context, builder, signature, args):
        return _halves_sums(builder, args, builder.fadd)

    return F32x8(F32x16, F32x16, F32x16, F32x16), codegen


@intrinsic
def hsum_halves_i32x16(typingctx, a0, a1, a2, a3):
    """[sum(low(a0)), .., sum(low(a3)), sum(high(a0)), .., sum(high(a3))]: 8 integer sums at once."""
    def codegen(context, builder, signature, args):
        return _halves_sums(builder, args, builder.add)

    return I32x8(I32x16, I32x16, I32x16, I32x16), codegen


@intrinsic
def rows_pair_scales_f32x8(typingctx, array, byte_offset, xa, xb):
    """4 float32 s0..s3 at `byte_offset` -> [s0*xa, .., s3*xa, s0*xb, .., s3*xb], each product
    rounded to float32 as the scalar product would be."""
    sig = F32x8(array, types.intp, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        four = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, ir.VectorType(_F32, 4)),
                            align=1)
        xs = builder.insert_element(ir.Constant(ir.VectorType(_F32, 2), ir.Undefined), args[2], ir.Constant(_I32, 0))
        xs = builder.insert_element(xs, args[3], ir.Constant(_I32, 1))
        return builder.fmul(_shuffle(builder, four, [0, 1, 2, 3] * 2), _shuffle(builder, xs, [0] * 4 + [1] * 4))

    return sig, codegen


def _store_quarter(first):
    @intrinsic
    def store(typingctx, array, byte_offset, v):
        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            ptr = _pointer(context, builder, signature.args[0], args[0], offset, ir.VectorType(_F32, 4))
            builder.store(_shuffle(builder, args[2], range(first, first + 4)), ptr, align=1)
            return context.get_dummy_value()

        return types.void(array, types.intp, F32x8), codegen

    return store


store_low4_f32x8 = _store_quarter(0)  # lanes 0..3 of an 8-lane vector
store_high4_f32x8 = _store_quarter(4)  # lanes 4..7


@intrinsic
def dot_u8i8_acc_i32x16(typingctx, acc, u, s):
    """`dot_u8i8_acc_i32x8` on both halves at once: one 512-bit `vpdpbusd`."""
    def codegen(context, builder, signature, args):
        total, u_v, s_v = args
        words = [builder.bitcast(u_v, _V16I32), builder.bitcast(s_v, _V16I32)]
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [total, *words])

    return I32x16(I32x16, I8x64, I8x64), codegen


@intrinsic
def dot_i16x32(typingctx, acc, a, b):
    """`dot_i16x16` on both halves at once: one 512-bit `vpdpwssd` (inline asm, as there)."""
    def codegen(context, builder, signature, args):
        total, a_v, b_v = args
        asm_type = ir.FunctionType(_V16I32, [_V16I32, _V16I32, _V16I32])
        fused = ir.InlineAsm(asm_type, "vpdpwssd $2, $1, $0", "=v,v,v,0")
        return builder.call(fused, [builder.bitcast(a_v, _V16I32), builder.bitcast(b_v, _V16I32), total])

    return I32x16(I32x16, I16x32, I16x32), codegen


@intrinsic
def dot16_u8i8_acc(typingctx, isa, acc, u, s):
    """`dot_u8i8_acc_i32x16` on any CPU: one 512-bit `vpdpbusd` where AVX-512 has it, else the
    256-bit `dot_u8i8_acc_i32x8` on each half."""
    avx2, vnni = _is_avx2(isa), _is_vnni(isa)
    sig = I32x16(isa, I32x16, I8x64, I8x64)

    def half_dot(builder, u_h, s_h):
        return _avx2_dot_unsigned(builder, u_h, s_h) if avx2 else _portable_dot(builder, u_h, s_h, True)

    def codegen(context, builder, signature, args):
        _, total, u_v, s_v = args
        return _dot16(builder, vnni, total, u_v, s_v, half_dot)

    return sig, codegen


def _dot16(builder, vnni, total, u_v, s_v, half_dot):
    """total (16 int32 lanes) + the dots of unsigned bytes u_v with signed bytes s_v, 4 bytes per
    lane: one 512-bit `vpdpbusd` where AVX-512 has it, a 256-bit one per half on AVX-VNNI, else
    `half_dot(builder, u_h, s_h)` (8 lanes' dots) per 256-bit half."""
    if vnni and has_avx512_pairs():
        words = [builder.bitcast(u_v, _V16I32), builder.bitcast(s_v, _V16I32)]
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [total, *words])
    halves = []
    for h in range(2):
        bytes_h = range(32 * h, 32 * h + 32)
        u_h, s_h = _shuffle(builder, u_v, bytes_h), _shuffle(builder, s_v, bytes_h)
        t_h = _shuffle(builder, total, range(8 * h, 8 * h + 8))
        if vnni:
            words = [builder.bitcast(u_h, _V8I32), builder.bitcast(s_h, _V8I32)]
            halves.append(_call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [t_h, *words]))
        else:
            halves.append(builder.add(t_h, half_dot(builder, u_h, s_h)))
    return _concat(builder, *halves)


@intrinsic
def nibbles_i8x64(typingctx, v, high):
    """The low (high=0) or high (high=1) nibble of each of 64 bytes, as 0..15."""
    def codegen(context, builder, signature, args):
        vec = args[0]
        if signature.args[1].literal_value:
            vec = builder.lshr(vec, _const_vec(_V64I8, 4))
        return builder.and_(vec, _const_vec(_V64I8, 0x0F))

    if not isinstance(high, types.IntegerLiteral):
        return None  # Numba then retries with the literal
    return I8x64(I8x64, high), codegen


@intrinsic
def plane_bit_i8x64(typingctx, planes, bit):
    """Bit `bit` of each of 64 bytes, moved to bit 4 (0 or 16): a Q5_0 code's fifth bit, from the
    packed layout's bit planes (`repacked.pack_q5_0`)."""
    def codegen(context, builder, signature, args):
        shifted = builder.lshr(args[0], _const_vec(_V64I8, signature.args[1].literal_value))
        return builder.shl(builder.and_(shifted, _const_vec(_V64I8, 1)), _const_vec(_V64I8, 4))

    if not isinstance(bit, types.IntegerLiteral):
        return None  # Numba then retries with the literal
    return I8x64(I8x64, bit), codegen


@intrinsic
def or_i8x64(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.or_(args[0], args[1])

    return I8x64(I8x64, I8x64), codegen


@intrinsic
def flip_sign_i8x64(typingctx, v):
    """v ^ 0x80 per byte: signed codes -128..127 as the unsigned 0..255 of code + 128."""
    def codegen(context, builder, signature, args):
        return builder.xor(args[0], _const_vec(_V64I8, -128))

    return I8x64(I8x64), codegen


def _dot16x4(summed: int):
    """`dot16x4_u8i8_acc`, adding `summed` vpmaddubsw results as int16 before each vpmaddwd on AVX2."""
    @intrinsic
    def dot(typingctx, isa, acc, u0, s0, u1, s1, u2, s2, u3, s3):
        avx2, vnni = _is_avx2(isa), _is_vnni(isa)
        sig = I32x16(isa, I32x16, I8x64, I8x64, I8x64, I8x64, I8x64, I8x64, I8x64, I8x64)

        def codegen(context, builder, signature, args):
            total, operands = args[1], args[2:]
            pairs = list(zip(operands[0::2], operands[1::2], strict=True))
            if vnni and has_avx512_pairs():
                for u_v, s_v in pairs:
                    words = [builder.bitcast(u_v, _V16I32), builder.bitcast(s_v, _V16I32)]
                    total = _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [total, *words])
                return total
            halves = [_dot16x4_half(builder, _shuffle(builder, total, range(8 * h, 8 * h + 8)),
                                    [(_shuffle(builder, u_v, range(32 * h, 32 * h + 32)),
                                      _shuffle(builder, s_v, range(32 * h, 32 * h + 32))) for u_v, s_v in pairs],
                                    avx2, vnni, summed) for h in range(2)]
            return _concat(builder, *halves)

        return sig, codegen

    return dot


def _dot16x4_half(builder, total, pairs, avx2, vnni, summed):
    """One 256-bit half: total + the dots of (unsigned, signed) byte vector pairs."""
    if vnni:
        for u_h, s_h in pairs:
            words = [builder.bitcast(u_h, _V8I32), builder.bitcast(s_h, _V8I32)]
            total = _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [total, *words])
        return total
    if not avx2:
        for u_h, s_h in pairs:
            total = builder.add(total, _portable_dot(builder, u_h, s_h, True))
        return total
    for first in range(0, len(pairs), summed):
        words = None
        for u_h, s_h in pairs[first:first + summed]:
            w = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u_h, s_h])
            words = w if words is None else builder.add(words, w)
        total = builder.add(total, _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [words, _const_vec(_V16I16, 1)]))
    return total


# acc + the four `dot16_u8i8_acc` products, for unsigned bytes u <= 31 and |s| <= 127. On AVX2 the
# four `vpmaddubsw` results are added as int16 (at most 4 x 2 x 31 x 127 = 31496, no overflow)
# before one `vpmaddwd`: 9 instructions per half instead of 12. VNNI chains four `vpdpbusd`.
dot16x4_u8i8_acc = _dot16x4(4)
# ... for u <= 63 (Q6_K's codes): two at a time (2 x 2 x 63 x 127 = 32004)
dot16x4_u6i8_acc = _dot16x4(2)


@intrinsic
def splat_u32_i8x64(typingctx, array, byte_offset):
    """The 4 bytes at `byte_offset`, repeated 16 times: 4 activation values facing 16 weight rows."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        word = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _I32), align=1)
        return builder.bitcast(_splat(builder, word, _V16I32), _V64I8)

    return I8x64(array, types.intp), codegen


@intrinsic
def splat_i32x16(typingctx, value):
    def codegen(context, builder, signature, args):
        return _splat(builder, context.cast(builder, args[0], signature.args[0], types.int32), _V16I32)

    return I32x16(value), codegen


zero_i32x16 = _zero(I32x16)


@intrinsic
def scale_f32x16(typingctx, v, factor):
    """v * factor, each product rounded to float32 as the scalar product would be."""
    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], _splat(builder, args[1], _V16F32))

    return F32x16(F32x16, types.float32), codegen


@intrinsic
def fma_f32x16(typingctx, acc, v, scale):
    """acc + float(v) * scale, lane by lane, rounded once (`vfmadd`) on every CPU."""
    def codegen(context, builder, signature, args):
        total, ints, factors = args
        return _call(builder, "llvm.fma.v16f32", _V16F32, [builder.sitofp(ints, _V16F32), factors, total])

    return F32x16(F32x16, I32x16, F32x16), codegen


zero_f32x16 = _zero(F32x16)


def _half(first):
    @intrinsic
    def half(typingctx, v):
        def codegen(context, builder, signature, args):
            return _shuffle(builder, args[0], range(first, first + 8))

        return F32x8(F32x16), codegen

    return half


low_f32x8 = _half(0)  # lanes 0..7: the first token's share
high_f32x8 = _half(8)  # lanes 8..15: the second's


# -- 8 x f64: RMSNorm's sum of squares in numpy's pairwise order ---------------------------------

F64x8 = Vec(types.float64, 8)
_V8F64 = ir.VectorType(ir.DoubleType(), 8)


@intrinsic
def squares_f64x8(typingctx, array, byte_offset):
    """8 float32 at `byte_offset`, each widened to float64 and squared (exact in float64)."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        wide = builder.fpext(builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V8F32),
                                          align=1), _V8F64)
        return builder.fmul(wide, wide)

    return F64x8(array, types.intp), codegen


zero_f64x8 = _zero(F64x8)


@intrinsic
def add_f64x8(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return F64x8(F64x8, F64x8), codegen


@intrinsic
def lane_f64x8(typingctx, v, i):
    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], args[1])

    return types.float64(F64x8, types.int64), codegen


# -- activation quantization (Q8_0 / Q8_K) on 8 lanes ----------------------------------------------


@intrinsic
def max_abs_f32x8(typingctx, top, v):
    """Lane-wise max(top, |v|); a NaN in v leaves top (as a scalar `if |v| > top` scan does)."""
    def codegen(context, builder, signature, args):
        mag = _call(builder, "llvm.fabs.v8f32", _V8F32, [args[1]])
        return builder.select(builder.fcmp_ordered(">", mag, args[0]), mag, args[0])

    return F32x8(F32x8, F32x8), codegen


@intrinsic
def round_codes_i32x8(typingctx, v, factor, top):
    """min(top, rint(v * factor)) as int32 on each lane (np.rint: halves to even)."""
    def codegen(context, builder, signature, args):
        scaled = builder.fmul(args[0], _splat(builder, args[1], _V8F32))
        ints = builder.fptosi(_call(builder, "llvm.rint.v8f32", _V8F32, [scaled]), _V8I32)
        cap = _splat(builder, args[2], _V8I32)
        return builder.select(builder.icmp_signed("<", ints, cap), ints, cap)

    return I32x8(F32x8, types.float32, types.int32), codegen


@intrinsic
def store_i8x8(typingctx, array, byte_offset, v):
    """The low byte of each of 8 int32 lanes, 8 bytes at `byte_offset`."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = _pointer(context, builder, signature.args[0], args[0], offset, ir.VectorType(_I8, 8))
        builder.store(builder.trunc(args[2], ir.VectorType(_I8, 8)), ptr, align=1)
        return context.get_dummy_value()

    return types.void(array, types.intp, I32x8), codegen


@intrinsic
def gelu_table_f32x16(typingctx, table, v):
    """16 lanes of ggml's GELU: table[float16 bits of v] (one gather), 0 where v <= -10, v where v >= 10."""
    def codegen(context, builder, signature, args):
        data = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0]).data
        x = args[1]
        bits = builder.bitcast(builder.fptrunc(x, ir.VectorType(ir.HalfType(), 16)), ir.VectorType(_I16, 16))
        i64x16 = ir.VectorType(ir.IntType(64), 16)
        offsets = builder.mul(builder.zext(bits, i64x16), _const_vec(i64x16, 4))  # float32 entries
        addresses = builder.add(_splat(builder, builder.ptrtoint(data, ir.IntType(64)), i64x16), offsets)
        ptrs = builder.inttoptr(addresses, ir.VectorType(data.type, 16))
        true = ir.Constant(ir.VectorType(ir.IntType(1), 16), [ir.Constant(ir.IntType(1), 1)] * 16)
        looked = _call(builder, "llvm.masked.gather.v16f32.v16p0", _V16F32,
                       [ptrs, ir.Constant(_I32, 4), true, ir.Constant(_V16F32, ir.Undefined)])
        low = builder.fcmp_ordered("<=", x, _const_vec(_V16F32, -10.0))
        high = builder.fcmp_ordered(">=", x, _const_vec(_V16F32, 10.0))
        return builder.select(low, _const_vec(_V16F32, 0.0), builder.select(high, x, looked))

    return F32x16(table, F32x16), codegen


@intrinsic
def mul_f32x16(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1])

    return F32x16(F32x16, F32x16), codegen


# -- 16-row packed k-quants (`kpacked`) ------------------------------------------------------------


def _load_widened(count, to_type, bits, signed):
    @intrinsic
    def load(typingctx, array, byte_offset):
        def codegen(context, builder, signature, args):
            offset = context.cast(builder, args[1], signature.args[1], types.intp)
            raw = builder.load(_pointer(context, builder, signature.args[0], args[0], offset,
                                        ir.VectorType(_I8, count)), align=1)
            wide = ir.VectorType(ir.IntType(bits), count)
            return builder.sext(raw, wide) if signed else builder.zext(raw, wide)

        return to_type(array, types.intp), codegen

    return load


load_u8_i32x16 = _load_widened(16, I32x16, 32, signed=False)  # 16 bytes, each widened to int32
load_u8_i16x32 = _load_widened(32, I16x32, 16, signed=False)  # 32 bytes, each widened to int16
load_i8_i16x32 = _load_widened(32, I16x32, 16, signed=True)


@intrinsic
def madd_i16x32(typingctx, a, b):
    """Lane i: a[2i] * b[2i] + a[2i + 1] * b[2i + 1] in int32 (`vpmaddwd`; LLVM matches the IR)."""
    def codegen(context, builder, signature, args):
        wide = ir.VectorType(_I32, 32)
        products = builder.mul(builder.sext(args[0], wide), builder.sext(args[1], wide))
        return builder.add(_shuffle(builder, products, range(0, 32, 2)), _shuffle(builder, products, range(1, 32, 2)))

    return I32x16(I16x32, I16x32), codegen


zero_i16x32 = _zero(I16x32)


@intrinsic
def madd_u8i8_acc_i16x32(typingctx, isa, acc, u, s):
    """acc + the pair sums u[2i] * s[2i] + u[2i + 1] * s[2i + 1] in int16 (`vpmaddubsw`, then
    `vpaddw`), for unsigned u and signed s whose sums stay within int16 (the caller's bound)."""
    avx2 = _is_avx2(isa)

    def codegen(context, builder, signature, args):
        _, total, u_v, s_v = args
        if not avx2:
            wide = ir.VectorType(_I16, 64)
            products = builder.mul(builder.zext(u_v, wide), builder.sext(s_v, wide))
            evens, odds = _shuffle(builder, products, range(0, 64, 2)), _shuffle(builder, products, range(1, 64, 2))
            return builder.add(total, builder.add(evens, odds))
        halves = [builder.add(_shuffle(builder, total, range(16 * h, 16 * h + 16)),
                              _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16,
                                    [_shuffle(builder, u_v, range(32 * h, 32 * h + 32)),
                                     _shuffle(builder, s_v, range(32 * h, 32 * h + 32))])) for h in range(2)]
        return _concat(builder, *halves)

    return I16x32(isa, I16x32, I8x64, I8x64), codegen


@intrinsic
def load_u8_twice_i16x32(typingctx, array, byte_offset):
    """16 bytes at `byte_offset` (one per row), each as int16 twice: lane r = (b[r], b[r]), so
    that `madd_i16x32` multiplies both of a lane's words by its row's byte."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        raw = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V16I8), align=1)
        return builder.zext(_shuffle(builder, raw, [i // 2 for i in range(32)]), _V32I16)

    return I16x32(array, types.intp), codegen


@intrinsic
def splat_pair_i16x32(typingctx, first, second):
    """(first, second) as int16, repeated 16 times: one pair of activation sums facing 16 rows."""
    def codegen(context, builder, signature, args):
        def low16(i):
            value = context.cast(builder, args[i], signature.args[i], types.int32)
            return builder.zext(builder.trunc(value, _I16), _I32)

        word = builder.or_(low16(0), builder.shl(low16(1), ir.Constant(_I32, 16)))
        return builder.bitcast(_splat(builder, word, _V16I32), _V32I16)

    return I16x32(first, second), codegen


@intrinsic
def mul_i32x16(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.mul(args[0], args[1])

    return I32x16(I32x16, I32x16), codegen


@intrinsic
def add_i32x16(typingctx, a, b):
    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return I32x16(I32x16, I32x16), codegen


@intrinsic
def neg_f32x16(typingctx, v):
    def codegen(context, builder, signature, args):
        return builder.fneg(args[0])

    return F32x16(F32x16), codegen


@intrinsic
def two_bits_i8x64(typingctx, planes, quarter):
    """Bits 2q, 2q + 1 of each of 64 bytes, moved to bits 4-5 (0, 16, 32 or 48): a Q6_K code's high
    bits for quarter q from its qh bytes. (q is a constant wherever the kernels are unrolled.)"""
    def codegen(context, builder, signature, args):
        shift = builder.trunc(builder.mul(context.cast(builder, args[1], signature.args[1], types.int32),
                                          ir.Constant(_I32, 2)), _I8)
        shifted = builder.lshr(args[0], _splat(builder, shift, _V64I8))
        return builder.shl(builder.and_(shifted, _const_vec(_V64I8, 3)), _const_vec(_V64I8, 4))

    return I8x64(I8x64, quarter), codegen


@intrinsic
def load_pair_i8_i32x16(typingctx, array, byte_offset, which):
    """From 16 (first, second) signed byte pairs at `byte_offset`, the firsts (which=0) or the
    seconds (1), each widened to int32."""
    def codegen(context, builder, signature, args):
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        raw = builder.load(_pointer(context, builder, signature.args[0], args[0], offset, _V32I8), align=1)
        picked = _shuffle(builder, raw, range(signature.args[2].literal_value, 32, 2))
        return builder.sext(picked, _V16I32)

    if not isinstance(which, types.IntegerLiteral):
        return None
    return I32x16(array, types.intp, which), codegen


@intrinsic
def dot16_q8_acc(typingctx, isa, acc, w, x):
    """acc + the 16 rows' dots of signed weight bytes w with 4 activation bytes splat in x (16
    lanes of 4 values). AVX2 (VNNI hosts too): |w| times x with w's sign (`vpsignb`,
    `vpmaddubsw`, `vpmaddwd`); portable: plain vector IR. (VNNI's `vpdpbusd` needs one operand
    unsigned: `repacked.repacked_q8_0_vnni` flips the weights' signs instead.)"""
    avx2 = _is_avx2(isa)
    sig = I32x16(isa, I32x16, I8x64, I8x64)

    def half_dot(builder, x_h, w_h):
        if not avx2:
            return _portable_dot(builder, w_h, x_h, a_unsigned=False)
        abs_w = _call(builder, "llvm.abs.v32i8", _V32I8, [w_h, ir.Constant(ir.IntType(1), 0)])
        signed_x = _call(builder, "llvm.x86.avx2.psign.b", _V32I8, [x_h, w_h])
        return _avx2_dot_unsigned(builder, abs_w, signed_x)

    def codegen(context, builder, signature, args):
        _, total, w_v, x_v = args
        return _dot16(builder, False, total, x_v, w_v, half_dot)

    return sig, codegen
