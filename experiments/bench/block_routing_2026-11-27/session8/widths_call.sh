#!/bin/bash
# The block forms at 24 x 1024 (GPT-2 medium's shape, B=8) and 12 x 512 (B=16), then all seven at 124M, on one GPU in
# one call (ratios to standard in the same bench.py run). From the repository's root:
#   bash experiments/bench/block_routing_2026-11-27/session8/widths_call.sh OUT_DIR [124m]
set -u
out=${1:?an output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
date -u
V=standard,attnres_block,delta_block
python bench.py --variants=$V --n_layer=24 --n_embd=1024 --n_head=16 --batch_size=8 --route_steps=0 --warmup=6 --steps=20 \
  --json="$out/h100_24x1024_block.json" 2>&1 | tail -5
python bench.py --variants=$V --n_layer=12 --n_embd=512 --n_head=8 --route_steps=0 --warmup=6 --steps=20 \
  --json="$out/h100_12x512_block.json" 2>&1 | tail -5
date -u
if [ "${2:-}" = 124m ]; then
  python bench.py --warmup=5 --steps=15 --route_variant=attnres_block --json="$out/h100_124m_all.json" 2>&1 | tail -11
  date -u
fi
