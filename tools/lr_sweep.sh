#!/usr/bin/env bash
# A learning-rate sweep: one train.py run per LR, each in its own workdir,
# then eval.py's few-shot protocol on each, and a table of the mIoUs.
#
# Why: the official release fixes no LR for the zero-shot runs; the author
# advises a sweep (lang-seg #36; see configs/fewshot_lsegzs.py).
#
#   tools/lr_sweep.sh CONFIG WORKDIR_BASE "LR1 LR2 ..." [train.py flags ...]
#   tools/lr_sweep.sh configs/fewshot_lsegzs.py:dataset=pascal5i,fold=0 /ckpt/sweep_p0 "3e-4 1e-3 3e-3" \
#     --config.input.manual_dir=/data/Datasets_HSN --config.init.resnet=/w/resnet101.pth
#
# Run k lands in WORKDIR_BASE/lr_<LR>; a finished run (its eval json exists)
# is skipped, so a killed sweep resumes where it stopped.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "error: usage: tools/lr_sweep.sh CONFIG WORKDIR_BASE \"LR1 LR2 ...\" [train.py flags ...]" >&2
  exit 2
fi
config=$1 base=$2 lrs=$3
shift 3
if [[ -z "${lrs// /}" ]]; then
  echo "error: no learning rates given (the third argument, e.g. \"1e-4 1e-3\")" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)

for lr in $lrs; do
  workdir="$base/lr_$lr"
  if [[ -f "$workdir/eval_fewshot_test.json" ]]; then
    echo "lr=$lr: done before, skipped"
    continue
  fi
  python "$root/train.py" --config "$config" --workdir "$workdir" --config.lr="$lr" "$@"
  python "$root/eval.py" --workdir "$workdir" --protocol fewshot
done

echo "lr mIoU FB-IoU"
for lr in $lrs; do
  python -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], r["mIoU"], r["FB-IoU"])' \
    "$base/lr_$lr/eval_fewshot_test.json" "$lr"
done
