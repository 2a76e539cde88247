"""Where a decode step's time goes on the GPU, and how many kernels it launches.

Loads the model with device="cuda", prefills a prompt, then decodes N steps of B sequences and
prints: kernel launches per step, the per-op time split (CUDA events around each backend
operation), the step time, and the weights' bytes read per second against the device's own
copy bandwidth measured in the same run (decode reads every weight once per step).

Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) only the launch counts mean anything: use a
tiny model, e.g. `../shared/reference/models/tiny-gemma3-q8_0.gguf --prompt 4 --steps 1`.

Usage: python scripts/profile_gpu.py [MODEL] [--prompt 128] [--steps 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from numba import cuda

import llmx
from llmx.engine.backends.cuda import CudaBackend
from llmx.engine.kv_cache import BLOCK_SIZE, KVCache

OPS = ("embed", "linear", "linears", "rms_norm", "norm_rope", "add_rms_norm", "activate", "kv_write", "attend",
       "rows", "to_host")
LAUNCHES = [0]
SECONDS: dict[str, float] = defaultdict(float)
DEPTH = [0]  # operations inside operations (linears calling linear) count in the outer one


def count_launches() -> None:
    """Wrap the configured-kernel type's __call__ (numba-cuda's launch configuration, or the
    simulator's kernel) to count launches."""
    @cuda.jit
    def probe(a):
        pass

    configured = type(probe[1, 1])
    call = configured.__call__

    def counted(self, *args, **kwargs):
        LAUNCHES[0] += not getattr(self, "_device", False)  # (the simulator calls device functions so too)
        return call(self, *args, **kwargs)

    configured.__call__ = counted


def time_ops() -> None:
    """Each backend operation timed between CUDA events (the device's time, not the launch's)."""
    for name in OPS:
        method = getattr(CudaBackend, name)

        def timed(self, *args, _method=method, _name=name, **kwargs):
            if DEPTH[0]:
                return _method(self, *args, **kwargs)
            start, end = cuda.event(), cuda.event()
            start.record()
            DEPTH[0] += 1
            try:
                result = _method(self, *args, **kwargs)
            finally:
                DEPTH[0] -= 1
            end.record()
            end.synchronize()
            SECONDS[_name] += start.elapsed_time(end) / 1e3  # (milliseconds)
            return result

        setattr(CudaBackend, name, timed)


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 256 MiB (read + write)."""
    src = cuda.device_array(1 << 28, np.uint8)
    dst = cuda.device_array_like(src)
    dst.copy_to_device(src)
    cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        dst.copy_to_device(src)
    cuda.synchronize()
    return 2 * src.nbytes * 5 / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    model = llmx.load(args.model, device="cuda")
    count_launches()
    per_seq = -(-(args.prompt + args.steps + 1) // BLOCK_SIZE) * BLOCK_SIZE
    cache = KVCache(model.config, args.batch * per_seq)
    rng = np.random.default_rng(0)
    seqs = [cache.new_sequence() for _ in range(args.batch)]
    for seq in seqs:
        model.transformer.forward(rng.integers(0, model.config.n_vocab, args.prompt), seq, cache, "last")
    time_ops()
    LAUNCHES[0] = 0
    started = time.perf_counter()
    for _ in range(args.steps):
        tokens = rng.integers(0, model.config.n_vocab, args.batch)
        model.transformer.forward_batch([(s, tokens[i:i + 1]) for i, s in enumerate(seqs)], cache, "last")
    step = (time.perf_counter() - started) / args.steps
    weights = sum(t.nbytes for t in model.gguf.tensors.values() if len(t.shape) == 2)
    print(f"{model.path.name}, {args.batch} sequence(s), context {args.prompt}: {step * 1e3:.2f} ms per step "
          f"({args.batch / step:.1f} t/s), {LAUNCHES[0] / args.steps:.0f} kernel launches per step")
    print(f"weights read {weights / step / 1e9:.1f} GB/s; device copy bandwidth {copy_bandwidth():.0f} GB/s")
    total = sum(SECONDS.values())
    print(f"\n{'op':<14}{'ms/step':>10}{'share':>8}")
    for name, seconds in sorted(SECONDS.items(), key=lambda item: -item[1]):
        print(f"{name:<14}{seconds / args.steps * 1e3:>10.3f}{seconds / total:>8.1%}")


if __name__ == "__main__":
    main()
