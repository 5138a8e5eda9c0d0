#!/usr/bin/env bash
# One device-tool session's GPU checks (issue 7), run from the repo root on the lent machine:
#   bash bench/device_check.sh OUT_DIR      (inputs: `.venv/bin/python bench/gpu_mixtral.py prepare .gpu_inputs` here)
# The eager and compiled engine on the Mixtral-shaped model with the host-time breakdown, the CPU tier
# without our fused kernel (HAQMOE_KERNELS=0) for comparison, then the CUDA and kernel tests. Everything
# lands in one archive, OUT_DIR/gpu_check.tgz (the device tool brings back few files).
set -u
out=$1
work=$(mktemp -d)
export PYTHONPATH=src
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  nproc; grep -m1 -o 'avx512_vnni' /proc/cpuinfo || echo "no avx512_vnni"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "from haqmoe.quant.kernels import w8a8_op; print('fused kernel:', w8a8_op())"
} > "$work/machine.txt" 2>&1
policies=all-resident,always-transfer,always-cpu,split,all-resident-compiled,always-transfer-compiled,always-cpu-compiled,split-compiled
timeout 300 python3 bench/gpu_mixtral.py run .gpu_inputs --out "$work/engine" --policies "$policies" \
  > "$work/engine.log" 2>&1
HAQMOE_KERNELS=0 timeout 100 python3 bench/gpu_mixtral.py run .gpu_inputs --out "$work/int_mm" \
  --policies always-cpu,split > "$work/int_mm.log" 2>&1
timeout 140 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py > "$work/tests.log" 2>&1
tail -3 "$work/tests.log"
tar czf "$out/gpu_check.tgz" -C "$work" .
