"""
Variant comparison, attnres_block. Block Attention Residuals: the sources are the embedding,
the sums of blocks of 6 sublayers (3 layers, so 4 blocks) and the current partial block. Kimi's N = 8 blocks
would be res_block = 3.

  python train.py configs/compare.py configs/compare_attnres_block.py
"""
out_dir = 'out-compare-attnres_block'
# the variant
residual = 'attnres'
res_block = 6
ddl_dv = 1
delta_gate = False
