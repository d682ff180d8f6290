"""
Variant comparison, delta_block. Delta Block: the standard stream plus a routed mix over the same block sources as
compare_attnres_block.py; the two differ only in how the mix is used.

  python train.py configs/compare.py configs/compare_delta_block.py
"""
out_dir = 'out-compare-delta_block'
# the variant
residual = 'delta'
res_block = 6
ddl_dv = 1
delta_gate = False
