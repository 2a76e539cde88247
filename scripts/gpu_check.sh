#!/usr/bin/env bash
# Every GPU check of the CUDA backend, in one run (at most ~8 minutes), on a machine with an NVIDIA
# GPU, CUDA, numba and numba-cuda but no network:
#   1. installs what such a machine lacks from wheels in $LLMX_WHEELS (default ./wheels; fill it
#      beforehand with `pip download -d wheels gguf sentencepiece tokenizers typer rich jinja2 ...`
#      or `pip wheel -w wheels .`), then llmx itself without touching the index;
#   2. `pytest -m cuda` on the device (NUMBA_ENABLE_CUDASIM=0: the same tests CI runs on the simulator);
#   3. gemma's KL divergence against llama.cpp (../shared/reference/gemma_kld_gpl3.npz, or
#      $LLMX_REFERENCE_DIR) on the GPU: mean <= 1.5 x the reference's own spread, top-1 >= spread - 0.02;
#   4. `scripts/profile_gpu.py` (launches per token, the per-op split, weights read per second against
#      the device's copy bandwidth), then `llmx bench -d cuda -p 512 -n 128 -b 1,16,64 -o json`.
# Results go to $OUT (default ./gpu-check), one file per step. Usage: bash scripts/gpu_check.sh [MODEL]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
MODEL=${1:-${LLMX_MODEL:-}}
export NUMBA_ENABLE_CUDASIM=0 LLMX_CACHE_DIR=${LLMX_CACHE_DIR:-$PWD/$OUT/cache}
status=0
# step NAME FILE COMMAND...: runs COMMAND, its output on the terminal and in $OUT/FILE
step() {
    local name=$1 file=$2
    shift 2
    echo "== $name"
    "$@" 2>&1 | tee "$OUT/$file"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== failed ($rc): $name"; status=1; }
}

wheels=${LLMX_WHEELS:-wheels}
if [ -d "$wheels" ]; then
    step "install from $wheels" install.txt python -m pip install -q --no-index --find-links "$wheels" -e '.[dev]'
else
    step "install (no wheel folder: what is installed already)" install.txt python -m pip install -q --no-deps --no-build-isolation -e .
fi
step "the device" device.txt python - <<'PY'
from numba import cuda
device = cuda.get_current_device()
print(f"GPU: {device.name.decode() if isinstance(device.name, bytes) else device.name}, "
      f"compute capability {device.compute_capability}")
PY

step "pytest -m cuda on the GPU" pytest.txt timeout 300 python -m pytest -q -m cuda tests/test_cuda.py

step "gemma KL divergence on the GPU" kl.txt timeout 240 python - "$MODEL" <<'PY'
import os, sys
from pathlib import Path

import numpy as np

import llmx
from llmx.engine.kl_divergence import reference_kl

reference = Path(os.environ.get("LLMX_REFERENCE_DIR", "../shared/reference")) / "gemma_kld_gpl3.npz"
model = llmx.load(sys.argv[1] or None, device="cuda")
kl, top1 = reference_kl(model, reference)
spread = np.load(reference)
bound_kl, bound_top1 = 1.5 * float(spread["spread_kld_mean"]), float(spread["spread_top1"]) - 0.02
print(f"mean KL {kl:.5f} (bound {bound_kl:.5f}), top-1 {top1:.4f} (bound {bound_top1:.4f})")
sys.exit(0 if kl <= bound_kl and top1 >= bound_top1 else 1)
PY

step "profile: launches per token, per-op time, weights' bytes/s against the device's bandwidth" profile.txt \
    timeout 240 python scripts/profile_gpu.py ${MODEL:+"$MODEL"} --prompt 128 --steps 16

step "llmx bench on the GPU" bench.txt timeout 300 llmx bench ${MODEL:+"$MODEL"} -d cuda -p 512 -n 128 -b 1,16,64 \
    -r 2 -o json
echo "== done: $OUT ($([ $status -eq 0 ] && echo all passed || echo some failed))"
exit $status
