set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
R=$OUT/r2; mkdir -p $R
t0=$SECONDS
timeout 150 python3 -m pytest -q -m gpu -n 12 -p no:cacheprovider tests/test_sla.py -k "vjp or fused_key or linear_backward" > $R/tests.log 2>&1
echo "tests rc=$? $((SECONDS-t0)) s"; tail -3 $R/tests.log
t0=$SECONDS
timeout 100 python3 bench/sla_backward_timing.py > $R/sla_backward.log 2>&1
echo "timing rc=$? $((SECONDS-t0)) s"; grep -E "sla_vjp whole|linear side whole|linear gradients|the same, key" $R/sla_backward.log
for tool in memcheck racecheck; do
  t0=$SECONDS
  PSA_SANITIZE_LINEAR_ONLY=1 timeout 90 compute-sanitizer --tool $tool python3 bench/gpu.py --sanitize-target > $R/sanitize_$tool.log 2>&1
  echo "$tool rc=$? $((SECONDS-t0)) s"; tail -1 $R/sanitize_$tool.log
done
timeout 60 python3 bench/profile_sla_step.py --negligible 0.5 --rows 45 > $R/profile.log 2>&1
echo "profile rc=$?"; sed -n '/== sla_vjp/,$p' $R/profile.log | head -8
t0=$SECONDS
ONLY='p9|r50-d10-e5' PROFILE=0 LIMIT_S=200 WORK=/tmp/psa-reuse OUT=$R bash bench/reuse_search.sh > $R/reuse_search.out 2>&1
echo "reuse rc=$? $((SECONDS-t0)) s"; tail -8 $R/reuse_search.out
t0=$SECONDS
timeout 120 python3 bench/reuse_on_model.py --device cuda --out $R/reuse-model > $R/reuse_model.log 2>&1
echo "model rc=$? $((SECONDS-t0)) s"; grep -A9 "^## Totals" $R/reuse-model/reuse-on-model.md
