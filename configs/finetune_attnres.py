"""
Conversion experiment, arm (e): Full Attention Residuals: each sublayer reads a softmax mix of the embedding and
every earlier sublayer output instead of the standard stream (at zero queries, the stream over the number of
sources, as in arm (d)).

  python train.py configs/finetune.py configs/finetune_attnres.py
"""
out_dir = 'out-finetune-attnres'
# the variant
residual = 'attnres'
res_block = 0
ddl_dv = 1
delta_gate = False
