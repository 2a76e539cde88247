"""CPU kernels: every weight type against the float64 emulation, on both instruction sets."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import llvmlite.binding as llvm
import numba
import numpy as np
import pytest

from llmx.quant import activations as reference_activations
from llmx.quant.cpu import activations, kpacked, lanematmul, linear, pairmatmul, repacked, simd
from llmx.quant.cpu import matmul as kernels
from llmx.quant.cpu.linear import SUPPORTED, matmul
from llmx.quant.formats import dequantize, quantize
from llmx.quant.qtypes import QType
from llmx.quant.reference import matmul_reference, quantized_activations, repacked_q4_0_reference

TYPES = sorted(SUPPORTED, key=int)
ISAS = {"portable": simd.PORTABLE, **({"avx2": simd.AVX2} if simd.has_avx2() else {}),
        **({"vnni": simd.VNNI} if simd.host_isa() is simd.VNNI else {})}
M, K = 37, 512  # 37 rows: a group of four is left incomplete


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((M, K)).astype(np.float32)


@pytest.mark.parametrize("isa", list(ISAS), ids=str)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_matmul_matches_emulation(weights, qtype, isa):
    rng = np.random.default_rng(int(qtype))
    w = quantize(weights, qtype)
    for n_tok in (1, 3, 16):
        x = rng.standard_normal((n_tok, K)).astype(np.float32)
        expected = matmul_reference(x, w, qtype)
        for threads in (1, 2):
            out = matmul(x, w, qtype, threads=threads, isa=ISAS[isa])
            assert out.shape == (n_tok, M) and out.dtype == np.float32
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


K_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


@pytest.mark.parametrize("isa", list(ISAS), ids=str)
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_quant_decode_once_equals_one_token_kernel_bit_for_bit(weights, qtype, isa):
    """Several tokens go through `kmatmul` (rows decoded once); each output must be the float the
    one-token kernel gives for that token alone, so prefill and decode agree exactly."""
    w = quantize(weights, qtype)
    x = np.random.default_rng(11).standard_normal((5, K)).astype(np.float32) * 3
    batched = matmul(x, w, qtype, threads=2, isa=ISAS[isa])  # 5 tokens: pairs and a lone last token
    one_by_one = np.concatenate([matmul(x[t:t + 1], w, qtype, threads=2, isa=ISAS[isa]) for t in range(5)])
    np.testing.assert_array_equal(batched, one_by_one)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_vnni_and_avx2_kernels_give_the_same_bits(weights, qtype):
    """The VNNI kernels reach the same integers by other routes (Q8_0 dots x + 128, Q4_0/Q5_0 the
    stored codes, each minus a bias) and then take the same float steps: outputs must be equal."""
    if not simd.has_avx2():
        pytest.fail("this test needs an x86 host with AVX2")
    w = quantize(weights, qtype)
    for n_tok in (1, 5):
        x = np.random.default_rng(n_tok).standard_normal((n_tok, K)).astype(np.float32)
        assert np.array_equal(matmul(x, w, qtype, isa=simd.host_isa()), matmul(x, w, qtype, isa=simd.AVX2))


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q5_0, *K_TYPES], ids=lambda q: q.name)
def test_avx512_pair_kernels_equal_256_bit_kernels_bit_for_bit(weights, qtype, monkeypatch):
    """Two tokens per 512-bit register (`pairmatmul`, `kmatmul.pair_kmatmul_*`), odd token counts
    padded, and for Q8_0/Q4_0/Q5_0 16 tokens per register (`lanematmul`) for whole groups of 16:
    the same bits as the 256-bit VNNI kernels, token by token. Hosts without AVX-512 run the
    256-bit kernels both times (and must still agree). Rows of 2 x K values: long enough for `lanematmul`."""
    w = quantize(np.tile(weights, 2), qtype)
    assert 2 * K >= linear.TOKEN_LANES_MIN_K
    for n_tok in (2, 3, 4, 7, 16, 133):  # 133: 8 groups of 16 and 5 in pairs; more than one block of pairs
        x = np.random.default_rng(n_tok).standard_normal((n_tok, 2 * K)).astype(np.float32) * 3
        paired = matmul(x, w, qtype)
        monkeypatch.setattr(linear, "PAIRED_MIN_TOKENS", 10**9)
        monkeypatch.setattr(linear, "PAIRED_K_MIN_TOKENS", 10**9)
        assert np.array_equal(paired, matmul(x, w, qtype)), n_tok
        monkeypatch.undo()


def test_activation_layouts_read_by_512_bit_loads_start_on_a_cache_line():
    """The pair and token-lane layouts are read 64 bytes at a time; from a buffer that starts 16, 32 or
    48 bytes past a cache line every such load reads two lines (~10% slower at 16 tokens, measured).
    Numba aligns its arrays to 32 bytes and numpy to 16, so whether they start on a line is chance."""
    rng = np.random.default_rng(3)
    for n_tok in (1, 16, 33):
        for attempt in range(8):  # fresh allocations: each lands wherever the allocator puts it
            codes = rng.integers(-127, 128, (n_tok, 1024)).astype(np.int8)
            scales = rng.random((n_tok, 32)).astype(np.float32)
            xt, xd = lanematmul.token_lanes(codes, scales)
            layouts = [xt, xd, pairmatmul.q8_0_pairs(codes), pairmatmul.q8_k_pairs(codes),
                       pairmatmul.pair_layout(scales.reshape(n_tok, 32, 1)),
                       simd.np_line_aligned_empty(n_tok + attempt, np.int16)]
            assert [a.ctypes.data % simd.LINE for a in layouts] == [0] * len(layouts), (n_tok, attempt)
    x = rng.standard_normal((3, 64)).astype(np.float32)  # pair_layout's values: tokens 2p, 2p + 1 side by side
    pairs = pairmatmul.pair_layout(x.reshape(3, 2, 32)).reshape(2, 2, 2, 32)
    assert np.array_equal(pairs[0, :, 0], x[0].reshape(2, 32)) and np.array_equal(pairs[1, :, 0], x[2].reshape(2, 32))
    assert np.array_equal(pairs[0, :, 1], x[1].reshape(2, 32)) and not pairs[1, :, 1].any()


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q5_0], ids=lambda q: q.name)
def test_token_lanes_over_many_row_groups_equal_256_bit_kernels_bit_for_bit(qtype, monkeypatch):
    """`lanematmul` decodes each group of 4 rows while the group before it computes: with 1029 rows
    each of its chunks walks several groups (the last one part full), and every decoded row must be
    where the next group reads it. 16 tokens, and 35 (two groups of 16, the rest in pairs)."""
    rng = np.random.default_rng(5)
    k = linear.TOKEN_LANES_MIN_K
    w = quantize(rng.standard_normal((1029, k)).astype(np.float32), qtype)
    for n_tok in (16, 35):
        x = rng.standard_normal((n_tok, k)).astype(np.float32) * 3
        lanes = matmul(x, w, qtype)
        monkeypatch.setattr(linear, "PAIRED_MIN_TOKENS", 10**9)
        assert np.array_equal(lanes, matmul(x, w, qtype)), n_tok
        monkeypatch.undo()


@pytest.mark.parametrize("isa", list(ISAS), ids=str)
def test_repacked_q4_0_takes_llama_cpps_repacked_float_order_bit_for_bit(isa):
    """Q4_0 weights packed as llama.cpp's loader repacks them: every output the float that
    `ggml_gemm_q4_0_8x8_q8_0`'s steps give, for one token, a tile of four and the rest; 40 rows
    leave the last group of 16 half full."""
    rng = np.random.default_rng(8)
    for m in (40, 296):
        w = quantize(rng.standard_normal((m, K)).astype(np.float32), QType.Q4_0)
        packed = linear.pack(w, QType.Q4_0)
        for n_tok in (1, 3, 4, 6, 16):
            x = rng.standard_normal((n_tok, K)).astype(np.float32) * 3
            for threads in (1, 2):
                out = matmul(x, w, QType.Q4_0, threads=threads, isa=ISAS[isa], packed=packed)
                assert np.array_equal(out, repacked_q4_0_reference(x, w)), (m, n_tok, threads)


@pytest.mark.parametrize("isa", list(ISAS), ids=str)
@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q5_0, QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_packed_weights_match_emulation_and_each_token_alone(qtype, isa):
    """Q8_0 (signed codes: made unsigned by + 128 on VNNI, vpsignb on AVX2), Q5_0 packed with bit planes for the
    fifth bits, Q4_K and Q6_K with their scales unpacked: each
    output within float32 rounding of the float64 emulation, and the same bits for a token in a
    tile of four as alone (batch invariance). 37 and 40 rows leave the last group of 16 part full."""
    rng = np.random.default_rng(9)
    for m in (37, 40, 296):
        w = quantize(rng.standard_normal((m, K)).astype(np.float32), qtype)
        packed = linear.pack(w, qtype)
        for n_tok in (1, 6, 16):
            x = rng.standard_normal((n_tok, K)).astype(np.float32) * 3
            expected = matmul_reference(x, w, qtype)
            for threads in (1, 2):
                out = matmul(x, w, qtype, threads=threads, isa=ISAS[isa], packed=packed)
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
                alone = [matmul(x[t:t + 1], w, qtype, threads=threads, isa=ISAS[isa], packed=packed)
                         for t in range(n_tok)]
                assert np.array_equal(out, np.concatenate(alone)), (m, n_tok, threads)


def test_packed_q8_0_gives_the_same_bits_on_every_isa():
    """The Q8_0 kernels' block dots are exact integers on every ISA (VNNI dots the weights + 128 and
    takes 128 x the activations' sums back), weights of -128 included, and their float steps are
    the same, so a tied output layer's logits do not depend on the instruction set, and a token's
    do not depend on the tile it is in."""
    rng = np.random.default_rng(10)
    w = quantize(rng.standard_normal((40, K)).astype(np.float32), QType.Q8_0)
    codes = w.view(np.uint8).reshape(40, K // 32, 34)[:, :, 2:]  # llama.cpp's quantizer stops at -127;
    codes[rng.random(codes.shape) < 0.05] = 0x80  # a file may hold -128, which AVX2's |w| must take
    packed = linear.pack(w, QType.Q8_0)
    for n_tok in (1, 6, 13):
        x = rng.standard_normal((n_tok, K)).astype(np.float32) * 3
        outs = [matmul(x, w, QType.Q8_0, isa=isa, packed=packed) for isa in ISAS.values()]
        if "vnni" in ISAS:  # AVX-VNNI's kernel (tiles of four), which AVX-512 hosts pass over for tiles of eight
            codes, scales = activations.quantize_q8_0(x)
            out = np.empty((n_tok, len(w)), np.float32)
            repacked.repacked_q8_0_vnni(codes.reshape(-1), scales.reshape(-1), packed, K // 32, len(w), n_tok, out,
                                        ISAS["vnni"])
            outs.append(out)
        assert all(np.array_equal(outs[0], out) for out in outs[1:]), n_tok
        alone = np.concatenate([matmul(x[t:t + 1], w, QType.Q8_0, packed=packed) for t in range(n_tok)])
        assert np.array_equal(outs[0], alone), n_tok
        np.testing.assert_allclose(outs[0], matmul_reference(x, w, QType.Q8_0), rtol=1e-5,
                                   atol=1e-5 * np.abs(outs[0]).max())


def test_packed_q4_k_gives_the_same_bits_on_every_isa_at_the_extreme_codes():
    """AVX2's Q4_K kernel adds a sub-block's eight byte-pair sums as int16 before scaling them:
    with every weight code 15 and every activation code -127 (Q8_K's codes stop there) they reach
    -30480, the most they can. Each ISA's kernel (VNNI's int32 dots, the portable IR) gives the
    same bits, each token the same alone as in a tile of four, and all match the float64
    emulation."""
    rng = np.random.default_rng(11)
    w = quantize(rng.standard_normal((40, K)).astype(np.float32), QType.Q4_K)
    w.view(np.uint8).reshape(40, K // 256, 144)[:, :, 16:] = 0xFF  # every code 15 (after d, dmin, scales)
    packed = linear.pack(w, QType.Q4_K)
    x = -np.abs(rng.standard_normal((6, K))).astype(np.float32)
    x[::2] = -4.0  # tokens 0, 2, 4: every activation code -127
    assert (linear.quantize_activations(x, QType.Q4_K)[0][::2] == -127).all()
    for n_tok in (1, 6):
        outs = [matmul(x[:n_tok], w, QType.Q4_K, isa=isa, packed=packed) for isa in ISAS.values()]
        assert all(np.array_equal(outs[0], out) for out in outs[1:]), n_tok
        for isa, out in zip(ISAS.values(), outs, strict=True):
            alone = [matmul(x[t:t + 1], w, QType.Q4_K, isa=isa, packed=packed) for t in range(n_tok)]
            assert np.array_equal(out, np.concatenate(alone)), n_tok
        codes, scales, sums = linear.quantize_activations(x[:n_tok], QType.Q4_K)
        words = np.empty((n_tok, len(w)), np.float32)  # AVX2's kernel as portable IR
        kpacked.packed_q4_k_words(codes.reshape(-1), scales.reshape(-1), sums.reshape(-1), packed, K // 256, len(w),
                                  n_tok, words, simd.PORTABLE)
        assert np.array_equal(outs[0], words), n_tok
        expected = matmul_reference(x[:n_tok], w, QType.Q4_K)
        np.testing.assert_allclose(outs[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_only_q4_0_as_llama_cpp_repacks_it_and_q8_0_q5_0_q4_k_q6_k_are_packed(weights):
    """Q4_0 with a multiple of 8 rows, not M = 37 rows; Q8_0, Q5_0, Q4_K and Q6_K with any rows;
    no other type. A packed Q8_0 table gives its rows back as stored (a tied embedding is read so)."""
    assert linear.pack(quantize(weights[:32], QType.Q4_0), QType.Q4_0) is not None
    assert linear.pack(quantize(weights, QType.Q4_0), QType.Q4_0) is None
    for qtype in (QType.Q8_0, QType.Q5_0, QType.Q4_K, QType.Q6_K):
        assert linear.pack(quantize(weights, qtype), qtype) is not None
    stored = quantize(weights, QType.Q8_0)
    rows = np.array([36, 0, 17, 17, 5])
    assert np.array_equal(repacked.q8_0_rows(linear.pack(stored, QType.Q8_0), rows, K // 32), stored[rows])
    for qtype in (QType.Q5_K, QType.F16):
        assert linear.pack(quantize(weights[:32], qtype), qtype) is None


def test_activations_quantized_once_serve_every_weight_of_their_kind(weights):
    """Q5_0 and Q8_0 weights both take Q8_0 activations: one quantization serves both calls."""
    x = np.random.default_rng(3).standard_normal((20, K)).astype(np.float32)
    assert linear.activation_quantizer(QType.Q5_0) is linear.activation_quantizer(QType.Q8_0)
    assert linear.activation_quantizer(QType.F16) is None
    shared = linear.quantize_activations(x, QType.Q5_0)
    for qtype in (QType.Q5_0, QType.Q8_0):
        w = quantize(weights, qtype)
        assert np.array_equal(matmul(x, w, qtype, quantized=shared), matmul(x, w, qtype))


def test_avx512_pair_kernels_run_where_the_cpu_has_avx512():
    features = llvm.get_host_cpu_features()
    expected = simd.host_isa() is simd.VNNI and all(
        features.get(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
    assert simd.has_avx512_pairs() == expected


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_matmul_within_activation_quantization_bound(weights, qtype):
    x = np.random.default_rng(5).standard_normal((3, K)).astype(np.float32)
    w = quantize(weights, qtype)
    dense = dequantize(w, qtype).astype(np.float64)  # [M, K]
    exact = x.astype(np.float64) @ dense.T
    # Each output can be off by at most sum_k |W[r, k]| * |x[k] - quantized x[k]|.
    bound = np.abs(x - quantized_activations(x, qtype)) @ np.abs(dense).T
    err = np.abs(matmul(x, w, qtype) - exact)
    assert np.all(err <= bound * 1.001 + 1e-4 * np.abs(exact).max())


def test_activation_quantizers_match_reference():
    x = (np.random.default_rng(6).standard_normal((5, 1024)) * 4).astype(np.float32)
    x[0, :32] = 0
    x[1, 256:512] = 0
    x[2, 300], x[2, 400] = -20, 20  # two values of the largest magnitude: the first one's sign counts
    x[3, 40:44] = [0.5, 1.5, -2.5, 127]  # scaled by exactly 1: halves round to even
    for name in ("quantize_q8_0", "quantize_q8_1", "quantize_q8_k"):
        ours = getattr(activations, name)(x)
        expected = getattr(reference_activations, name)(x)
        assert all(np.array_equal(a, b) for a, b in zip(ours, expected, strict=True)), name



def test_single_thread_quantizers_write_what_the_parallel_ones_return_even_for_inf_and_nan():
    """`quantize_q8_0_into` / `quantize_q8_k_into` (one-row decode steps) against the parallel
    quantizers: the same codes, scales and sums; rows of inf and NaN (a broken model's
    activations) give the same values, not a ZeroDivisionError."""
    x = (np.random.default_rng(7).standard_normal((4, 512)) * 4).astype(np.float32)
    x[1, 7], x[2, 300], x[3, 3] = np.inf, -np.inf, np.nan
    k = x.shape[1]
    for parallel, into, shapes in ((activations.quantize_q8_0, activations.quantize_q8_0_into, (k // 32,)),
                                   (activations.quantize_q8_k, activations.quantize_q8_k_into, (k // 256, k // 16))):
        expected = parallel(x)
        out = (np.empty((4, k), np.int8), np.empty((4, shapes[0]), np.float32),
               *[np.empty((4, n), np.int32) for n in shapes[1:]])
        with np.errstate(all="ignore"):
            into(x, *out)
        assert np.isinf(expected[1][1:3]).any() or np.isnan(expected[1][1:4]).any()  # the rows did overflow
        assert all(np.array_equal(a, b, equal_nan=a.dtype.kind == "f") for a, b in zip(out, expected, strict=True))

def test_avx2_build_uses_pmaddubsw():
    if not simd.has_avx2():
        assert platform.machine().lower() not in ("x86_64", "amd64"), "x86-64 host without AVX2+FMA?"
        return
    # Cached code cannot be inspected, so compile a fresh, uncached copy of one kernel.
    fresh = numba.njit(kernels.matmul_q4_k.py_func)
    w = quantize(np.ones((4, 256), np.float32), QType.Q4_K)
    codes, scales, sums = activations.quantize_q8_k(np.ones((1, 256), np.float32))
    out = np.empty((1, 4), np.float32)
    fresh(codes.reshape(-1), scales, sums, w.reshape(-1), w.shape[1], 4, out, simd.AVX2)
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert "vpmaddubsw" in asm


def test_host_isa_follows_cpu_features_and_vnni_builds_use_vpdpbusd():
    import llvmlite.binding as llvm

    f = llvm.get_host_cpu_features()
    avx2 = bool(f.get("avx2") and f.get("fma"))
    vnni = avx2 and bool(f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")))
    assert simd.host_isa() is (simd.VNNI if vnni else simd.AVX2 if avx2 else simd.PORTABLE)
    if not vnni:
        return  # the VNNI kernels cannot be built for this CPU; the AVX2 ones are checked above
    fresh = numba.njit(kernels.matmul_q8_0.py_func)
    w = quantize(np.ones((4, 32), np.float32), QType.Q8_0)
    codes, scales = activations.quantize_q8_0(np.ones((1, 32), np.float32))
    out = np.empty((1, 4), np.float32)
    fresh(codes.reshape(-1), scales, np.zeros((1, 1), np.float32), w.reshape(-1), w.shape[1], 4, out, simd.VNNI)
    assert "vpdpbusd" in fresh.inspect_asm(fresh.signatures[0])
    assert out[0, 0] == pytest.approx(32.0, rel=1e-2)


CACHE_PROBE = textwrap.dedent("""
    import json, time
    start = time.perf_counter()
    import numpy as np
    from llmx.quant.cpu import activations, dequantize, kmatmul, lanematmul, matmul as kernels, pairmatmul, repacked
    from llmx.quant.cpu import simd
    from llmx.quant.cpu.linear import SUPPORTED, matmul, pack
    from llmx.quant.formats import quantize
    from llmx.quant.qtypes import QType
    isas = [simd.PORTABLE] + ([simd.host_isa()] if simd.has_avx2() else [])
    for qtype in SUPPORTED:
        w = quantize(np.ones((8, 1024), np.float32), qtype)
        dequantize.dequantize(w, qtype)
        for isa in isas:
            for n_tok in (1, 2, 4, 16):  # one token, and several (decode-once, pair and token-lane kernels)
                for packed in (None, pack(w, qtype)):  # as stored, and packed (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K)
                    matmul(np.ones((n_tok, 1024), np.float32), w, qtype, isa=isa, packed=packed)
    modules = (kernels, kmatmul, pairmatmul, lanematmul, repacked, activations, dequantize)
    dispatchers = [f for mod in modules for f in vars(mod).values()
                   if hasattr(f, "stats") and hasattr(f, "py_func")]
    misses = {d.py_func.__name__: sum(d.stats.cache_misses.values()) for d in dispatchers}
    hits = sum(sum(d.stats.cache_hits.values()) for d in dispatchers)
    print(json.dumps({"misses": {k: v for k, v in misses.items() if v}, "hits": hits,
                      "seconds": time.perf_counter() - start}))
""")


def test_second_process_loads_every_kernel_from_cache():
    def probe():
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    probe()  # compiles whatever an earlier test or run has not
    second = probe()
    assert second["misses"] == {}
    assert second["hits"] > 0
    assert second["seconds"] < 3.0
