#!/usr/bin/env bash
# A search over PlanReuse settings on the Wan2.1-480p denoising trajectory (bf16, B=1, H=12,
# N=32760, D=128, 128x64 tiles, 50 steps), all variants on the same tensors in one run, then
# bench/profile_reuse_step.py (where a reused and a refresh call's time goes).
#
# Usage on the GPU machine, from the repository root (PYTHONPATH holding the repository):
#     bash bench/reuse_search.sh
# ONLY (an extended regex over the labels, e.g. 'p9|r50-d10-e5') runs a subset of the
# variants; PROFILE=0 leaves out the profile.
# Results: $OUT/reuse-search.tgz (the records, laid out for bench/results/) and the variants'
# totals, printed last.
#
# The variants differ in the recall target of their refreshes, their dense leading steps,
# their refresh interval and the plan a refresh runs the rule over (every tile, or TopP's:
# the "p*" ones, added after the 2026-12-04 run); the "r*" ones run without the rule inside reused plans and without
# the device-side guard (the plain kernel between refreshes: the fastest reuse on the GPU,
# measured 2026-12-02), the "g-*" ones with both. The figures say which settings the error
# budget (mean rel. L2 <= 1%, no step above 3%) allows.
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%S)
WORK=${WORK:-/tmp/psa-reuse}/$STAMP
DEST=${OUT:-/tmp}
LIMIT_S=${LIMIT_S:-380}
BACKEND=${BACKEND:-cupy} DTYPE=${DTYPE:-bfloat16} BLOCK=${BLOCK:-128x64}
SHAPE=${SHAPE:-wan2.1-1.3b-480p} STEPS=${STEPS:-50} ERROR_TILES=${ERROR_TILES:-8}
mkdir -p "$WORK" "$DEST"
LOG="$WORK/reuse-search-$STAMP.log"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain 2>/dev/null | grep -q . && echo +dirty)" | tee -a "$LOG"
P=mass-budget=none,kept-tolerance=none,rule-in-plan=false,margin=0
G=mass-budget=0.02,kept-tolerance=0.1,rule-in-plan=true,margin=0
variants=()
# label:recall target,dense steps,refresh interval,settings (P: plain, G: guarded),refresh plan
# (the selector a refresh runs the rule over: none = every tile)
for spec in r80-d20-e5:0.8,20,5,P,none r80-d10-e5:0.8,10,5,P,none r70-d10-e5:0.7,10,5,P,none \
            r60-d10-e5:0.6,10,5,P,none r50-d10-e5:0.5,10,5,P,none r60-d5-e5:0.6,5,5,P,none \
            r60-d10-e10:0.6,10,10,P,none r50-d5-e10:0.5,5,10,P,none r40-d5-e5:0.4,5,5,P,none \
            r60-d0-e5:0.6,0,5,P,none g-r60-d10-e5:0.6,10,5,G,none g-r50-d10-e10:0.5,10,10,G,none \
            p90-r50-d10-e5:0.5,10,5,P,topp:0.9 p97-r50-d10-e5:0.5,10,5,P,topp:0.97; do
  label=${spec%%:*}; IFS=, read -r target dense every kind select <<<"${spec#*:}"
  [ -n "${ONLY:-}" ] && ! grep -qE "${ONLY}" <<<"$label" && continue
  settings=$P; [ "$kind" = G ] && settings=$G
  variants+=(--variant "$label:skip=recall:$target,dense-steps=$dense,refresh-every=$every,select=$select,$settings")
done
t0=$SECONDS
timeout --kill-after=5 "$LIMIT_S" "$PY" -m pysparse_attn.bench reuse --backend "$BACKEND" \
  --dtype "$DTYPE" --shape "$SHAPE" --steps "$STEPS" --block "$BLOCK" \
  --error-tiles "$ERROR_TILES" --repeat 3 --skip recall:0.8 -o "$WORK/reuse-gpu-$STAMP" \
  "${variants[@]}" >>"$LOG" 2>&1
echo "reuse: rc=$? in $((SECONDS - t0)) s (limit $LIMIT_S s)" | tee -a "$LOG"
if [ "$BACKEND" = cupy ] && [ "${PROFILE:-1}" != 0 ]; then
  timeout 150 "$PY" bench/profile_reuse_step.py >"$WORK/profile-reuse-step-$STAMP.txt" 2>&1
  echo "profile: rc=$?" | tee -a "$LOG"
fi
tar czf "$DEST/reuse-search.tgz" -C "$WORK" .
for f in "$WORK"/reuse-gpu-*.jsonl; do
  grep -q '"type": "summary"' "$f" || echo "* $(basename "$f"): stopped after $(grep -c '"type": "step"' "$f") steps"
done
grep -E '^(\| )' "$WORK/reuse-gpu-$STAMP-variants.md" 2>/dev/null | grep -vE '^\| [0-9]+ \| '
tail -12 "$WORK/profile-reuse-step-$STAMP.txt" 2>/dev/null
