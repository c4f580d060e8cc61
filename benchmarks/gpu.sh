#!/usr/bin/env bash
# The GPU numbers in one run (about 10 minutes on an H200; run the items you need if the time is short): the full-size train step (float32 and bfloat16, batch 8
# and 32, and the CPU-tuned layer forms at batch 8), both forms of every convolution kind, the loop-overhead
# benchmark on the demo and the input pipeline.
#
#   bash benchmarks/gpu.sh [out_dir]        (default out_dir: gpu_results)
#
# Environment: PYTHON (default python3); DATA_DIR, a TFDS data_dir holding reid_toy (default: the config's,
# where the demo builds it on first use); ORIGINAL, a command that times another implementation's step and
# ends with one JSON line, run with --batch_size N [--amp bf16] for a side-by-side comparison.
# Each benchmark's last JSON line goes to <out_dir>/results.jsonl as {"name", "seconds", "result"} (or "rc"
# when it failed or ran past its time limit); everything printed goes to <out_dir>/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
mkdir -p "$out"
results=$out/results.jsonl
log=$out/log.txt
py=${PYTHON:-python3}
data_dir=${DATA_DIR:+--data_dir=$DATA_DIR}
export PYTHONUNBUFFERED=1

run() {  # run <name> <time limit in seconds> <command...>
  local name=$1 limit=$2 start last rc
  shift 2
  echo "=== $name: $*" | tee -a "$log"
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/current.txt" 2>>"$log"
  rc=$?
  cat "$out/current.txt" >>"$log"
  last=$(tail -n 1 "$out/current.txt")
  if [ "$rc" -eq 0 ] && [[ $last == \{* ]]; then
    echo "{\"name\": \"$name\", \"seconds\": $(($(date +%s) - start)), \"result\": $last}" >>"$results"
  else
    echo "{\"name\": \"$name\", \"seconds\": $(($(date +%s) - start)), \"rc\": $rc}" >>"$results"
  fi
  tail -n 4 "$out/current.txt" | head -n 3
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee -a "$log"

step="benchmarks/train_step.py --config=configs/gta2duke.py --steps=20 --matmul_size=8192 --json"
original() { [ -z "${ORIGINAL:-}" ] || run "original $1" 150 $ORIGINAL "${@:2}" --warmup 3 --json; }
run "step float32 b8" 180 "$py" $step --batch_size=8 --dtype=float32
original "float32 b8" --batch_size 8 --steps 20
run "step bfloat16 b8" 180 "$py" $step --batch_size=8 --dtype=bfloat16
original "bf16-autocast b8" --batch_size 8 --steps 20 --amp bf16
run "loop overhead demo" 240 "$py" benchmarks/loop_overhead.py --steps=300 $data_dir --json
run "loop overhead demo, 8 workers" 240 "$py" benchmarks/loop_overhead.py --steps=300 $data_dir \
  --config.data.num_workers=8 --nocached --json
run "step float32 b32" 180 "$py" $step --batch_size=32 --dtype=float32
run "step bfloat16 b32" 180 "$py" $step --batch_size=32 --dtype=bfloat16
original "float32 b32" --batch_size 32 --steps 10
run "step float32 b8 conv_impl=cpu" 180 "$py" $step --batch_size=8 --dtype=float32 --config.model.conv_impl=cpu
run "conv forms float32 b8" 180 "$py" benchmarks/conv_forms.py --batch_size=8 --json
run "input pipeline" 180 "$py" benchmarks/input_pipeline.py --steps=200 --workers=0,4,8 --json
rm -f "$out/current.txt"
echo "=== done" | tee -a "$log"
