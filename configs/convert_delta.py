"""
Convert a trained standard GPT-2 124M into Delta Attention Residuals and train on.

  python train.py configs/gpt2_124m.py                 # first the standard model, in out-gpt2-124m
  python train.py configs/convert_delta.py

The backbone (embeddings, attention, MLPs, norms) comes from the checkpoint; the routing queries, key gains and
gates start at their init. The gate starts at 0, so the converted model computes exactly what the standard one
did: its first val loss (step 0 in log.jsonl) equals the checkpoint's. The train data continues where the
standard run stopped; the step count and the schedule start again at 0.
"""
init_from = 'out-gpt2-124m'
out_dir = 'out-gpt2-124m-delta'
data_dir = 'data/fineweb10B'
# the backbone fields must equal the checkpoint's: GPT-2 124M, the defaults of train.py
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
residual = 'delta'
delta_gate = True
# the new parameters learn 10x faster than the trained backbone: 3e-3 for the queries and gates, 3e-4 for the rest
routing_lr_mult = 10.0
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 100
# 2,000 steps x 524,288 tokens = 1.05B tokens (about 40 minutes on an H100)
total_batch_size = 524_288
batch_size = 32
max_iters = 2_000
val_tokens = 10_485_760
eval_interval = 250
log_interval = 10
