#!/usr/bin/env bash
# 1-node N-GPU smoke run of `torchrun ... -m dopd train` (NCCL, rank r on cuda:r): the embedded task at its
# tiny size, 4 steps, bf16 mixed precision, once with --parallel ddp and once with fsdp, then a resume of the
# fsdp run to 6 steps. Prints each run's last metrics row. Record what it prints in bench/RESULTS.md.
#
#   bash bench/gpu_dist_smoke.sh            # all GPUs of this node; writes under $OUT if set, else bench/out/
#   NPROC=2 bash bench/gpu_dist_smoke.sh    # fewer GPUs (2 prompts per rank per step either way)
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-bench/out}/dist_smoke"
mkdir -p "$out_dir"
nproc="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
[ "$nproc" -ge 1 ] || { echo "gpu_dist_smoke: torch sees no CUDA device" >&2; exit 2; }
export DOPD_CACHE="$out_dir/cache"
prompts=$((2 * nproc))  # the tiny run's 2 prompts per step must divide by the ranks: 2 per rank instead
for parallel in ddp fsdp; do
    echo "== torchrun --nproc_per_node $nproc -m dopd train --parallel $parallel =="
    torchrun --standalone --nproc_per_node "$nproc" -m dopd train --task-size tiny --max-steps 4 --save-every 2 \
        --prompts-per-step "$prompts" \
        --dtype bfloat16 --parallel "$parallel" --no-progress --output-dir "$out_dir/$parallel" 2>&1 \
        | tee "$out_dir/$parallel.log"
    tail -n 2 "$out_dir/$parallel/metrics.jsonl"
done
echo "== resume the fsdp run to step 6 =="
torchrun --standalone --nproc_per_node "$nproc" -m dopd train --task-size tiny --max-steps 6 --dtype bfloat16 \
    --prompts-per-step "$prompts" \
    --parallel fsdp --no-progress --resume --output-dir "$out_dir/fsdp" 2>&1 | tee "$out_dir/fsdp-resume.log"
tail -n 2 "$out_dir/fsdp/metrics.jsonl"
