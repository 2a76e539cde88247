"""The CUDA backend's kernels against numpy references, and a tiny model's forward on the device
against the CPU backend and llama.cpp. Here they run on numba's CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM=1), where every thread is a Python thread: shapes are small. On a GPU,
`NUMBA_ENABLE_CUDASIM=0 pytest -m cuda` runs the same tests on the device."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS_DIR, needs_reference

from llmx.engine.kv_cache import KVCache
from llmx.quant.formats import dequantize, quantize
from llmx.quant.qtypes import QType

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install -e '.[dev]')")
from llmx.quant.cuda import attention, device, elementwise  # noqa: E402
from llmx.quant.cuda.linear import TILED_MIN_TOKENS, TOKENS, DeviceMatrix, matmul  # noqa: E402

pytestmark = pytest.mark.cuda
WEIGHT_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
                QType.IQ4_NL, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


@pytest.fixture
def wide_launches(monkeypatch):
    """Several threads per block and blocks that stride: the shared-memory reductions and the
    grid-stride loops run as they do on a device (the simulator's default is one thread)."""
    monkeypatch.setattr(device, "THREADS", 4 if device.SIMULATED else device.THREADS)
    monkeypatch.setattr(device, "MAX_BLOCKS", 3)


def host(x) -> np.ndarray:
    return x.copy_to_host()


@cuda.jit
def _halves(x, bits, lo, hi, values):
    """bits[i] = f16_bits(x[i]); values[i] = f16_value(lo[i], hi[i]) (device functions: run in a kernel)."""
    for i in range(cuda.grid(1), max(x.size, lo.size), cuda.gridsize(1)):
        if i < x.size:
            bits[i] = device.f16_bits(x[i])
        if i < lo.size:
            values[i] = device.f16_value(lo[i], hi[i])


def test_half_conversions_round_like_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 6, 3000)).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, 65504, 65520, 65519.99, 2.98e-8, 3e-8, np.inf, -np.inf])])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    halves = np.arange(0, 65536, 7, dtype=np.uint16)
    got_bits, values = cuda.device_array(x.size, np.uint16), cuda.device_array(halves.size, np.float32)
    lo, hi = (halves & 0xFF).astype(np.uint8), (halves >> 8).astype(np.uint8)
    _halves[device.launch_flat(halves.size)](cuda.to_device(x), got_bits, cuda.to_device(lo), cuda.to_device(hi),
                                             values)
    assert np.array_equal(host(got_bits), expected)
    values = host(values)
    reference = halves.view(np.float16).astype(np.float32)
    finite = np.isfinite(reference)
    assert np.array_equal(values[finite], reference[finite]) and np.isnan(values[np.isnan(reference)]).all()


def check_matmul(qtype: QType, m: int, k: int, n: int, seed: int) -> None:
    """`matmul` against float64 products of the numpy reference's dequantized weights, with a bias."""
    rng = np.random.default_rng(seed)
    raw = quantize(rng.standard_normal((m, k)).astype(np.float32), qtype).reshape(m, -1).view(np.uint8)
    weights = dequantize(raw, qtype).reshape(m, k).astype(np.float64)
    bias = rng.standard_normal(m).astype(np.float32)
    x = rng.standard_normal((n, k)).astype(np.float32)
    out = host(matmul(cuda.to_device(x), DeviceMatrix.upload([raw], qtype), cuda.to_device(bias))[0])
    np.testing.assert_allclose(out, x @ weights.T + bias, rtol=1e-5, atol=1e-4 * np.abs(weights).max())


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_matmul_decodes_every_type_as_its_numpy_reference(qtype):
    """The rows kernel (decoding and small batches): one token, and two groups of tokens."""
    for n in (1, TOKENS + 2):
        check_matmul(qtype, 5, 256, n, int(qtype) + n)


@pytest.mark.parametrize("qtype", [QType.F16, QType.Q4_0], ids=lambda q: q.name)
def test_tiled_matmul_for_prompts(qtype):
    """The tiled kernel (prompts): partial tiles of rows and tokens. (Every type's decoding is
    checked above; the two kernels share it.)"""
    check_matmul(qtype, 5, 64, TILED_MIN_TOKENS + 1, int(qtype))


def test_matmul_result_does_not_depend_on_the_launch(wide_launches):
    rng = np.random.default_rng(1)
    m, k = 7, 64
    raw = quantize(rng.standard_normal((m, k)).astype(np.float32), QType.Q8_0).reshape(m, -1).view(np.uint8)
    weights = dequantize(raw, QType.Q8_0).reshape(m, k).astype(np.float64)
    for n in (3, TILED_MIN_TOKENS + 1):
        x = rng.standard_normal((n, k)).astype(np.float32)
        out = host(matmul(cuda.to_device(x), DeviceMatrix.upload([raw], QType.Q8_0))[0])
        np.testing.assert_allclose(out, x @ weights.T, rtol=1e-5, atol=1e-4)


def test_stacked_weights_multiply_in_one_launch_into_their_own_outputs():
    """q/k/v-like weights of different row counts stacked: each output as its weight alone."""
    rng = np.random.default_rng(6)
    raws = [quantize(rng.standard_normal((m, 32)).astype(np.float32), QType.Q4_0).reshape(m, -1).view(np.uint8)
            for m in (6, 2, 3)]
    for n in (2, TILED_MIN_TOKENS + 1):
        x = cuda.to_device(rng.standard_normal((n, 32)).astype(np.float32))
        outs = matmul(x, DeviceMatrix.upload(raws, QType.Q4_0))
        alone = [host(matmul(x, DeviceMatrix.upload([raw], QType.Q4_0))[0]) for raw in raws]
        assert [o.shape for o in outs] == [(n, 6), (n, 2), (n, 3)]
        for out, expected in zip(outs, alone, strict=True):
            assert np.array_equal(host(out), expected)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K, QType.F16], ids=lambda q: q.name)
def test_embed_reads_rows_as_dequantize(qtype):
    rng = np.random.default_rng(2)
    raw = quantize(rng.standard_normal((6, 256)).astype(np.float32), qtype).reshape(6, -1).view(np.uint8)
    tokens = np.array([4, 0, 4, 5])
    out = host(elementwise.embed(cuda.to_device(raw.reshape(-1)), qtype, cuda.to_device(tokens), 256, 2.0))
    assert np.array_equal(out, dequantize(raw[tokens], qtype).reshape(4, 256) * np.float32(2.0))


def test_norms_rope_gates_and_residual_adds(wide_launches):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    normed = host(elementwise.rms_norm(cuda.to_device(x), cuda.to_device(w), 1e-6))
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(normed, expected, rtol=1e-5, atol=1e-6)

    angles = rng.uniform(0, 6, (3, 6))  # rope over the first 12 of 16 dims
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    keys = x[:, :1] * 2  # [3, 1, 16]: one KV head
    for layout in ("normal", "neox"):
        for weight, scale in ((None, 1.0), (w, 0.25)):
            on_device = (None, None) if weight is None else (cuda.to_device(weight),
                                                             cuda.to_device(weight[::-1].copy()))
            got_q, got_k = elementwise.norm_rope(cuda.to_device(x), cuda.to_device(keys), *on_device,
                                                 cuda.to_device(cos), cuda.to_device(sin), layout, scale, 1e-6)
            normed_k = keys if weight is None else keys / np.sqrt(
                (keys.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * weight[::-1]
            want_q = rotated(x if weight is None else expected, cos, sin, layout) * scale
            np.testing.assert_allclose(host(got_q), want_q, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(host(got_k), rotated(normed_k, cos, sin, layout), rtol=1e-5, atol=1e-5)

    flat, other = x.reshape(6, 16), rng.standard_normal((6, 16)).astype(np.float32)
    for pre in (None, w[::-1].copy()):
        total, normed = elementwise.add_rms_norm(cuda.to_device(flat), cuda.to_device(other), cuda.to_device(w),
                                                 None if pre is None else cuda.to_device(pre), 1e-6)
        y = other if pre is None else other / np.sqrt((other.astype(np.float64) ** 2).mean(-1, keepdims=True)
                                                      + 1e-6) * pre
        np.testing.assert_allclose(host(total), flat + y, rtol=1e-5, atol=1e-6)
        want = (flat + y) / np.sqrt(((flat + y).astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
        np.testing.assert_allclose(host(normed), want, rtol=1e-5, atol=1e-5)
    total, normed = elementwise.add_rms_norm(cuda.to_device(flat), cuda.to_device(other), None, None, 1e-6)
    assert normed is None and np.allclose(host(total), flat + other)

    g, u = x.reshape(6, 16), w[None, :].repeat(6, 0)
    silu = host(elementwise.gate(cuda.to_device(g), cuda.to_device(u), "silu"))
    np.testing.assert_allclose(silu, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    gelu = host(elementwise.gate(cuda.to_device(g), cuda.to_device(u), "gelu"))
    tanh = np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))
    np.testing.assert_allclose(gelu, 0.5 * g * (1 + tanh) * u, rtol=1e-5, atol=1e-6)
    assert np.array_equal(host(elementwise.rows(cuda.to_device(g), cuda.to_device(np.array([5, 0])))), g[[5, 0]])


def rotated(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str) -> np.ndarray:
    """numpy rope of x [n, heads, dim] over its first 2 * cos.shape[1] dims."""
    half = cos.shape[1]
    a, b = (np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)) if layout == "normal" else (
        np.arange(half), np.arange(half, 2 * half))
    out = x.copy()
    out[..., a] = x[..., a] * cos[:, None] - x[..., b] * sin[:, None]
    out[..., b] = x[..., a] * sin[:, None] + x[..., b] * cos[:, None]
    return out


@pytest.mark.parametrize("cache_types", [("f16", "f16"), ("q8_0", "q8_0"), ("f16", "q8_0")])
def test_cache_writes_store_the_cpu_caches_bytes(tiny_config, cache_types):
    """The device pools hold exactly the bytes `KVCache.write` stores on the CPU."""
    config = tiny_config
    cache = KVCache(config, 32, cache_type_k=cache_types[0], cache_type_v=cache_types[1])
    rng = np.random.default_rng(4)
    k = (rng.standard_normal((5, config.n_head_kv, config.head_dim)) * 3).astype(np.float32)
    v = (rng.standard_normal((5, config.n_head_kv, config.head_dim_v)) * 0.1).astype(np.float32)
    cells = np.array([17, 3, 4, 30, 0])
    cache.write(1, cells, k, v)
    pools = device_pools(cache)
    elementwise.write_cache(*pools, cuda.to_device(cells), cuda.to_device(k), cuda.to_device(v), cache_types)
    for pool, stored in zip(pools, (cache.keys[1], cache.values[1]), strict=True):
        assert np.array_equal(host(pool)[cells], stored.reshape(pool.shape)[cells].view(pool.dtype))


def device_pools(cache: KVCache):
    """One layer's key and value pools as `backends.cuda` allocates them: float16 bits as
    uint16, or Q8_0 bytes."""
    return [cuda.to_device(np.zeros((shape[1] * shape[2], *shape[3:]), np.uint16 if kind == "f16" else np.uint8))
            for shape, kind in zip(cache.shapes, cache.cache_types, strict=True)]


def as_q8_0(x: np.ndarray) -> np.ndarray:
    return dequantize(quantize(x.reshape(-1, x.shape[-1]), QType.Q8_0), QType.Q8_0).reshape(x.shape)


def reference_attention(q, keys, values, positions, window, group, scale):
    """float64 softmax attention of each row over its sequence's positions (keys [seq][pos])."""
    n, n_head, _ = q.shape
    out = np.zeros((n, n_head, values[0].shape[-1]))
    for t, (seq, last) in enumerate(positions):
        first = max(0, last - window + 1) if window else 0
        for h in range(n_head):
            k, v = keys[seq][first:last + 1, h // group], values[seq][first:last + 1, h // group]
            scores = k.astype(np.float64) @ q[t, h] * scale
            p = np.exp(scores - scores.max())
            out[t, h] = p / p.sum() @ v
    return out


@pytest.mark.parametrize("cache_type,window,span", [("f16", 0, 4), ("f16", 5, 3), ("q8_0", 0, 64)])
def test_paged_attention_matches_softmax(tiny_config, cache_type, window, span, wide_launches, monkeypatch):
    """Two sequences in shuffled blocks, grouped heads, causal (and a sliding window); rows longer
    than `span` positions split over blocks and combined (for 64: never split)."""
    monkeypatch.setattr(attention, "SPAN", span)
    config = tiny_config
    group, n_head_kv, d = 2, config.n_head_kv, config.head_dim
    rng = np.random.default_rng(5)
    cache = KVCache(config, 64, block_size=4, cache_type_k=cache_type, cache_type_v=cache_type)
    tables = np.array([[7, 2, 9, 0], [5, 11, 1, 3]], np.int32)
    lengths = (14, 9)
    keys = [rng.standard_normal((n, n_head_kv, d)).astype(np.float16).astype(np.float32) for n in lengths]
    values = [rng.standard_normal((n, n_head_kv, d)).astype(np.float16).astype(np.float32) for n in lengths]
    pools = device_pools(cache)
    for s, n in enumerate(lengths):
        cells = tables[s][np.arange(n) // 4] * 4 + np.arange(n) % 4
        elementwise.write_cache(*pools, cuda.to_device(cells), cuda.to_device(keys[s]), cuda.to_device(values[s]),
                                cache.cache_types)
    if cache_type == "q8_0":  # compare with what the cache holds
        keys, values = ([as_q8_0(k) for k in keys], [as_q8_0(v) for v in values])
    rows = [(0, 13), (0, 2), (1, 8), (1, 0)]  # (sequence, position)
    q = rng.standard_normal((len(rows), n_head_kv * group, d)).astype(np.float32)
    row_seq, positions = (cuda.to_device(np.array(column)) for column in zip(*rows, strict=True))
    longest = min(14, window or 14)
    out = attention.attend(cuda.to_device(q), pools[0], pools[1], (cache_type, cache_type), cuda.to_device(tables),
                           row_seq, positions, 4, window, group, 0.125, d, longest)
    expected = reference_attention(q, keys, values, rows, window, group, 0.125)
    tolerance = 1e-5 if cache_type == "f16" else 2e-2
    np.testing.assert_allclose(host(out), expected, rtol=tolerance, atol=tolerance)


@pytest.fixture(scope="module")
def tiny_config():
    from llmx.engine.archs import config_from_gguf
    from llmx.formats.gguf_file import GGUFFile

    return config_from_gguf(GGUFFile.open(MODELS_DIR / "tiny-llama-f16.gguf"))


def device_logits(stem: str, ids: np.ndarray, device: str, chunks: tuple[int, ...]) -> np.ndarray:
    """Logits at every position of `ids`, fed in chunks of these sizes (later chunks read the
    cache the earlier ones wrote)."""
    import llmx

    model = llmx.load(MODELS_DIR / f"{stem}.gguf", device=device)
    cache = KVCache(model.config, 16)
    seq = cache.new_sequence()
    bounds = np.cumsum((0, *chunks))
    return np.concatenate([model.transformer.forward(ids[a:b], seq, cache, "all")
                           for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


@needs_reference
@pytest.mark.parametrize("stem,chunks", [("tiny-llama-f16", (2, 1)), ("tiny-gemma3-q8_0", (4,))])
def test_tiny_model_forward_on_the_device_matches_the_cpu(stem, chunks, reference, tiny_logits):
    """A whole model on the device: logits match the CPU backend's and llama.cpp's within the tiny
    models' tolerances (`test_engine_parity`). Llama: a prompt then a decoded token; gemma3 (q/k
    norms, post-norms, GELU, scaled queries, neox rope): one prompt (the simulator is slow)."""
    ids = np.array(reference["tiny"][stem]["ids"][:sum(chunks)])
    logits = {name: device_logits(stem, ids, name, chunks) for name in ("cpu", "cuda")}
    expected = tiny_logits[stem][:len(ids)]
    for got in logits.values():
        err = np.abs(got - expected) / expected.std()
        assert err.max() <= (0.02 if stem.endswith("f16") else 0.25), err.max()
    assert (logits["cuda"].argmax(1) == logits["cpu"].argmax(1)).all()


@pytest.fixture(scope="module")
def tiny_logits():
    from conftest import REFERENCE_DIR

    return np.load(REFERENCE_DIR / "tiny_logits.npz")


@needs_reference
def test_the_engine_runs_on_the_device_unchanged(reference):
    """`llmx.Engine` (scheduler, paged cache, sampler) on a CUDA model: the greedy tokens of the
    CPU model (two steps: the prompt, then one decoded token)."""
    import llmx

    prompt = reference["tiny"]["tiny-llama-f16"]["ids"][:3]
    tokens = {}
    for name in ("cpu", "cuda"):
        model = llmx.load(MODELS_DIR / "tiny-llama-f16.gguf", device=name, ctx=64)
        with llmx.Engine(model, max_seqs=2, kv_cache_tokens=64) as engine:
            request = engine.submit(prompt, max_tokens=2, temperature=0.0)
            request.wait()
            tokens[name] = (request.token_ids, request.finish_reason)
    assert tokens["cuda"] == tokens["cpu"] and len(tokens["cpu"][0]) == 2


@needs_reference
def test_the_backend_stacks_runs_of_one_type_and_multiplies_them_as_alone():
    """tiny-llama-q3_k_m: attn_q and attn_k are Q3_K, attn_v Q5_K: q+k stacked, v alone (as the
    CPU backend's runs); qwen2's biased q/k/v are never stacked. Outputs are the weights' alone."""
    from llmx.engine.archs import config_from_gguf
    from llmx.engine.backends.cuda import CudaBackend
    from llmx.formats.gguf_file import GGUFFile

    gguf = GGUFFile.open(MODELS_DIR / "tiny-llama-q3_k_m.gguf")
    backend = CudaBackend(config_from_gguf(gguf), gguf.tensors)
    names = ("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v")
    assert backend.stacks["blk.0.attn_q"] == names[:2] and "blk.0.attn_v" not in backend.stacks
    x = cuda.to_device(np.random.default_rng(7).standard_normal((2, 256)).astype(np.float32))
    for name, out in zip(names, backend.linears(x, *names), strict=True):
        tensor = gguf.tensors[f"{name}.weight"]
        alone = matmul(x, DeviceMatrix.upload([tensor.data.view(np.uint8)], tensor.qtype))[0]
        assert np.array_equal(host(out), host(alone)), name
    qwen2 = GGUFFile.open(MODELS_DIR / "tiny-qwen2-q4_k_m.gguf")
    assert not any("attn" in name for name in CudaBackend(config_from_gguf(qwen2), qwen2.tensors).stacks)


def test_the_arena_hands_the_last_forwards_buffers_out_again():
    arena = device.Arena()
    a, b = arena.empty((2, 3)), arena.empty((2, 3))
    assert a is not b  # within one forward, never the same buffer twice
    arena.reset()
    again = {id(arena.empty((2, 3))), id(arena.empty((2, 3)))}
    third = arena.empty((2, 3))
    assert again == {id(a), id(b)} and third is not a and third is not b  # a third one is new
    other = arena.empty((5,))
    arena.reset()
    arena.reset()  # a forward that used nothing: the older buffers are let go
    assert arena.empty((5,)) is not other
