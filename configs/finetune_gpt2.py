"""
The conversion experiment from OpenAI's GPT-2 124M instead of configs/finetune_pretrain.py's small model. It needs
`pip install transformers` and internet, or init_from = a folder of GPT-2's weights in Hugging Face's format:

  python prepare.py                                    # data/fineweb10B: FineWeb val + one train shard of 100M tokens
  python compare.py --family=finetune --extra_configs=configs/finetune_gpt2.py --out_dir=out-finetune-gpt2

compare.py reads this file after configs/finetune.py and before each arm's own, so the control keeps its
init_from = 'scratch' and its learning rate, and builds GPT-2's shape from random weights. Every arm, the control
too, reads the same tokens from the start of the train shards: GPT-2 brings no position in our data.
"""
out_dir = 'out-finetune-gpt2'
init_from = 'gpt2'
data_dir = 'data/fineweb10B'
# GPT-2 124M. The fine-tuned arms take these from GPT-2's config.json anyway; the control needs them here
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50257
bias = True
gelu_approx = 'tanh'
# 2**17 = 131,072 tokens a step = 16 sequences x 1,024 tokens x 8 grad-accumulation steps on one GPU;
# 700 steps = 91.8M tokens, within the first train shard
total_batch_size = 131_072
batch_size = 16
max_iters = 700
warmup_iters = 50
# gentler than the small model's fine-tune: GPT-2 is trained far longer; the routing still learns 10x faster
learning_rate = 1e-4
min_lr = 1e-5
# 2,048 val sequences, about 2 s each time on one GPU, every 25 steps
val_tokens = 2_097_152
eval_interval = 25
log_interval = 10
# 700 steps of a 124M model: compiling pays for itself
compile = True
