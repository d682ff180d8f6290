"""
The shared settings of the variant comparison: everything except the variant, which compare.py sets from
cli.VARIANTS (or give its fields yourself):

  python train.py configs/compare.py --residual=delta --res_block=6 --out_dir=out-compare-delta_block
  python compare.py                     # trains every variant this way, then writes the table and plots

Same val tokens, same data order, same schedule and seed for every variant, so their val losses compare directly.
"""
out_dir = 'out-compare'
data_dir = 'data/fineweb10B'
# 12 layers x 512 wide: 37.7M parameters in the layers plus the 25.8M of the 50304 x 512 token embedding
n_layer = 12
n_head = 8
n_embd = 512
block_size = 1024
# 2**18 = 262,144 tokens per step = 32 sequences x 1,024 tokens x 8 grad-accumulation steps on one GPU
total_batch_size = 262_144
batch_size = 32
# 3,000 steps x 262,144 tokens = 786M tokens, about 12 per parameter
# (python prepare.py --num_train_shards=8)
max_iters = 3_000
warmup_iters = 250
learning_rate = 1e-3
min_lr = 1e-4
lr_schedule = 'cosine'
val_tokens = 10_485_760
eval_interval = 250
log_interval = 10
