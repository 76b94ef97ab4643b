#!/usr/bin/env bash
# Every GPU check in one call (about 6 minutes on an H100): DiT-XL/2 at 256x256 with random weights, bf16.
#   1-2. bench/throughput.py at batch 1 and 8: our Fisher and forget loops against the official semantics,
#        samples/s, speedups, peak memory, model FLOP utilisation;
#   3.   forget.py at batch 2 on synthetic images with the SD-VAE architecture: its peak GPU memory (the paper
#        used a 24 GB RTX 4090).
# Usage, from the repository root: bash bench/gpu_check.sh [work folder]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/sfron-gpu-check}
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$py bench/throughput.py --model DiT-XL/2 --image-size 256 --batch-size 1 --fisher-samples 16 --forget-steps 8
$py bench/throughput.py --model DiT-XL/2 --image-size 256 --batch-size 8 --fisher-samples 64 --forget-steps 8
$py bench/synthetic.py --out "$work" --model DiT-XL/2 --image-size 256 --classes 4 --images-per-class 16
$py forget.py --model DiT-XL/2 --data-path "$work/data" --ckpt "$work/dit.pt" --vae "$work/vae" --num-classes 1000 \
    --batch-size 2 --n-iters 20 --snapshot-every 0 --log-every 10 --precision bf16 --forget-class 0 \
    --forget-alpha 1e-3 --decay-forget-alpha --lr 1e-4 --results-dir "$work/results" --num-workers 4 \
    | grep -E "Train Steps/Sec|Peak GPU memory"
