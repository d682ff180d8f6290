# Where a compiled GPU step spends its time, or where it hangs: every thread's Python stack is printed every
# `--every` seconds (faulthandler) while a compiled model with the fused routing runs a few training steps.
# Made for the stream-add fusion (stream_add_fusion.patch), whose compiled 124M warm-up did not finish in 130 s
# on an H100 while its eager step ran; apply it first to probe it:
#   git apply experiments/bench/block_routing_2026-11-27/session5/stream_add_fusion.patch
#   TORCH_LOGS=recompiles python experiments/bench/block_routing_2026-11-27/session5/compiled_probe.py --small
#   TORCH_LOGS=recompiles python experiments/bench/block_routing_2026-11-27/session5/compiled_probe.py
# --small: the tests' model (3 layers, 32 wide, fp32); else GPT-2 124M with bf16 autocast, B=16, T=1024.
# --cpu: on the CPU (the fused ops' torch code; a smoke test of this script).
import faulthandler
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
import fast  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

small = '--small' in sys.argv
dev = 'cpu' if '--cpu' in sys.argv else 'cuda'
every = float(next((a.split('=')[1] for a in sys.argv if a.startswith('--every=')), 30))
residual = next((a.split('=')[1] for a in sys.argv if a.startswith('--residual=')), 'delta')
faulthandler.dump_traceback_later(every, repeat=True)
if small:
    cfg = GPTConfig(block_size=16, vocab_size=128, n_layer=3, n_head=2, n_embd=32, residual=residual, res_block=2)
    B, T, dtype = 2, 16, None
else:
    cfg = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, residual=residual,
                    res_block=6)
    B, T, dtype = 16, 1024, torch.bfloat16
torch.manual_seed(0)
model = GPT(cfg).to(dev)
fast.apply(model, 'fused')
model.compile()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
idx = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
for step in range(4):
    t0 = time.time()
    with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
        _, loss = model(idx, idx)
    print(f'step {step}: forward done after {time.time() - t0:.1f} s', flush=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev == 'cuda':
        torch.cuda.synchronize()
    print(f'step {step}: {time.time() - t0:.1f} s, loss {loss.item():.4f}', flush=True)
faulthandler.cancel_dump_traceback_later()
