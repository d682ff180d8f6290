# CPU time of the fused routing stream alone, compiled, the Triton launches stubbed out: tiny tensors, min of trials.
import os, sys, time
sys.path.insert(0, '.')
import torch
import cli
from cli import VARIANTS
from model import GPT, GPTConfig
from stub_launches import stub_launches

stub_launches()
torch.manual_seed(0)
L, d, B, T = 12, 64, 1, 8
for variant in sys.argv[1].split(','):
    model = GPT(GPTConfig(n_layer=L, n_head=2, n_embd=d, block_size=T, vocab_size=64, **VARIANTS[variant]))
    cli.fast_paths(model, 'fused')
    stream = model.stream
    e = torch.randn(B, T, d, requires_grad=True)
    outs = [torch.randn(B, T, d, requires_grad=True) for _ in range(2 * L)]

    @torch.compile(fullgraph=True)
    def fwd(e, outs):
        st, tot = stream.start(e), 0
        for s, out in enumerate(outs):
            h = stream.read(st, s)
            tot = tot + h.sum()
            stream.write(st, s, out, h, None)
        return tot + stream.final(st).sum()

    def run():
        fwd(e, outs).backward()
    for _ in range(5):
        run()
    best = 1e9
    for _ in range(int(os.environ.get('TRIALS', 8))):
        t = time.perf_counter()
        for _ in range(100):
            run()
        best = min(best, (time.perf_counter() - t) / 100)
    print(f'{variant}: {1e6 * best:.0f} us a stream', flush=True)
