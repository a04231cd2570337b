#!/usr/bin/env bash
# Run deepep-switch's GPU validation on a machine with real DeepEP installed (torch 2.14.1, nvidia-nccl-cu13 2.30.7,
# sgl-deep-ep 0.1.2.post1), e.g. a lent device. Logs and JSON records go to $OUT (default ./gpu-out).
#   scripts/gpu-validate.sh core      # test_gpu_core.py + the Triton layout kernel tests (2 GPUs)
#   scripts/gpu-validate.sh routers   # test_gpu_routers.py (2 GPUs, and 4 if present)
#   scripts/gpu-validate.sh validation  # test_validation.py's gpu tests (RTP_LLM_DEEPEP_VALIDATE, 2 GPUs)
#   scripts/gpu-validate.sh reliability [K]  # test_gpu_reliability.py (soak, cycles, one-sided env, a killed rank)
#   scripts/gpu-validate.sh rtp-llm [PATH]   # rtp-llm's DeepEP tests ported onto the stand-in (tests/rtp_llm; 2 GPUs)
#   scripts/gpu-validate.sh bench N [bench args...]   # deepep-switch bench on N ranks
#   scripts/gpu-validate.sh switch    # test_gpu_switch.py: live switches, kept buffers, both modes (2 GPUs)
#   scripts/gpu-validate.sh metrics-bench [N] [args...]  # RTP_LLM_DEEPEP_METRICS on vs off, N ranks (default 2)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 GPU_RECORD_DIR=$OUT
stamp() { echo "== $(date -u +%FT%TZ) $*"; }
case "${1:-}" in
  core)
    stamp "gpu core tests" | tee "$OUT/gpu-core.log"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/gpu-core.log" 2>&1
    python3 -c 'import torch, deep_ep, triton; print("torch", torch.__version__, "deep_ep", deep_ep.__version__, "triton", triton.__version__)' >> "$OUT/gpu-core.log" 2>&1
    timeout 570 python3 -m pytest -m gpu tests/test_gpu_core.py tests/test_layout_kernels.py -v -p no:cacheprovider \
      --timeout 560 -o addopts="" 2>&1 | tee -a "$OUT/gpu-core.log"
    ;;
  routers)
    stamp "gpu router tests" | tee "$OUT/gpu-routers.log"
    timeout 580 python3 -m pytest -m gpu tests/test_gpu_routers.py -v -p no:cacheprovider --timeout 570 \
      -o addopts="" 2>&1 | tee -a "$OUT/gpu-routers.log"
    ;;
  validation)
    stamp "gpu validation tests" | tee "$OUT/gpu-validation.log"
    timeout 580 python3 -m pytest -m gpu tests/test_validation.py -v -p no:cacheprovider --timeout 570 \
      -o addopts="" 2>&1 | tee -a "$OUT/gpu-validation.log"
    ;;
  reliability)
    stamp "gpu reliability tests" | tee "$OUT/gpu-reliability.log"
    timeout 590 python3 -m pytest -m gpu tests/test_gpu_reliability.py -v -p no:cacheprovider -o addopts="" -rxX \
      ${2:+-k "$2"} 2>&1 | tee -a "$OUT/gpu-reliability.log"
    ;;
  rtp-llm)
    stamp "gpu rtp-llm ported tests" | tee "$OUT/gpu-rtp-llm.log"
    timeout 580 python3 -m pytest -m gpu "${2:-tests/rtp_llm}" -v -p no:cacheprovider -o addopts="" -rxX 2>&1 \
      | tee -a "$OUT/gpu-rtp-llm.log"
    ;;
  bench)
    n=${2:-2}
    stamp "bench EP$n" | tee "$OUT/bench-ep$n.log"
    shift 2 || true
    timeout 580 python3 -m deepep_switch.cli bench --ranks "$n" --json "$OUT/bench-ep$n.json" "$@" 2>&1 | tee -a "$OUT/bench-ep$n.log"
    ;;
  switch)
    stamp "gpu switch tests" | tee "$OUT/gpu-switch.log"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/gpu-switch.log" 2>&1
    timeout 590 python3 -m pytest -m gpu tests/test_gpu_switch.py -v -p no:cacheprovider --timeout 580 \
      -o addopts="" -rxX 2>&1 | tee -a "$OUT/gpu-switch.log"
    ;;
  metrics-bench)
    n=${2:-2}
    stamp "metrics-bench EP$n" | tee "$OUT/metrics-bench-ep$n.log"
    shift 2 || shift $#
    EP_DISABLE_GIN=${EP_DISABLE_GIN:-1} timeout 580 python3 -m deepep_switch.cli metrics-bench --ranks "$n" \
      --json "$OUT/metrics-bench-ep$n.json" "$@" 2>&1 | tee -a "$OUT/metrics-bench-ep$n.log"
    ;;
  *)
    echo "usage: $0 core|routers|validation|reliability [K]|rtp-llm|bench N|switch|metrics-bench [N]" >&2
    exit 2
    ;;
esac
