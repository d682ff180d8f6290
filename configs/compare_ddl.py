"""
Variant comparison, ddl. Deep Delta Learning with a vector state (ddl_dv = 1).

  python train.py configs/compare.py configs/compare_ddl.py
"""
out_dir = 'out-compare-ddl'
# the variant
residual = 'ddl'
res_block = 0
ddl_dv = 1
delta_gate = False
