"""
Variant comparison, attnres. Full Attention Residuals: each sublayer reads a softmax mix of the
embedding and of all earlier sublayer outputs.

  python train.py configs/compare.py configs/compare_attnres.py
"""
out_dir = 'out-compare-attnres'
# the variant
residual = 'attnres'
res_block = 0
ddl_dv = 1
delta_gate = False
