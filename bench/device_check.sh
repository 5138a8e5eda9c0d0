#!/usr/bin/env bash
# One device-tool session's GPU checks, run from the repo root on the lent machine:
#   bash bench/device_check.sh OUT_DIR [BASELINE_SRC]
# Inputs: `.venv/bin/python bench/gpu_mixtral.py prepare .gpu_inputs` here (git-ignored: name it in the
# device tool's `carry`). BASELINE_SRC: an earlier commit's src/ tree (e.g. `git archive REV src | tar -x
# -C .bench_old`, carried likewise), measured in the same lease. The eager and compiled engine on the
# Mixtral-shaped model with the host-time breakdown, four of the baseline's rows beside them (all-resident
# and split compiled, split and always-cpu eager), a bad call of the fused CPU kernel, then the kernel and
# CUDA tests. Everything lands in one archive, OUT_DIR/gpu_check.tgz (the device tool brings back few files).
set -u
out=$1
base=${2:-}
work=$(mktemp -d)
export PYTHONPATH=src
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nproc; grep -m1 -o 'avx512_vnni' /proc/cpuinfo || echo "no avx512_vnni"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 - <<'PY'
import torch
from haqmoe.exec.kernels import w8a8_op
op = w8a8_op()
print("fused kernel:", op)
if op is not None:  # a wrong feature count must raise, not crash
    w, s, cs = torch.zeros(16, 64, dtype=torch.int8), torch.ones(16), torch.zeros(16, dtype=torch.int32)
    try:
        op(torch.zeros(1, 63), w, s, None, cs, None, 64, -127, 127, True)
    except RuntimeError as exc:
        print("bad call raised:", str(exc).splitlines()[0])
PY
} > "$work/machine.txt" 2>&1
policies=all-resident,always-transfer,always-cpu,split,all-resident-compiled,always-transfer-compiled,always-cpu-compiled,split-compiled
timeout 200 python3 bench/gpu_mixtral.py run .gpu_inputs --out "$work/engine" --policies "$policies" \
  > "$work/engine.log" 2>&1
if [ -n "$base" ]; then
  PYTHONPATH=$base timeout 100 python3 bench/gpu_mixtral.py run .gpu_inputs --out "$work/baseline" \
    --policies all-resident-compiled,split-compiled,split,always-cpu > "$work/baseline.log" 2>&1
fi
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py > "$work/tests.log" 2>&1
tail -3 "$work/tests.log"
tar czf "$out/gpu_check.tgz" -C "$work" .
