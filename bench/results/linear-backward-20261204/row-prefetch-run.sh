set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q >/dev/null 2>&1
R=$OUT/r3; mkdir -p $R
t0=$SECONDS
timeout 200 python3 -m pytest -q -m gpu -n 12 -p no:cacheprovider tests/test_sla.py tests/test_gpu_backward.py -k "linear or sla or fused_key" > $R/tests.log 2>&1
echo "tests rc=$? $((SECONDS-t0)) s"; tail -3 $R/tests.log
timeout 100 python3 bench/sla_backward_timing.py > $R/sla_backward.log 2>&1
echo "timing rc=$?"; grep -E "sla_vjp whole|linear side whole|forward states|linear gradients|the same, key" $R/sla_backward.log
for tool in memcheck racecheck; do
  PSA_SANITIZE_LINEAR_ONLY=1 timeout 90 compute-sanitizer --tool $tool python3 bench/gpu.py --sanitize-target > $R/sanitize_$tool.log 2>&1
  echo "$tool rc=$?"; tail -1 $R/sanitize_$tool.log
done
timeout 60 python3 bench/profile_sla_step.py --negligible 0.5 --rows 45 > $R/profile.log 2>&1
echo "profile rc=$?"; sed -n '/== sla_vjp/,$p' $R/profile.log | grep -E "linear_|kernel time"
timeout 90 python3 bench/profile_reuse_host.py > $R/reuse_host.log 2>&1
echo "host rc=$?"; head -40 $R/reuse_host.log
