#!/usr/bin/env bash
# GPU figures of plan reuse along the Wan2.1-480p denoising trajectory and of the per-method
# sweep (docs/choosing.rst), in one call on the GPU machine, about 4 minutes in all.
#
# Usage there, from the repository root, after the device session's setup (PYTHONPATH holding
# the repository, the C++ extension built; the kernel cache warm from `pytest -m gpu` saves
# the NVRTC compiles):
#     bash bench/gpu_workloads.sh
# Results: $OUT/workloads/workloads.tgz (everything, laid out as bench/results/: unpack with
# `tar -C bench/results -xzf workloads.tgz`) and $OUT/workloads/summary.md (printed last).
# Only two files come back because the device returns at most 8 files per call.
#
# Steps, in priority order, each under its own time limit (figures of a step cut short stay:
# the reuse records are written step by step):
#   1. reuse: 50 steps, bf16, B=1, H=12, N=32760, D=128, 128x64 tiles, five PlanReuse
#      variants on the same tensors (docs/reuse.rst says why these);
#   2. sweep: the docs grid of every method on mixed-wan2.1-480p, then export and compare;
#   3. reuse on the same trajectory without its diffuse heads, if time is left.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# The repository and, when the device session unpacked carried wheels there, /tmp/site.
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if ! "$PY" -c "import array_api_compat" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
STAMP=$(date -u +%Y%m%dT%H%M%S)
WORK=${WORK:-/tmp/psa-workloads}/$STAMP
DEST=${OUT:-/tmp}/workloads
BUDGET_S=${BUDGET_S:-235}
# The figures' settings; the overrides exist for a quick check of this script on a CPU.
BACKEND=${BACKEND:-cupy} DTYPE=${DTYPE:-bfloat16} BLOCK=${BLOCK:-128x64}
SHAPE=${SHAPE:-wan2.1-1.3b-480p} STEPS=${STEPS:-50} ERROR_TILES=${ERROR_TILES:-8}
SWEEP_WORKLOAD=${SWEEP_WORKLOAD:-mixed-wan2.1-480p}
mkdir -p "$WORK" "$DEST"
LOG="$WORK/gpu-workloads-$STAMP.log"
start=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - start))); }

run_step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, $limit s left" | tee -a "$LOG"; return; fi
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain 2>/dev/null | grep -q . && echo +dirty)" | tee -a "$LOG"

# 1. Plan reuse. "docs" is the page's example; the "late*" ones spend the first 20
# (noise-dominated) steps dense, where no rule can skip anything and the rule kernel costs
# more than dense, then refresh Recall(0.8) plans every 5 steps: peak order, no dilation
# (late); one-tile dilation (late-m1); natural order (late-natural); no rule inside the
# reused plans and no guard (late-plain: the plain kernel's speed between refreshes).
PLAIN=mass-budget=none,kept-tolerance=none,rule-in-plan=false
REUSE=(-m pysparse_attn.bench reuse --backend "$BACKEND" --dtype "$DTYPE" --shape "$SHAPE"
       --steps "$STEPS" --block "$BLOCK" --error-tiles "$ERROR_TILES" --repeat 3
       --skip recall:0.8)  # also the "rule alone" comparison: Recall(0.8) over every tile
run_step reuse $(( $(left) < 150 ? $(left) : 150 )) "$PY" "${REUSE[@]}" \
  -o "$WORK/reuse-gpu-$STAMP" \
  --variant docs:skip=recall:0.95,dense-steps=2,refresh-every=5,margin=1 \
  --variant late:skip=recall:0.8,dense-steps=20,refresh-every=5,margin=0 \
  --variant late-m1:skip=recall:0.8,dense-steps=20,refresh-every=5,margin=1 \
  --variant late-natural:skip=recall:0.8,dense-steps=20,refresh-every=5,margin=0,order=natural \
  --variant late-plain:skip=recall:0.8,dense-steps=20,refresh-every=5,margin=0,$PLAIN

# 2. The method sweep at a Wan shape (4 heads: one of each kind), its export for the docs and
# its tables and figures.
SWEEP="$WORK/sweep-gpu-$STAMP.jsonl"
run_step sweep $(( $(left) < 75 ? $(left) : 75 )) "$PY" -m pysparse_attn.bench sweep \
  --backend "$BACKEND" --dtype "$DTYPE" --block "$BLOCK" --grid docs -w "$SWEEP_WORKLOAD" \
  --no-progress -o "$SWEEP"
if [ -s "$SWEEP" ]; then
  "$PY" -m pysparse_attn.bench export "$SWEEP" -o "$WORK/methods-gpu-$STAMP.jsonl" >>"$LOG" 2>&1
  "$PY" -m pysparse_attn.bench compare "$SWEEP" >"$WORK/sweep-gpu-$STAMP.md" 2>>"$LOG"
  "$PY" -m pysparse_attn.bench plot "$SWEEP" -o "$WORK/sweep-gpu-$STAMP-plots" \
    --format png >>"$LOG" 2>&1
fi

# 3. Without the diffuse heads (a quarter of the heads, whose plans stay full by design).
run_step reuse-structured $(( $(left) - 15 )) "$PY" "${REUSE[@]}" \
  -o "$WORK/reuse-gpu-$STAMP-structured" --kinds local+temporal+global \
  --variant late:skip=recall:0.8,dense-steps=20,refresh-every=5,margin=0 \
  --variant late-plain:skip=recall:0.8,dense-steps=20,refresh-every=5,margin=0,$PLAIN

# Summary: the totals of every reuse run and the sweep's matched-error table.
SUMMARY="$WORK/summary.md"
{
  echo "# GPU workloads $STAMP ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  echo
  for f in "$WORK"/reuse-gpu-*-variants.md; do
    [ -f "$f" ] || continue
    echo "## $(basename "$f" .md)"
    grep -E '^(\* `|\| )' "$f" | grep -vE '^\| [0-9]+ \| ' | sed -n '1,12p'
    echo
  done
  for f in "$WORK"/reuse-gpu-*.jsonl; do  # a run cut short has no summary: say how far it got
    grep -q '"type": "summary"' "$f" || echo "* $(basename "$f"): stopped after $(grep -c '"type": "step"' "$f") steps"
  done
  if [ -f "$WORK/sweep-gpu-$STAMP.md" ]; then
    echo "## sweep (matched error, ranked by speedup)"
    sed -n '1,40p' "$WORK/sweep-gpu-$STAMP.md"
  fi
  echo
  grep -E '^(reuse|sweep|reuse-structured): ' "$LOG"
  echo "total $((SECONDS - start)) s"
} >"$SUMMARY"
tar czf "$DEST/workloads.tgz" -C "$WORK" .
cp "$SUMMARY" "$DEST/summary.md"
cat "$SUMMARY"
