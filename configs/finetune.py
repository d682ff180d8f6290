"""
The conversion experiment, step 2 of 2: the settings that every arm shares. Each configs/finetune_<arm>.py sets
only its variant (and the control its start), so the arms differ in nothing else:

  (a) standard             the pretrained model, trained on as it is
  (b) delta_block          Delta Block (blocks of 6 sublayers) with delta_gate: at step 0 exactly the model of (a)
  (c) delta                Delta per sublayer, with the gate: also exactly (a) at step 0
  (d) attnres_block        AttnRes Block (blocks of 6 sublayers): the stream is replaced by the routed mixture
  (e) attnres              AttnRes Full
  (f) delta_block_scratch  the model of (b) from random weights, on the same budget: what pretraining is worth

  python train.py configs/finetune_pretrain.py         # step 1: the pretrained standard model
  python compare.py --family=finetune                  # every arm, then out-finetune/results.md and the plots
  python train.py configs/finetune.py configs/finetune_attnres.py     # or one arm alone

Arms (a) to (e) load the backbone of out-finetune-pretrain (its variant's own parameters start at their init and
are listed at start-up) and go on with the train tokens after the ones it was pretrained on; the control, with
no checkpoint to go on from, reads the first train tokens. Every arm is evaluated at step 0, before it trains.
"""
out_dir = 'out-finetune'
init_from = 'out-finetune-pretrain'
data_dir = 'data/sample'
# the backbone of the pretrained model, which a conversion must match
n_layer = 12
n_head = 8
n_embd = 512
block_size = 1024
# 120 steps of 16,384 tokens = 1.97M tokens: after the pretraining, all of them from fineweb_train_000002.bin
total_batch_size = 16 * 1024
batch_size = 16
max_iters = 120
# a fine-tune's learning rate, a third of the pretraining's peak; the new routing parameters (queries, key
# gains, gates) start from nothing and learn 10x faster, as in configs/convert_delta.py
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 10
routing_lr_mult = 10.0
lr_schedule = 'cosine'
# evaluated often, the first steps most of all: whether and how far a variant starts above (a)
val_tokens = 10_485_760
eval_interval = 5
log_interval = 5
compile = False
