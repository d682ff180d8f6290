"""
Conversion experiment, arm (b): Delta Block with the gate. The standard stream plus a routed mix of the
embedding, the sums of blocks of 6 sublayers and the current partial block, scaled by a gate that starts at 0,
so that at step 0 the model computes exactly what the pretrained one did.

  python train.py configs/finetune.py configs/finetune_delta_block.py
"""
out_dir = 'out-finetune-delta_block'
# the variant
residual = 'delta'
res_block = 6
ddl_dv = 1
delta_gate = True
