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
#   scripts/gpu-validate.sh perf [tables|sweep|all]   # the performance run (2 GPUs): tables <= 9.5 min (~4 expected),
#       sweep <= 9.5 min (~4 expected, mostly DeepEP JIT compiles per num_sms and token count);
#       run "tables" and "sweep" as two commands where one command may last at most 10 minutes
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
    timeout 570 python3 -m pytest -m gpu tests/test_gpu_core.py tests/test_layout_kernels.py tests/test_token_layout.py -v -p no:cacheprovider \
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
  perf)
    what=${2:-all}
    log="$OUT/perf.log"
    step() {  # step SECONDS NAME COMMAND...: one bounded step, its start, end and exit status in the log
      local limit=$1 name=$2; shift 2
      stamp "perf: $name (timeout ${limit}s)" | tee -a "$log"
      timeout "$limit" "$@" 2>&1 | tee -a "$log"
      local rc=${PIPESTATUS[0]}
      stamp "perf: $name done, exit $rc" | tee -a "$log"
    }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
    python3 -c 'import torch, deep_ep, triton; print("torch", torch.__version__, "deep_ep", deep_ep.__version__, "triton", triton.__version__)' >> "$log" 2>&1
    if [ "$what" = tables ] || [ "$what" = all ]; then
      # Correctness first: the token-layout and layout kernels against torch, the pinned counts upload.
      step 150 "kernel checks" python3 -m pytest -m gpu tests/test_token_layout.py tests/test_layout_kernels.py \
        tests/test_routers.py -v -p no:cacheprovider --timeout 140 -o addopts=""
      # bf16 and FP8 tables: legacy and elastic, normal 128/4096, low-latency 128 (token and expand layouts), raw,
      # raw+w, router, CUDA graphs, %NVL; --profile: kernel shares and the host breakdown of the 128-token rows.
      mkdir -p "$OUT/perf-bf16" "$OUT/perf-fp8"
      # bench's own --timeout (below each step's) ends its ranks itself; timeout(1) would orphan them on the GPUs.
      step 210 "bench bf16" python3 -m deepep_switch.cli bench --ranks 2 --timeout 190 --out "$OUT/perf-bf16" \
        --profile "$OUT/perf-bf16/profile.txt" --json "$OUT/bench-perf-bf16.json"
      step 210 "bench fp8" python3 -m deepep_switch.cli bench --ranks 2 --timeout 190 --fp8 --out "$OUT/perf-fp8" \
        --profile "$OUT/perf-fp8/profile.txt" --json "$OUT/bench-perf-fp8.json"
    fi
    if [ "$what" = sweep ] || [ "$what" = all ]; then
      # The elastic normal router per num_sms (0 = DeepEP's choice) and prefer_overlap_with_compute=False, one
      # token count per command so that a slow JIT compile loses one count, not the sweep. 4096 first.
      for t in 4096 8192 512; do
        mkdir -p "$OUT/perf-sweep-$t"
        step 190 "sms sweep $t tokens" python3 -m deepep_switch.cli bench --ranks 2 --timeout 175 --backends elastic --sweep-only \
          --sweep-sms 0,16,32,64 --sweep-overlap --sweep-tokens "$t" --sweep-iters 10 --out "$OUT/perf-sweep-$t"
      done
    fi
    ;;
  *)
    echo "usage: $0 core|routers|validation|reliability [K]|rtp-llm|bench N|switch|metrics-bench [N]|perf [tables|sweep|all]" >&2
    exit 2
    ;;
esac
