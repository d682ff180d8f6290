# Why the stream-add fusion's compiled warm-up did not finish (fifth pass), on the CPU: torch 2.11's Inductor, the
# first time it meets a custom op, logs the op's inputs as text (exc.OperatorIssue.operator_str, built whether or not
# the log is shown), and an extern kernel's text holds its inputs' text. This prints how long that took and how long
# the text was for each of the fused routing's ops while a compiled delta block model (n_layer layers) runs one step.
#   python experiments/bench/block_routing_2026-11-27/session6/inductor_fallback_str.py 7
# Measured (torch 2.11 CPU build, 2026-11-27): main's fast/route.py, start_backward's text 156K characters at 7 layers,
# 338K at 12 (it grows with the reads); with session5/stream_add_fusion.patch 520K at 3 layers and 196M at 7 (20 s):
# each read backward took two inputs from the one before (the token and the stream's gradient), so the text doubled a
# read. With session6/stream_add_fusion.patch (no token where the stream's gradient orders it) 452K at 12 layers.
# torch 2.13 does not build this text.
import os
import sys
import time

os.environ.setdefault('TORCHINDUCTOR_FORCE_DISABLE_CACHES', '1')  # a cached graph is not lowered again
import torch  # noqa: E402
import torch._inductor.exc as exc  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
import fast  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

operator_str = exc.OperatorIssue.operator_str


def timed(target, args, kwargs):
    t = time.time()
    s = operator_str(target, args, kwargs)
    print(f'operator_str {target}: {time.time() - t:.2f} s, {len(s):,} characters', flush=True)
    return s


exc.OperatorIssue.operator_str = staticmethod(timed)
n_layer = int(sys.argv[1]) if len(sys.argv) > 1 else 7
cfg = GPTConfig(block_size=16, vocab_size=128, n_layer=n_layer, n_head=2, n_embd=32, residual='delta', res_block=2)
model = GPT(cfg)
fast.apply(model, 'fused')
model.compile()
idx = torch.randint(0, 128, (2, 16))
t = time.time()
_, loss = model(idx, idx)
print(f'forward (compiles) {time.time() - t:.1f} s', flush=True)
t = time.time()
loss.backward()
print(f'backward (compiles) {time.time() - t:.1f} s', flush=True)
