set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
R=$OUT/r1; mkdir -p $R
t0=$SECONDS
timeout 200 python3 -m pytest -q -m gpu -n 12 -p no:cacheprovider tests/test_sla.py "tests/test_gpu_backend.py::test_fused_plan_follows_the_selector_definition" > $R/tests.log 2>&1
echo "tests rc=$? $((SECONDS-t0)) s"; tail -4 $R/tests.log
t0=$SECONDS
timeout 120 python3 bench/sla_backward_timing.py > $R/sla_backward.log 2>&1
echo "timing rc=$? $((SECONDS-t0)) s"; cat $R/sla_backward.log | tail -28
for tool in memcheck racecheck; do
  t0=$SECONDS
  PSA_SANITIZE_LINEAR_ONLY=1 timeout 90 compute-sanitizer --tool $tool python3 bench/gpu.py --sanitize-target > $R/sanitize_$tool.log 2>&1
  echo "$tool rc=$? $((SECONDS-t0)) s"; tail -3 $R/sanitize_$tool.log
done
t0=$SECONDS
timeout 70 python3 bench/profile_sla_step.py --negligible 0.5 --rows 45 > $R/profile.log 2>&1
echo "profile rc=$? $((SECONDS-t0)) s"; sed -n '/== sla_vjp/,$p' $R/profile.log | head -30
