#!/bin/bash
# Delta's read making the standard stream x + out itself (delta_stream_add.patch), and on top of it returning h in
# bf16 (delta_bf16_h.patch), against main's fast/route.py, on one GPU in one call:
#   1. the GPU tests of both patched trees, and Inductor's op texts at 12 layers for the second (the fifth pass's
#      compile stall: torch 2.11 prints an op's inputs, recursively, the first time it meets the op);
#   2. 1,000-step curves of the second against the plain path (6 x 384, 8,192 FineWeb tokens a step; delta
#      res_block=4 two seeds, full Delta one seed; all six runs at once);
#   3. bench.py at 124M (B=16, with --profile=True for each variant's GPU busy time a step): main (standard, delta,
#      delta_block), then each patched tree (delta, delta_block), one after another on the same GPU.
# From the repository's root, with FineWeb shards (*_train_*.bin, *_val_*.bin) in lossdata/:
#   bash experiments/bench/block_routing_2026-11-27/session8/delta_call.sh OUT_DIR
# (about 9 minutes; everything it writes, curves, JSON and profiles, is in OUT_DIR)
set -u
out=$(mkdir -p "${1:?an output folder}" && cd "$1" && pwd)  # absolute: the runs below cd into the trees
here=$(cd "$(dirname "$0")" && pwd)
probe=experiments/bench/block_routing_2026-11-27/session6/inductor_fallback_str.py  # imports the tree it is in
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
date -u
for t in add both; do  # the patched trees, beside this one
  rm -rf /tmp/$t && mkdir /tmp/$t && cp -r *.py fast tests pytest.ini lossdata /tmp/$t/
  mkdir -p /tmp/$t/$(dirname $probe) && cp $probe /tmp/$t/$probe
  (cd /tmp/$t && patch -s -p1 < "$here/delta_stream_add.patch" && \
   { [ $t = add ] || patch -s -p1 < "$here/delta_bf16_h.patch"; }) || exit 1
done
A="--n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=32 --total_batch_size=8192 --max_iters=1000
   --warmup_iters=100 --learning_rate=1e-3 --min_lr=1e-4 --data_dir=lossdata --eval_interval=250 --val_tokens=262144
   --residual=delta"
runs="block4_plain_1337 block4_plain_1338 block4_fused_1337 block4_fused_1338 full_plain_1337 full_fused_1337"
for run in $runs; do
  IFS=_ read -r form impl seed <<< "$run"
  rb=$([ "$form" = block4 ] && echo 4 || echo 0)
  (cd /tmp/both && python train.py $A --res_block=$rb --route_impl=$impl --seed=$seed --out_dir=/tmp/curve_$run \
     > "$out/curve_$run.txt" 2>&1) &
done
for t in add both; do
  (cd /tmp/$t && timeout 300 python -m pytest -q -p no:cacheprovider tests/test_fastroute.py tests/test_fastddl.py -k cuda \
     2>&1 | tail -2 | sed "s/^/tests $t: /")
done
(cd /tmp/both && CUDA_VISIBLE_DEVICES= timeout 200 python $probe 12 2>&1 \
  | grep -E "operator_str|compiles" | sort | uniq -c | sort -k2 | tail -8)
wait
python - "$out" $runs <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
logs = {r: [json.loads(l) for l in open(f'/tmp/curve_{r}/log.jsonl')] for r in runs}
json.dump(logs, open(f'{out}/curves_6x384_delta_bf16_h.json', 'w'))
train = {r: {x['step']: x['train_loss'] for x in v if x.get('train_loss') is not None} for r, v in logs.items()}
val = {r: [x['val_loss'] for x in v if 'val_loss' in x][-1] for r, v in logs.items()}
def gap(a, b):
    steps = sorted(set(train[a]) & set(train[b]))
    return sum(train[a][s] - train[b][s] for s in steps) / len(steps)
print(' '.join(f'{r}: {val[r]:.4f}' for r in runs))
print('mean train gap block4 fused-plain 1337 %.4f, 1338 %.4f; plain 1338-1337 %.4f; full fused-plain %.4f' % (
    gap('block4_fused_1337', 'block4_plain_1337'), gap('block4_fused_1338', 'block4_plain_1338'),
    gap('block4_plain_1338', 'block4_plain_1337'), gap('full_fused_1337', 'full_plain_1337')))
PY
date -u
B="--warmup=5 --steps=15 --route_steps=0 --profile=True"
python bench.py --variants=standard,delta,delta_block $B --json="$out/h100_124m_delta_main.json" 2>&1 | tail -5
for t in add both; do
  (cd /tmp/$t && python bench.py --variants=delta,delta_block $B --json="$out/h100_124m_delta_$t.json" 2>&1 | tail -4)
done
python - "$out" <<'PY'
import json, sys
for t in ('main', 'add', 'both'):
    for r in json.load(open(f'{sys.argv[1]}/h100_124m_delta_{t}.json'))['variants']:
        print(t, r['variant'], {k: r.get(k) for k in ('ms_per_step', 'gpu_ms_per_step', 'peak_mem_mb', 'warmup_s')})
PY
date -u
