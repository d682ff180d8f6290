# CPU time of the fused routing op's Python, the Triton launches stubbed out: a whole stream's
# forward and backward on tiny tensors, per read (forward + backward).
import sys, time, cProfile, pstats
sys.path.insert(0, '.')
import torch
import cli
from cli import VARIANTS
from model import GPT, GPTConfig
from stub_launches import stub_launches

stub_launches()

variant = sys.argv[1] if len(sys.argv) > 1 else 'delta_block'
torch.manual_seed(0)
L, d, B, T = 12, 64, 1, 8
model = GPT(GPTConfig(n_layer=L, n_head=2, n_embd=d, block_size=T, vocab_size=64, **VARIANTS[variant]))
cli.fast_paths(model, 'fused')
stream = model.stream
e = torch.randn(B, T, d, requires_grad=True)
outs = [torch.randn(B, T, d, requires_grad=True) for _ in range(2 * L)]
grads = [torch.randn(B, T, d) for _ in range(2 * L + 1)]

def run():
    st = stream.start(e)
    hs = []
    for s, out in enumerate(outs):
        hs.append(stream.read(st, s))
        stream.write(st, s, out, hs[-1], None)
    hs.append(stream.final(st))
    torch.autograd.backward(hs, grads)

for _ in range(5):
    run()
n = 50
t = time.perf_counter()
for _ in range(n):
    run()
dt = (time.perf_counter() - t) / n
print(f'{variant}: {1e6 * dt:.0f} us a stream, {1e6 * dt / stream.n_reads:.0f} us a read (fwd + bwd)')
if len(sys.argv) > 2:
    pr = cProfile.Profile(); pr.enable()
    for _ in range(20):
        run()
    pr.disable()
    pstats.Stats(pr).sort_stats('tottime').print_stats(18)
