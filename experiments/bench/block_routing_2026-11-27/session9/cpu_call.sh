#!/bin/bash
# The queries' gradient as one batched matmul (dw_bmm.patch, in fast/route.py since 2026-12-08) against the 25
# matmuls and adds before it, on one GPU in one call (about 5 minutes):
#   1. the GPU tests of main's tree;
#   2. a compiled step of a tiny model (12 x 64, 8 tokens) on the GPU, whose wall time is the host's time a step:
#      standard, attnres block, delta block, before and after (session4/cpu_compiled.py --real);
#   3. bench.py at 12 x 512 (B=16, where a slow host sets the step) with GPU busy times, before and after.
# From the repository's root:
#   bash experiments/bench/block_routing_2026-11-27/session9/cpu_call.sh OUT_DIR
set -u
out=$(mkdir -p "${1:?an output folder}" && cd "$1" && pwd)  # absolute: the runs below cd into the trees
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
date -u
rm -rf /tmp/before && mkdir /tmp/before && cp -r *.py fast /tmp/before/ && (cd /tmp/before && patch -s -R -p1 < "$here/dw_bmm.patch") || exit 1
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_fastroute.py -k cuda 2>&1 | tail -2
tiny=$(cd "$here/../session4" && pwd)/cpu_compiled.py
for t in /tmp/before .; do
  echo "tiny compiled step, $t"; (cd $t && python "$tiny" standard,attnres_block,delta_block --cuda --real 2>&1 | grep 'a step')
done
B="--variants=standard,attnres_block,delta_block --n_layer=12 --n_embd=512 --n_head=8 --route_steps=0 --warmup=6 --steps=20"
for t in before after; do
  d=$([ $t = before ] && echo /tmp/before || echo .)
  (cd $d && python bench.py $B --profile=True --json="$out/h100_12x512_block_$t.json" 2>&1 | tail -4)
done
python - "$out" <<'PY'
import json, sys
for t in ('before', 'after'):
    for r in json.load(open(f'{sys.argv[1]}/h100_12x512_block_{t}.json'))['variants']:
        print(t, r['variant'], {k: r.get(k) for k in ('ms_per_step', 'gpu_ms_per_step', 'peak_mem_mb', 'warmup_s')})
PY
date -u
