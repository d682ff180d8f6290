# CPU time of a compiled model's step with the fused routing op's Triton launches stubbed out, against
# the standard model's: what the fused op's Python costs a step once compiled (tiny shapes, so the
# arithmetic is negligible).
import sys, time, cProfile, pstats
sys.path.insert(0, '.')
import torch
import cli
from cli import VARIANTS
from model import GPT, GPTConfig
from stub_launches import stub_launches

if '--real' not in sys.argv:
    stub_launches()

dev = 'cuda' if '--cuda' in sys.argv else 'cpu'
torch.manual_seed(0)
L, d, B, T = 12, 64, 1, 8
res = {}
for variant in sys.argv[1].split(','):
    model = GPT(GPTConfig(n_layer=L, n_head=2, n_embd=d, block_size=T, vocab_size=64, **VARIANTS[variant]))
    model.to(dev)
    cli.fast_paths(model, 'fused')
    model.compile()
    idx = torch.randint(0, 64, (B, T), device=dev)
    def run():
        logits, loss = model(idx, idx)
        loss.backward()
    for _ in range(3):
        run()
    if dev == 'cuda': torch.cuda.synchronize()
    n = 100
    t = time.perf_counter()
    for _ in range(n):
        run()
    if dev == 'cuda': torch.cuda.synchronize()
    res[variant] = dt = (time.perf_counter() - t) / n
    print(f'{variant}: {1e6 * dt:.0f} us a step', flush=True)
    if '--prof' in sys.argv and variant != 'standard':
        pr = cProfile.Profile(); pr.enable()
        for _ in range(50):
            run()
        pr.disable()
        pstats.Stats(pr).sort_stats('tottime').print_stats(25)
