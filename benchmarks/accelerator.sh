#!/usr/bin/env bash
# What the first lent GPU measures, in one run of under 8 minutes on one H100/H200:
#   bash benchmarks/accelerator.sh           # ViT-L/16 @480 bf16 on the accelerator
#   bash benchmarks/accelerator.sh --smoke   # the tiny model on the CPU backend, ~30 s (tests run this)
# Prints JSON lines (stdout only; progress goes to stderr):
#   train_step_memory  per-device memory of the compiled step (XLA buffer assignment)
#   train_step         one per batch tried: step time, images/s/device, MFU (analytic FLOPs)
#   train_step_best    the train_step line with the highest MFU
#   input_pipeline     images/s of the real training transforms (480 crops)
#   eval_multiscale    multi-scale evaluation images/s (host and on-device paths)
# A batch that fails (out of memory, say) prints a train_step line with "error"
# and the sweep goes on; cudnn attention falls back to xla where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--smoke" ]]; then
  model=tiny size=64 labels=5 dtype=float32 remat=none batches="2" steps=1
  attentions="plain" peak=(--peak_tflops 1)  # a CPU has no known peak: a nominal 1 TFLOP/s
  input_args=(--crop 64 --batch 2 --workers 0 --warmup 1 --steps 2)
  eval_args=(--model tiny --labels 5 --images 1 --size 240,320)
else
  model=clip_vitl16_384 size=480 labels=150 dtype=bfloat16 remat=none batches="${BATCHES:-16 32}" steps=5
  attentions="${ATTENTION:-cudnn xla}" peak=()
  input_args=(--crop 480 --batch 16 --workers "$(( $(nproc) / 2 ))" --warmup 5 --steps 40)
  eval_args=(--model clip_vitl16_384 --labels 150 --images 4)
fi
step_args=(--model "$model" --size "$size" --labels "$labels" --dtype "$dtype" --remat "$remat")
steps_out="$(mktemp)"
trap 'rm -f "$steps_out"' EXIT

echo "accelerator.sh: compiled memory of the train step" >&2
python benchmarks/train_step.py --memory_only "${step_args[@]}" --batch "${batches%% *}"

for batch in $batches; do
  line=""
  for attention in $attentions; do
    echo "accelerator.sh: train step, batch $batch, $attention attention" >&2
    if line="$(python benchmarks/train_step.py "${step_args[@]}" --batch "$batch" --attention "$attention" \
               --steps "$steps" "${peak[@]}" | tail -n 1)"; then
      break
    fi
    line="{\"benchmark\": \"train_step\", \"batch\": $batch, \"attention\": \"$attention\", \"error\": \"failed (see stderr)\"}"
  done
  echo "$line" | tee -a "$steps_out"
done
python - "$steps_out" <<'PY'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
ok = [s for s in steps if "error" not in s]
if ok:
  best = max(ok, key=lambda s: (s["mfu"] or 0, s["images_per_s_per_device"]))
  print(json.dumps({**best, "benchmark": "train_step_best"}))
PY

echo "accelerator.sh: input pipeline" >&2
python benchmarks/input_pipeline.py "${input_args[@]}"
echo "accelerator.sh: evaluation" >&2
python benchmarks/eval.py "${eval_args[@]}"
