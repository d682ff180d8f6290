"""
Variant comparison, delta. Delta Attention Residuals: the standard stream plus a routed mix of the
embedding and of all earlier sublayer outputs.

  python train.py configs/compare.py configs/compare_delta.py
"""
out_dir = 'out-compare-delta'
# the variant
residual = 'delta'
res_block = 0
ddl_dv = 1
delta_gate = False
