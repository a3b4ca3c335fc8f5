#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, sanitizers, then the benchmarks asked for.
# Usage there: [STAGES=tests,sanitize,public,...] bash bench/device_session.sh [pytest -k expr]
# Stages (comma list, default "tests,sanitize,public"):
#   tests      pytest -m gpu (TEST_S seconds; TEST_FILES to narrow)
#   ws         the sm90_ws forward alone: a smoke run under a short timeout, then its tests and
#              sanitizers (narrow the others with "not sm90_ws" and PSA_SANITIZE_KERNELS)
#   sanitize   compute-sanitizer memcheck + racecheck on every kernel instance (bench/gpu.py)
#   public     bench/public_call.py: the public calls beside the kernels and the anchors
#   backward   bench/gpu.py --steps backward: the backward kernels beside cuDNN / SLA
#              (BWD_STEPS=backward,backward_shapes adds 90% sparsity, D = 64, H = 40 N = 75,600)
#   ablation   bench/forward_ablation.py: leave-one-out variants of the Hopper forward
#   compare    bench/forward_ablation.py --mode compare: the sm90_ws kernel against wgmma
#   schedule   bench/forward_ablation.py --mode schedule: sm90_ws's consumer schedules
#   rule-cost  bench/forward_ablation.py --mode rule-cost: where a rule that skips nothing
#              loses its time in sm90_ws (timing-only variants; a smoke run gates it)
#   workloads  bench/gpu_workloads.sh: plan reuse over a trajectory, the method sweep
#   train      bench/train_step.py and bench/finetune_sla.py (TRAIN_S=0 / FT_S=0 leave one out;
#              FT_ARGS adds options to the fine-tune)
#   sla_backward  bench/sla_backward_timing.py: sla_vjp whole and its pieces
#   profile    bench/profile_sla_step.py: kernel-by-kernel time of the SLA step and of sla_vjp
# Needs the wheels carried in .whl/ (array-api-compat; diffusers for the adapters), and .peers/.
# Writes logs under $OUT and everything else in $OUT/results.tgz.
set -u
export PYTHONUNBUFFERED=1
RES=/tmp/psa-results; mkdir -p "$RES"
STAGES=",${STAGES:-tests,sanitize,public},"
want() { case "$STAGES" in *",$1,"*) return 0;; esac; return 1; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 setup.py build_ext --inplace -q > "$RES/build.log" 2>&1 || echo "extension build failed"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null
SELECT=${1:-}
if want tests; then
  stamp tests
  timeout "${TEST_S:-300}" python3 -m pytest -q -m gpu -n "${TEST_N:-8}" -p no:cacheprovider \
    ${SELECT:+-k "$SELECT"} ${TEST_FILES:-tests} > "$RES/gpu-tests.log" 2>&1
  echo "gpu tests rc=$?: $(grep -E '(passed|failed|error)' "$RES/gpu-tests.log" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$RES/gpu-tests.log" | cut -c1-240 | head -40
  cp "$RES/gpu-tests.log" "$OUT/" 2>/dev/null
fi
if want ws; then
  # The warp-specialised forward on its own: a hang in its mbarrier handshakes must not stall
  # the other stages, so a smoke run under a short timeout gates its tests and sanitizers.
  stamp ws
  timeout "${WS_SMOKE_S:-60}" python3 bench/forward_ablation.py --mode smoke > "$RES/ws-smoke.log" 2>&1
  rc=$?; echo "sm90_ws smoke rc=$rc"; tail -8 "$RES/ws-smoke.log"
  if [ $rc -eq 0 ]; then
    timeout "${WS_TEST_S:-120}" python3 -m pytest -q -m gpu -n "${TEST_N:-8}" -p no:cacheprovider \
      -k sm90_ws tests > "$RES/ws-tests.log" 2>&1
    echo "sm90_ws tests rc=$?: $(grep -E '(passed|failed|error)' "$RES/ws-tests.log" | tail -1)"
    grep -E "^(FAILED|ERROR)" "$RES/ws-tests.log" | cut -c1-240 | head -20
    mkdir -p "$RES/ws-sanitize"
    PSA_SANITIZE_KERNELS=sm90_ws PSA_SANITIZE_FORWARD_ONLY=1 timeout "${WS_SAN_S:-120}" python3 bench/gpu.py --steps sanitize \
      --out "$RES/ws-sanitize" > "$RES/ws-sanitize.log" 2>&1
    tail -3 "$RES/ws-sanitize.log"
  fi
fi
if want sanitize; then
  stamp sanitize
  timeout "${SAN_S:-200}" python3 bench/gpu.py --steps sanitize --out "$RES" > "$RES/sanitize.log" 2>&1
  tail -4 "$RES/sanitize.log"
fi
if want backward && [ -f bench/gpu.py ]; then
  stamp backward
  timeout "${BWD_S:-150}" python3 bench/gpu.py --steps "${BWD_STEPS:-backward}" --out "$RES" > "$RES/backward.log" 2>&1
  tail -30 "$RES/backward.log"
fi
if want ablation && [ -f bench/forward_ablation.py ]; then
  stamp ablation
  timeout "${ABL_S:-120}" python3 bench/forward_ablation.py --out "$RES" > "$RES/ablation.log" 2>&1
  tail -30 "$RES/ablation.log"
fi
if want schedule; then
  stamp schedule
  timeout "${SCHED_S:-240}" python3 bench/forward_ablation.py --mode schedule ${SCHED_ARGS:-} --out "$RES" > "$RES/schedule.log" 2>&1
  grep -A60 "^| case" "$RES/schedule.log" || tail -40 "$RES/schedule.log"
fi
if want rule-cost; then
  stamp rule-cost
  timeout "${WS_SMOKE_S:-60}" python3 bench/forward_ablation.py --mode smoke > "$RES/ws-smoke.log" 2>&1 \
    && timeout "${RULE_COST_S:-200}" python3 bench/forward_ablation.py --mode rule-cost --out "$RES" \
      > "$RES/rule-cost.log" 2>&1
  echo "rule-cost rc=$?"; grep -B2 -A6 "^| rule |" "$RES/rule-cost.log" || tail -30 "$RES/rule-cost.log"
fi
if want compare && [ -f bench/forward_ablation.py ]; then
  stamp compare
  timeout "${CMP_S:-150}" python3 bench/forward_ablation.py --mode compare ${CMP_ARGS:-} --out "$RES" > "$RES/compare.log" 2>&1
  tail -30 "$RES/compare.log"
fi
if want public; then
  stamp public
  timeout "${BENCH_S:-200}" python3 bench/public_call.py --out "$RES" > "$RES/public.log" 2>&1
  tail -40 "$RES/public.log"
fi
if want workloads && [ -f bench/gpu_workloads.sh ]; then
  stamp workloads
  OUT=$RES timeout "${WORK_S:-260}" bash bench/gpu_workloads.sh > "$RES/workloads.log" 2>&1
  tail -40 "$RES/workloads.log"
fi
if want train; then
  stamp train
  [ -f bench/train_step.py ] && [ "${TRAIN_S:-120}" -gt 0 ] && timeout "${TRAIN_S:-120}" python3 bench/train_step.py \
    --out "$RES" > "$RES/train_step.log" 2>&1; tail -20 "$RES/train_step.log" 2>/dev/null
  [ -f bench/finetune_sla.py ] && [ "${FT_S:-260}" -gt 0 ] && timeout "${FT_S:-260}" python3 bench/finetune_sla.py \
    --device cuda ${FT_ARGS:-} --out "$RES" > "$RES/finetune.log" 2>&1; tail -25 "$RES/finetune.log" 2>/dev/null
fi
if want sla_backward && [ -f bench/sla_backward_timing.py ]; then
  stamp sla_backward
  timeout "${SLA_BACKWARD_S:-240}" python3 bench/sla_backward_timing.py > "$RES/sla_backward.log" 2>&1
  tail -24 "$RES/sla_backward.log"
fi
if want profile && [ -f bench/profile_sla_step.py ]; then
  stamp profile
  timeout "${PROFILE_S:-120}" python3 bench/profile_sla_step.py > "$RES/profile.log" 2>&1
  tail -110 "$RES/profile.log"
fi
stamp done
cp "$RES"/*.log "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$RES" .
