"""
GPT-2 124M on one GPU: 10B FineWeb tokens, the llm.c baseline that the speedrun's 3.28 val loss comes from.

  python prepare.py --num_train_shards=100            # 100 x 100M train tokens + val, 20 GB
  python train.py configs/gpt2_124m.py

On one H100 (bf16, compiled) this runs at about 490K tokens/s, 42% MFU, so the 10B tokens take about 6 hours.
The model fields are the defaults of train.py: 12 layers, 12 heads, 768 wide, block 1024, vocab 50304.
"""
out_dir = 'out-gpt2-124m'
data_dir = 'data/fineweb10B'
# 2**19 = 524,288 tokens per step = 32 sequences x 1,024 tokens x 16 grad-accumulation steps.
# 32 sequences take about 22 GB; on a 24 GB card use 16 (accum 32): the same result, a little slower
total_batch_size = 524_288
batch_size = 32
# 19,073 steps x 524,288 tokens = 10.0B tokens, as llm.c's GPT-2 124M run
max_iters = 19_073
warmup_iters = 700
learning_rate = 6e-4
min_lr = 6e-5
lr_schedule = 'cosine'
# the val set: the first 10,485,760 val tokens, as the speedrun; 10,240 sequences, ~10 s on an H100
val_tokens = 10_485_760
eval_interval = 250
log_interval = 10
