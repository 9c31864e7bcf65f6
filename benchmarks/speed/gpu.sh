#!/usr/bin/env bash
# The speed/memory comparison of benchmarks/speed/compare.py, run on a GPU, in one call of a few minutes.
#
#   bash benchmarks/speed/gpu.sh                 # CUDA (default), prints the markdown table at the end
#   DEVICE=cpu bash benchmarks/speed/gpu.sh --case sd15+te:3:32   # same entry point on CPU (used to test it)
#
# Same Python entry point and the same plan as the CPU run, with --device cuda: ta/do through
# domerge_core.merge(device="cuda"), the materialise+SVD / svd_lowrank baselines on the same card,
# inputs held on the host as a loaded file would be, and torch.cuda.synchronize() around every timing.
# Baselines are still sampled by shape (3 modules per shape on the gpu plan) and extrapolated.
# Extra arguments go to compare.py (e.g. --case flux:3:32, --variants ta,svd, --per-shape 1).
# Needs torch with CUDA and the `bench` extra (`pip install -e .[bench]`: diffusers builds the module lists
# on the meta device, no weights are downloaded).
# Environment: PYTHON (default: .venv/bin/python if present, else python3), DEVICE (default cuda),
# OUTDIR (default /tmp/domerge_speed_gpu; results.md and results.json land there).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
OUTDIR=${OUTDIR:-/tmp/domerge_speed_gpu}
mkdir -p "$OUTDIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, diffusers" 2>/dev/null || {
  echo "gpu.sh: $PYTHON lacks torch or diffusers (pip install -e .[bench])" >&2; exit 2; }
if [ "$DEVICE" != cpu ]; then
  "$PYTHON" - <<'PY' || { echo "gpu.sh: no CUDA device visible to torch; run with DEVICE=cpu to test the script" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
  "$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  PLAN=(--plan gpu)
else
  PLAN=()
fi
exec "$PYTHON" benchmarks/speed/compare.py --device "$DEVICE" "${PLAN[@]}" \
  --json "$OUTDIR/results.json" --md "$OUTDIR/results.md" --timeout 400 "$@"
