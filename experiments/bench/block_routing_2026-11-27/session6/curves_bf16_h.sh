#!/bin/bash
# 1,000-step curves for AttnRes's h in bf16 (attnres_bf16_h_remix.patch) against the plain path, all runs at once on
# one GPU: the 6 x 384 model of the earlier curves (8,192 FineWeb tokens a step), res_block=4 and full, two seeds of
# the block form. From the repository's root, with FineWeb shards (*_train_*.bin, *_val_*.bin) in lossdata/:
#   bash experiments/bench/block_routing_2026-11-27/session6/curves_bf16_h.sh OUT_DIR
# The patch is applied to fast/route.py for the fused runs (the plain runs do not use fast/route.py) and taken
# out again at the end. Writes OUT_DIR/curves_6x384_bf16_h.json and prints final val losses and mean gaps.
set -u
out=${1:?an output folder}
here=$(dirname "$0")
mkdir -p "$out"
cp fast/route.py /tmp/route_main.py
patch -s -p1 < "$here/attnres_bf16_h_remix.patch" || exit 1
A="--n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=32 --total_batch_size=8192 --max_iters=1000
   --warmup_iters=100 --learning_rate=1e-3 --min_lr=1e-4 --data_dir=lossdata --eval_interval=250 --val_tokens=262144
   --residual=attnres"
runs="block4_plain_1337 block4_plain_1338 block4_fused_1337 block4_fused_1338 full_plain_1337 full_fused_1337"
for run in $runs; do
  IFS=_ read -r form impl seed <<< "$run"
  rb=$([ "$form" = block4 ] && echo 4 || echo 0)
  python train.py $A --res_block=$rb --route_impl=$impl --seed=$seed --out_dir=/tmp/curve_$run > "$out/$run.txt" 2>&1 &
done
wait
cp /tmp/route_main.py fast/route.py
python - "$out" $runs <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
logs = {r: [json.loads(l) for l in open(f'/tmp/curve_{r}/log.jsonl')] for r in runs}
json.dump(logs, open(f'{out}/curves_6x384_bf16_h.json', 'w'))
train = {r: {x['step']: x['train_loss'] for x in v if x.get('train_loss') is not None} for r, v in logs.items()}
val = {r: [x['val_loss'] for x in v if 'val_loss' in x][-1] for r, v in logs.items()}
def gap(a, b):
    steps = sorted(set(train[a]) & set(train[b]))
    return sum(train[a][s] - train[b][s] for s in steps) / len(steps)
for r in runs:
    print(f'{r}: final val {val[r]:.4f}')
print('block4 fused - plain, seed 1337: %.4f; 1338: %.4f; plain 1338 - 1337: %.4f; full fused - plain: %.4f' % (
    gap('block4_fused_1337', 'block4_plain_1337'), gap('block4_fused_1338', 'block4_plain_1338'),
    gap('block4_plain_1338', 'block4_plain_1337'), gap('full_fused_1337', 'full_plain_1337')))
PY
