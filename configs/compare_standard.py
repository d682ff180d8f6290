"""
Variant comparison, standard. The standard residual stream x = x + F(ln(x)): the baseline.

  python train.py configs/compare.py configs/compare_standard.py
"""
out_dir = 'out-compare-standard'
# the variant
residual = 'standard'
res_block = 0
ddl_dv = 1
delta_gate = False
