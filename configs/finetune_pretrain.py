"""
The conversion experiment, step 1 of 2: pretrain the standard GPT that every fine-tuned arm starts from.
The experiment is Figure 5 of the Delta Attention Residuals paper in miniature: one pretrained standard model
fine-tuned as standard, Delta Block, Delta, AttnRes Block and AttnRes on the same tokens, with Delta Block from
scratch as the control (configs/finetune.py says what each arm is).

  python train.py configs/finetune_pretrain.py         # this model, in out-finetune-pretrain
  python compare.py --family=finetune                  # step 2: every arm, then results.md and the plots

data/sample holds the local sample of the README's comparison. Its train shards are read in the order of their
names, and 467 steps of 16,384 tokens read exactly the first, fineweb_train_000001.bin (7,661,557 tokens), so
the fine-tunes go on with fineweb_train_000002.bin (FineWeb-Edu text).
"""
out_dir = 'out-finetune-pretrain'
data_dir = 'data/sample'
# the comparison's model: 12 layers x 512 wide, 8 heads; 37.7M parameters in the layers, 25.8M in the embedding
n_layer = 12
n_head = 8
n_embd = 512
block_size = 1024
residual = 'standard'
# 16 sequences x 1,024 tokens = 16,384 tokens a step, no grad accumulation. A small batch gives more optimizer
# steps from the few tokens there are: 467 steps = 7.65M tokens, one pass over the first train shard
total_batch_size = 16 * 1024
batch_size = 16
max_iters = 467
warmup_iters = 40
learning_rate = 1e-3
min_lr = 1e-4
lr_schedule = 'cosine'
# the val set: every whole sequence of data/sample's val shard (489 of them, 500,736 tokens)
val_tokens = 10_485_760
eval_interval = 50
log_interval = 10
# short runs: compiling would take longer than it saves
compile = False
