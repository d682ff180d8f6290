"""
Conversion experiment, arm (f), the control: the model of arm (b), Delta Block with the gate, trained from random
weights for the same steps and tokens, with the learning rate of the pretraining (configs/finetune_pretrain.py),
which suits a model from scratch better than a fine-tune's. With no checkpoint to go on from, it reads the
first train tokens; the fine-tuned arms read the ones after the pretraining.

  python train.py configs/finetune.py configs/finetune_delta_block_scratch.py
"""
out_dir = 'out-finetune-delta_block_scratch'
init_from = 'scratch'
# the variant: that of arm (b)
residual = 'delta'
res_block = 6
ddl_dv = 1
delta_gate = True
# from scratch: the pretraining's learning rate; every parameter is new, so none learns faster than the others
learning_rate = 1e-3
min_lr = 1e-4
routing_lr_mult = 1.0
