#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, sanitizers on every kernel, public-call timings.
# Usage there: bash bench/device_session.sh [pytest -k expression]   (writes under $OUT)
# Needs the array-api-compat wheel carried in .whl/ (the image lacks it).
set -u
export PYTHONUNBUFFERED=1
RES=/tmp/psa-results; mkdir -p "$RES"
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
timeout "${TEST_S:-300}" python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider ${SELECT:+-k "$SELECT"} \
  tests > "$RES/gpu-tests.log" 2>&1
echo "gpu tests rc=$?: $(grep -E '(passed|failed|error)' "$RES/gpu-tests.log" | tail -1)"
grep -E "^(FAILED|ERROR)" "$RES/gpu-tests.log" | cut -c1-220 | head -40
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout "${SAN_S:-200}" python3 bench/gpu.py --steps sanitize --out "$RES" 2>&1 | tail -3
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout "${BENCH_S:-200}" python3 bench/public_call.py --out "$RES" 2>&1 | tail -40
fi
if [ "${SLA_BACKWARD:-1}" = 1 ]; then  # sla_vjp whole and its pieces at the Wan shape
  timeout "${SLA_BACKWARD_S:-240}" python3 bench/sla_backward_timing.py 2>&1 \
    | tee "$RES/sla_backward.txt" | tail -16
fi
cp "$RES/gpu-tests.log" "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$RES" .
