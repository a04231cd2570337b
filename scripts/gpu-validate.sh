#!/usr/bin/env bash
# Run deepep-switch's GPU validation on a machine with real DeepEP installed, e.g. a lent device: DeepEP 2.1's stack
# (torch 2.14.1, nvidia-nccl-cu13 2.30.7, sgl-deep-ep 0.1.2.post1) or 2.5's (the same torch, NCCL 2.32.3,
# sgl-deep-ep beside sgl-deep-ep-v25, nvcc >= 13.1: target v25). Logs and JSON records go to $OUT (default ./gpu-out).
#   scripts/gpu-validate.sh core      # test_gpu_core.py + the Triton layout kernel tests (2 GPUs)
#   scripts/gpu-validate.sh routers   # test_gpu_routers.py (2 GPUs, and 4 if present)
#   scripts/gpu-validate.sh validation  # test_validation.py's gpu tests (RTP_LLM_DEEPEP_VALIDATE, 2 GPUs)
#   scripts/gpu-validate.sh reliability [K]  # test_gpu_reliability.py (soak, cycles, one-sided env, a killed rank)
#   scripts/gpu-validate.sh rtp-llm [PATH]   # rtp-llm's DeepEP tests ported onto the stand-in (tests/rtp_llm; 2 GPUs)
#   scripts/gpu-validate.sh bench N [bench args...]   # deepep-switch bench on N ranks
#   scripts/gpu-validate.sh switch    # test_gpu_switch.py: live switches, kept buffers, both modes (2 GPUs)
#   scripts/gpu-validate.sh ab [N] [ab args...]  # deepep-switch ab on N ranks (default 2, legacy vs elastic), --out $OUT/ab-epN
#   scripts/gpu-validate.sh metrics-bench [N] [args...]  # RTP_LLM_DEEPEP_METRICS on vs off, N ranks (default 2)
#   scripts/gpu-validate.sh perf [tables|sweep|all]   # the performance run (2 GPUs): tables <= 9.5 min (~4 expected),
#       sweep <= 9.5 min (~4 expected, mostly DeepEP JIT compiles per num_sms and token count);
#       run "tables" and "sweep" as two commands where one command may last at most 10 minutes
#   scripts/gpu-validate.sh v25 [STEP,...]  # DeepEP 2.5 stack (legacy + ep), 2 GPUs, within V25_BUDGET_S (480 s)
# Every GPU test runs the generations this process can run (tests/_generations.py): legacy and elastic on the
# 2.1 stack (ep rows skip), legacy and ep on the 2.5 stack (elastic rows skip, with preflight's reason).
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
  ab)
    # deepep-switch ab on real DeepEP: legacy vs elastic (or --a/--b given after N) on the same inputs; writes
    # $OUT/ab-epN/ab.json and the latency plots.
    n=${2:-2}
    stamp "ab EP$n" | tee "$OUT/ab-ep$n.log"
    shift 2 || shift $#
    EP_DISABLE_GIN=${EP_DISABLE_GIN:-1} timeout 580 python3 -m deepep_switch.cli ab --ranks "$n" --timeout 560 \
      --out "$OUT/ab-ep$n" "$@" 2>&1 | tee -a "$OUT/ab-ep$n.log"
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
  v25)
    # The DeepEP 2.5 stack (../shared/gpu/v25: torch 2.14.1, NCCL 2.32.3, sgl-deep-ep's legacy Buffer beside
    # sgl-deep-ep-v25's EPBuffer, nvcc 13.5 for 2.5's JIT, EP_DISABLE_GIN=1) on 2 GPUs: everything the GPU tests
    # have for ep and legacy, then the bench. Steps run in priority order, each bounded by `timeout` and by what
    # is left of V25_BUDGET_S; a step that no longer fits is reported as skipped (run it alone: v25 STEP).
    # DeepEP 2.5 compiles each new dispatch/combine shape on first use (4-6 s, cached in ~/.dj): the tests and
    # the bench's warm-up take that before anything is compared or timed.
    steps=${2:-doctor,core,routers,rtp-llm,validation,reliability,bench,killed}
    budget=${V25_BUDGET_S:-480}
    t0=$(date +%s)
    summary="$OUT/v25-summary.txt"
    stamp "v25: steps $steps, budget ${budget}s" | tee "$OUT/gpu-v25.log" | tee "$summary"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/gpu-v25.log" 2>&1
    python3 - >> "$OUT/gpu-v25.log" 2>&1 <<'PY'
import importlib.metadata as md, os, subprocess
import torch
def probe(what, fn):
    try:
        print(what, fn())
    except Exception as exc:
        print(what, "unknown:", type(exc).__name__, exc)
for mod in ("deep_ep", "deep_ep_v25"):
    probe(mod, lambda: (lambda m: (getattr(m, "__version__", "?"), [c for c in ("Buffer", "ElasticBuffer", "EPBuffer")
                                                                     if hasattr(m, c)]))(__import__(mod)))
probe("torch", lambda: (torch.__version__, torch.cuda.device_count(), "GPUs"))
probe("torch nccl", torch.cuda.nccl.version)
probe("nvidia-nccl-cu13", lambda: md.version("nvidia-nccl-cu13"))
probe("env", lambda: {k: os.environ.get(k) for k in ("EP_DISABLE_GIN", "EP_JIT_NVCC_COMPILER", "CUDA_HOME")})
nvcc = os.environ.get("EP_JIT_NVCC_COMPILER") or "nvcc"
probe(nvcc, lambda: subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
PY
    reserve=0   # seconds kept back for the bench while the tests run
    case ",$steps," in *",bench,"*) reserve=${V25_BENCH_RESERVE_S:-100} ;; esac
    left() { echo $(( budget - ($(date +%s) - t0) - reserve )); }
    # step NAME CAP MIN CMD...: run CMD under `timeout min(CAP, time left)` unless fewer than MIN seconds are left;
    # CMD "pytest ARGS" runs the gpu-marked tests of ARGS, each test bounded 15 s inside the step's timeout.
    step() {
      local name=$1 cap=$2 min=$3; shift 3
      case ",$steps," in *",$name,"*) ;; *) return 0 ;; esac
      [ "$name" = bench ] && reserve=0
      local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
      if [ "$t" -lt "$min" ]; then
        stamp "v25 $name: SKIPPED (budget: ${t}s left of ${budget}s, needs ${min}s; run: $0 v25 $name)" \
          | tee -a "$OUT/gpu-v25.log" "$summary"
        return 0
      fi
      if [ "$1" = pytest ]; then
        shift
        set -- python3 -m pytest -m gpu -v -p no:cacheprovider -o addopts="" -rsxX --timeout $(( t - 15 )) \
          --junitxml="$OUT/v25-$name.xml" "$@"
      fi
      local s0; s0=$(date +%s)
      stamp "v25 $name: start (timeout ${t}s): $*" | tee "$OUT/v25-$name.log"
      timeout -k 10 "$t" "$@" >> "$OUT/v25-$name.log" 2>&1
      local rc=$?
      tail -n 60 "$OUT/v25-$name.log" >> "$OUT/gpu-v25.log"
      local result; result=$(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$OUT/v25-$name.log" | tail -n 1)
      stamp "v25 $name: exit $rc after $(( $(date +%s) - s0 ))s ${result}" | tee -a "$OUT/gpu-v25.log" "$summary"
    }
    # doctor: which generations this process can run and why not the others (exit 1 if ep cannot run)
    step doctor 60 20 bash -c 'export RTP_LLM_DEEPEP_BACKEND=ep; python3 -m deepep_switch.cli doctor --json > "$1";
      python3 -m deepep_switch.cli doctor' _ "$OUT/doctor-v25.json"
    step core 180 60 pytest tests/test_gpu_core.py tests/test_layout_kernels.py
    step routers 180 60 pytest tests/test_gpu_routers.py -k "not 4gpu"
    # legacy's rtp-llm rows run on the 2.1 stack (the rtp-llm target); here the ep rows
    step rtp-llm 180 60 pytest tests/rtp_llm -k "gpu-ep"
    step validation 120 60 pytest tests/test_validation.py
    step reliability 60 30 pytest tests/test_gpu_reliability.py -k "one_sided and 2gpu"
    step bench 150 70 python3 -m deepep_switch.cli bench --ranks 2 --backends legacy,ep --json "$OUT/bench-v25.json" \
      --timeout 140
    step killed 90 70 pytest tests/test_gpu_reliability.py -k "killed and 2gpu and ep"
    stamp "v25: done after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/gpu-v25.log" "$summary"
    cat "$summary"
    ;;
  *)
    echo "usage: $0 core|routers|validation|reliability [K]|rtp-llm|bench N|switch|ab [N]|metrics-bench [N]|perf [tables|sweep|all]|v25 [STEP,...]" >&2
    exit 2
    ;;
esac
