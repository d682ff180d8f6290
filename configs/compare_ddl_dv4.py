"""
Variant comparison, ddl_dv4. Deep Delta Learning with a d x 4 matrix state, the paper's default expanded form.

  python train.py configs/compare.py configs/compare_ddl_dv4.py
"""
out_dir = 'out-compare-ddl_dv4'
# the variant
residual = 'ddl'
res_block = 0
ddl_dv = 4
delta_gate = False
