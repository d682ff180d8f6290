"""
Quick start on a laptop CPU: a 4-layer, 128-wide GPT with Delta Attention Residuals, trained for a few minutes,
then sampled, with the routing weights of the prompt printed as a heatmap.

  python prepare.py --max_tokens=1000000               # the first 1M tokens of FineWeb val and train: 4 MB
  python train.py configs/cpu_quickstart.py            # 200 steps, about 5 minutes on 2 idle CPU cores
  python sample.py --out_dir=out-quickstart --device=cpu --start="The meaning of life is"

Any text of your own works too: `python prepare.py --text=notes.jsonl --name=notes` writes data/notes/, then
add --data_dir=data/notes (a .txt file needs lines of <|endoftext|> between its documents: val is held out by
document). The samples will be mostly word salad: after 410K tokens the val loss is about 7.4 (10.85 at step 0).
This run checks that everything works end to end; it does not make a good language model.
"""
out_dir = 'out-quickstart'
data_dir = 'data/fineweb10B'
device = 'cpu'
compile = False
# model: 4 x 128 is 0.8M parameters in the layers; the 50304 x 128 token embedding (6.4M) dominates
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
# the residual stream: Delta AttnRes, the standard stream plus a routed mix of e and every earlier sublayer
# output, so sample.py has routing weights to show (residual = 'standard' trains plain GPT-2)
residual = 'delta'
# 16 sequences x 128 tokens = 2,048 tokens per step, no grad accumulation; 200 steps = 409,600 tokens,
# well inside the first 1M tokens of the train shard that prepare.py --max_tokens=1000000 fetches
# (300 steps took 7.5 minutes on 2 idle cores, 1.5 s a step with the evals: the 50304-wide output layer dominates)
total_batch_size = 16 * 128
batch_size = 16
max_iters = 200
warmup_iters = 20
learning_rate = 2e-3  # a small model takes a larger learning rate than GPT-2 124M's 6e-4
min_lr = 2e-4
# eval on 32,768 val tokens (256 sequences) every 100 steps: a few seconds each on a CPU
val_tokens = 32_768
eval_interval = 100
log_interval = 10
