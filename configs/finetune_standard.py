"""
Conversion experiment, arm (a): the pretrained standard model, fine-tuned as it is; the baseline of the others.

  python train.py configs/finetune.py configs/finetune_standard.py
"""
out_dir = 'out-finetune-standard'
# the variant
residual = 'standard'
res_block = 0
ddl_dv = 1
delta_gate = False
