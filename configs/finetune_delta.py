"""
Conversion experiment, arm (c): Delta Attention Residuals per sublayer, with the gate: the standard stream plus
a routed mix of the embedding and every earlier sublayer output, exactly the pretrained model at step 0.

  python train.py configs/finetune.py configs/finetune_delta.py
"""
out_dir = 'out-finetune-delta'
# the variant
residual = 'delta'
res_block = 0
ddl_dv = 1
delta_gate = True
