#!/usr/bin/env bash
# Every GPU check in one call (steps 1-3 took about 6 minutes on an H100): DiT-XL/2 at 256x256, random weights, bf16.
#   1-2. bench/throughput.py at batch 1 and 8: our Fisher and forget loops against the official semantics,
#        samples/s, speedups, peak memory, model FLOP utilisation (and of the forget step alone at batch 8-64);
#   3.   forget.py at batch 2 with a saliency mask (from a short generate_fisher.py + generate_mask.py) on
#        synthetic images with the SD-VAE architecture: its peak GPU memory (the paper used a 24 GB RTX 4090);
#   4.   bench/memory.py at batch 1 and 8 (and 32 under bf16): the default recipe's memory by part, peak, checkpoint
#        size and time per step beside the official one's.
# Usage, from the repository root: bash bench/gpu_check.sh [work folder]
# (MODEL=DiT-S/8 IMAGE_SIZE=64 bash bench/gpu_check.sh runs the same checks small, e.g. on a CPU, as a rehearsal;
#  SMALL=1 also cuts the samples, steps and batch sizes.)
# The whole DiT-XL/2 run (2000 + 2000 Fisher samples, masks, 600 forget steps) is a second call:
#   python bench/full_run.py --reference-fisher-samples 16 --reference-forget-steps 8
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/sfron-gpu-check}
py=${PYTHON:-python}
model=${MODEL:-DiT-XL/2}
size=${IMAGE_SIZE:-256}
# SMALL=1 keeps every command but at the fewest samples, steps and batch sizes (the rehearsal's test runs it so).
if [ "${SMALL:-0}" = 1 ]; then
    fisher=(4 8) steps=2 mfu=(8) forget_steps=4 memory=(1) memory_bf16=(1 2)
else
    fisher=(16 64) steps=8 mfu=(8 32 64) forget_steps=20 memory=(1 8) memory_bf16=(1 8 32)
fi
if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
$py bench/throughput.py --model "$model" --image-size "$size" --batch-size 1 --fisher-samples "${fisher[0]}" \
    --forget-steps "$steps"
$py bench/throughput.py --model "$model" --image-size "$size" --batch-size 8 --fisher-samples "${fisher[1]}" \
    --forget-steps "$steps" --mfu-batch-sizes "${mfu[@]}"
$py bench/synthetic.py --out "$work" --model "$model" --image-size "$size" --classes 4 --images-per-class 16
data=(--model "$model" --data-path "$work/data" --ckpt "$work/dit.pt" --vae "$work/vae"
      --forget-class 0 --precision bf16 --results-dir "$work/results" --num-workers 4)
$py generate_fisher.py "${data[@]}" --batch-size 8 --n-iters 2 --mask-path "$work/mask" > /dev/null
$py generate_mask.py --mask-path "$work/mask" --forget-class 0 --thresholds 1
$py forget.py "${data[@]}" --batch-size 2 --n-iters "$forget_steps" --snapshot-every 0 --log-every 2 \
    --recipe official --forget-alpha 1e-3 --lr 1e-4 --mask-path "$work/mask" --threshold 1 \
    | grep -E "Saliency mask|Train Steps/Sec|Peak GPU memory|Done"
$py bench/memory.py --model "$model" --image-size "$size" --batch-sizes "${memory[@]}" --steps 2
$py bench/memory.py --model "$model" --image-size "$size" --batch-sizes "${memory_bf16[@]}" --steps 2 --precision bf16
