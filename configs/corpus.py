"""
The variant comparison at a real budget: configs/compare.py's 12 x 512 backbone, 100M tokens of the corpus
(92% Wikipedia, not FineWeb; docs/experiments.md says what it is and how to get it), in 1,526 steps.

  python compare.py --extra_configs=configs/corpus.py --data_dir=data/corpus \
      --extra_seeds=standard,delta,delta_block --extra_val=data/fineweb_val/fineweb_val_000000.bin \
      --ablate=True --ablate_tokens=65536 --gpus=0,1,2,3

Steps matter as much as tokens at this size: an earlier pilot of 100M tokens in 381 steps of 262,144 tokens
ended at val loss 5.8, while these 1,526 steps of 65,536 tokens reach 4.46-4.50 for standard (two seeds,
0.046 apart; docs/experiments.md).
"""
data_dir = 'data/corpus'
# 2**16 = 65,536 tokens per step = 32 sequences x 1,024 tokens x 2 grad-accumulation steps on one GPU
total_batch_size = 65_536
batch_size = 32
# 1,526 steps x 65,536 tokens = 100.0M tokens: 1.8 passes over the corpus's 54.9M
max_iters = 1_526
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
lr_schedule = 'cosine'
# the corpus's val shard holds 1,008,688 tokens: 985 sequences of 1,024
val_tokens = 1_048_576
eval_interval = 200
log_interval = 10
