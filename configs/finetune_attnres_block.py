"""
Conversion experiment, arm (d): Block Attention Residuals. No standard stream: each sublayer reads a softmax mix
of the embedding, the sums of blocks of 6 sublayers and the current partial block. With zero queries the mix is
the uniform mean, the standard stream divided by the number of sources, which the pre-norms undo but for
LayerNorm's eps; once the queries learn, the mix is no longer the stream.

  python train.py configs/finetune.py configs/finetune_attnres_block.py
"""
out_dir = 'out-finetune-attnres_block'
# the variant
residual = 'attnres'
res_block = 6
ddl_dv = 1
delta_gate = False
