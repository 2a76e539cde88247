"""Engine pieces on their own: paged cache, batched forward, rope scaling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import MODELS_DIR, needs_reference

from llmx.engine.archs import config_from_gguf
from llmx.engine.kv_cache import KVCache
from llmx.engine.transformer import Transformer, yarn_mix
from llmx.errors import LlmxError
from llmx.formats.gguf_file import GGUFFile
from llmx.quant.cpu.linear import matmul, pack
from llmx.quant.qtypes import QType

pytestmark = needs_reference  # the tiny models and llama.cpp's outputs in ../shared


@pytest.fixture(scope="module")
def tiny():
    gguf = GGUFFile.open(MODELS_DIR / "tiny-qwen2-q8_0.gguf")
    config = config_from_gguf(gguf)
    return Transformer.from_gguf(gguf, config), config


def test_blocks_are_handed_out_and_back(tiny):
    _, config = tiny
    cache = KVCache(config, 64, block_size=16)  # 4 blocks
    a, b = cache.new_sequence(), cache.new_sequence()
    assert cache.reserve(a, 20).tolist() == list(range(20))
    cache.commit(a, 20)
    cache.reserve(b, 16)
    assert len(a.blocks) == 2 and len(b.blocks) == 1 and cache.free_tokens == 16
    with pytest.raises(LlmxError, match="KV cache is full"):
        cache.reserve(b, 40)
    cache.release(a)
    assert cache.free_tokens == 48 and a.blocks == [] and a.length == 0


@pytest.mark.parametrize("n", [3, 40])  # 40 rows: split over threads
def test_cache_write_rounds_like_numpy_into_the_given_cells(tiny, n):
    _, config = tiny
    cache = KVCache(config, 64, block_size=16)
    rng = np.random.default_rng(n)
    k = (rng.standard_normal((n, config.n_head_kv, config.head_dim)) * 1e3).astype(np.float32)
    v = (rng.standard_normal((n, config.n_head_kv, config.head_dim_v)) * 1e-3).astype(np.float32)
    k[0, 0, :2] = [70000.0, -1e-9]  # beyond float16's range, and below its subnormals
    cells = rng.permutation(64)[:n]
    cache.write(1, cells, k, v)
    with np.errstate(over="ignore"):
        assert np.array_equal(cache.keys[1].reshape(64, *k.shape[1:])[cells], k.astype(np.float16))
    assert np.array_equal(cache.values[1].reshape(64, *v.shape[1:])[cells], v.astype(np.float16))
    untouched = np.setdiff1d(np.arange(64), cells)
    assert not cache.keys[1].reshape(64, -1)[untouched].any() and not cache.keys[0].any()


def test_batched_forward_equals_one_sequence_at_a_time(tiny):
    model, config = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, size=n) for n in (7, 19, 3)]
    alone = []
    for p in prompts:
        cache = KVCache(config, 64)
        seq = cache.new_sequence()
        first = model.forward(p, seq, cache, "all")
        alone.append((first, model.forward(np.array([5]), seq, cache, "last")))
    cache = KVCache(config, 128)
    seqs = [cache.new_sequence() for _ in prompts]
    together = model.forward_batch(list(zip(seqs, prompts, strict=True)), cache, "all")
    step = model.forward_batch([(s, np.array([5])) for s in seqs], cache, "last")
    for (first, nxt), batched, batched_next in zip(alone, together, step, strict=True):
        np.testing.assert_allclose(batched, first, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(batched_next, nxt, rtol=1e-4, atol=1e-3)


def test_yarn_keeps_fast_dims_and_interpolates_slow_ones():
    mix, mscale = yarn_mix(rope_dim=128, orig_ctx=4096, base=10000.0, freq_scale=0.25)
    assert mix[0, 0] == 1.0 and mix[0, -1] == 0.0  # first pairs extrapolate, last interpolate
    assert np.all(np.diff(mix[0]) <= 0)
    assert mscale == pytest.approx(1 + 0.1 * np.log(4))
    same, one = yarn_mix(rope_dim=128, orig_ctx=4096, base=10000.0, freq_scale=1.0)
    assert one == 1.0


def test_yarn_factor_one_changes_nothing(tiny):
    model, config = tiny
    ids = np.arange(3, 40)
    plain_cache = KVCache(config, 64)
    plain = model.forward(ids, plain_cache.new_sequence(), plain_cache)
    yarn = Transformer(dataclasses.replace(config, rope_scaling="yarn", rope_scale_factor=1.0), model.tensors)
    yarn_cache = KVCache(config, 64)
    np.testing.assert_allclose(yarn.forward(ids, yarn_cache.new_sequence(), yarn_cache), plain, rtol=1e-5, atol=1e-4)


def test_q4_0_layer_weights_are_repacked_as_llama_cpp_loads_them():
    """llama.cpp repacks every Q4_0 matrix it multiplies (rows a multiple of 8), not `token_embd`,
    which it also reads by rows; the tiny model's output is its tied `token_embd`. q/k/v and
    gate/up, each packed alike, are packed as one stack each, and multiply to the same bits."""
    gguf = GGUFFile.open(MODELS_DIR / "tiny-llama-q4_0.gguf")
    model = Transformer.from_gguf(gguf, config_from_gguf(gguf)).backend
    q4_0 = {name for name, t in gguf.tensors.items() if t.qtype.name == "Q4_0"}
    assert "token_embd.weight" in q4_0 and len(q4_0) == 22
    packed = {f"{n}.weight" for n in model.stacks} | set(model.packed)  # and other types (Q6_K output)
    assert packed & q4_0 == q4_0 - {"token_embd.weight"} and "token_embd.weight" not in packed
    assert {s.names for s in model.stacks.values()} >= {("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v"),
                                                         ("blk.0.ffn_gate", "blk.0.ffn_up")}
    x = np.random.default_rng(2).standard_normal((5, model.config.n_embd)).astype(np.float32)
    names = ("blk.1.attn_q", "blk.1.attn_k", "blk.1.attn_v")
    for name, stacked in zip(names, model.linears(x, *names), strict=True):
        rows = gguf.tensors[f"{name}.weight"].data.view(np.uint8)
        assert np.array_equal(stacked, matmul(x, rows, QType.Q4_0, packed=pack(rows, QType.Q4_0))), name
        assert np.array_equal(stacked, model.linear(x, name)), name  # one weight of a stack, alone


def _decode_both_ways(model: Transformer, config, steps: int) -> None:
    """Greedy-decodes `steps` tokens twice from one prompt: each single-token step through the
    bound decoder (`cpu_decode`), and through the generic blocks; the logits must be the same bits."""
    from llmx.engine.backends.cpu_decode import RowDecoder

    backend = model.backend
    decoder = RowDecoder.bind(backend, model.layers, model._rope)
    assert decoder is not None
    runs = []
    for bound in (decoder, False):
        backend._row_decoder = bound
        cache = KVCache(config, 256, block_size=16)
        seq = cache.new_sequence()
        logits = [model.forward(np.arange(3, 23), seq, cache, "last")[0]]
        for _ in range(steps):  # crosses a block boundary at position 32
            logits.append(model.forward(np.array([int(np.argmax(logits[-1]))]), seq, cache, "last")[0])
        assert (decoder._pools[0]() is cache) == (bound is decoder)  # the bound steps did run (on this cache)
        runs.append(np.array(logits))
    backend._row_decoder = None
    assert np.array_equal(runs[0], runs[1])


@pytest.mark.parametrize("stem", ["tiny-gemma3-q8_0", "tiny-gemma3-q4_k_m", "tiny-llama-q4_0", "tiny-llama-q5_0",
                                  "tiny-qwen3-q8_0"])
def test_bound_single_token_steps_give_the_generic_forwards_bits(stem):
    gguf = GGUFFile.open(MODELS_DIR / f"{stem}.gguf")
    config = config_from_gguf(gguf)
    _decode_both_ways(Transformer.from_gguf(gguf, config), config, 16)


def test_bound_single_token_steps_give_the_generic_forwards_bits_on_gemma(gemma_path):
    gguf = GGUFFile.open(gemma_path)
    config = config_from_gguf(gguf)
    _decode_both_ways(Transformer.from_gguf(gguf, config, threads=2), config, 16)


def test_steps_the_bound_decoder_does_not_cover_take_the_generic_blocks(tiny):
    model, config = tiny  # qwen2: its q/k/v have biases
    cache = KVCache(config, 64)
    seq = cache.new_sequence()
    model.forward(np.arange(3, 9), seq, cache)
    model.forward(np.array([7]), seq, cache)
    assert model.backend._row_decoder is False  # tried once, not covered
    gguf = GGUFFile.open(MODELS_DIR / "tiny-llama-q8_0.gguf")
    llama_config = config_from_gguf(gguf)
    llama = Transformer.from_gguf(gguf, llama_config)
    cache = KVCache(llama_config, 64, cache_type_k="q8_0", cache_type_v="q8_0")
    seq = cache.new_sequence()
    llama.forward(np.arange(3, 9), seq, cache)
    llama.forward(np.array([7]), seq, cache)
    assert llama.backend._row_decoder is None  # a q8_0 cache: never bound
