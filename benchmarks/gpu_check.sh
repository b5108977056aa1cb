#!/usr/bin/env bash
# Every GPU check in one prepared run, for the GPU machine that is lent for minutes at a time:
#   1. pytest -m gpu (tests/test_gpu.py): the CUDA paths against the CPU, bf16 against fp32, resident data,
#      exact resume with the CUDA random state, the evaluate stage's NLL on CUDA;
#   2. training throughput (benchmarks/train_throughput.py --full): the common torchvision pipeline and this
#      project's loop side by side, the card's own limits, the FLOP/s achieved;
#   3. evaluation: the K=1000 importance-sampled NLL of CelebA-64's 19,962 test images through the evaluate
#      stage's own code;
#   4. torch.compile of the conv VAE against eager, cold and warm cache (the figures that would set
#      train.compile: auto on GPUs, which stays eager until they are measured: pipeline/train_plan.py).
# Each step runs under its own timeout, writes its log (and figures) into OUT, and a failed step does not stop
# the next; OUT/summary.txt lists each step's exit status and seconds.
#
#   benchmarks/gpu_check.sh OUT                # on the GPU machine (after installing the wheels it lacks)
#   benchmarks/gpu_check.sh OUT --dry-run      # the same steps on the CPU, tiny sizes (a few minutes)
#
# The GPU machine has torch but no pydantic, mlflow, ray or dvc: the measured code imports pydantic (the
# params) and mlflow (tracking helpers import it lazily), so carry their wheels (shared/ENV-NOTES.md).
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT [--dry-run]}
mode=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python

if [ "$mode" = "--dry-run" ]; then
  export VAE_TEST_DEVICE=cpu VAE_TEST_BF16_STEPS=16
  device=cpu
  sizes=(--train-images 512 --valid-images 64 --epochs 1 --extra-batch-sizes 64 --baseline-jpegs 64
         --baseline-steps 4 --mlp-images 2048 --repeats 1 --eval-images 16 --trials 1 --trial-images 256
         --num-importance-samples 8)
  limits=(300 300 120 300)
else
  device=cuda
  sizes=(--full)
  limits=(180 420 150 120)
fi
: > "$out/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...: run it, log it, record its status; never stop the script
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  echo "$name exit=$status seconds=$((SECONDS - started))" | tee -a "$out/summary.txt"
  tail -n 5 "$out/$name.log"
}

{ echo "device=$device python=$python"; "$python" -c 'import torch, sys; print("torch", torch.__version__,
  "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; } > "$out/machine.txt" 2>&1

step 1-gpu-tests "${limits[0]}" "$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  -o addopts="-ra --strict-markers" --junitxml="$out/gpu-tests.xml"
step 2-training "${limits[1]}" "$python" benchmarks/train_throughput.py --device "$device" "${sizes[@]}" \
  --parts loop,celeba,limits --no-record --json "$out/training.json"
step 3-evaluation "${limits[2]}" "$python" benchmarks/train_throughput.py --device "$device" "${sizes[@]}" \
  --parts evaluation --no-record --json "$out/evaluation.json"
step 4-compile "${limits[3]}" "$python" benchmarks/train_throughput.py --device "$device" "${sizes[@]}" \
  --parts compile --compile-models conv --repeats 1 --no-record --json "$out/compile.json"
cat "$out/summary.txt"
