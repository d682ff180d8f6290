# The routing kernels of one step, each call's kernel time (torch profiler), the sublayer outputs fixed, bf16
# sources: fast/route.py against an earlier copy of it. Made h100_routing_kernels_*.json at commit c5a6f04
# (BM and WARPS were module constants there; later the warps follow the width), from the repository's root:
#   git show b1829fc:fast/route.py > /tmp/route_old.py
#   SHAPE=16,1024,12,768 python experiments/bench/block_routing_2026-11-27/session3/kernel_bench.py \
#       OUT.json attnres,delta,attnres_block,delta_block sweep /tmp/route_old.py
import sys, json, importlib.util, time
sys.path.insert(0, '.')
import torch
import cli
from cli import VARIANTS
from model import GPT, GPTConfig
from fast import route as new
spec = importlib.util.spec_from_file_location('route_old', sys.argv[4])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)

out = sys.argv[1]
variants = (sys.argv[2] if len(sys.argv) > 2 else 'attnres,delta,attnres_block,delta_block').split(',')
sweep = len(sys.argv) > 3 and sys.argv[3] == 'sweep'
import os
B, T, L, d = (int(x) for x in os.environ.get('SHAPE', '16,1024,12,768').split(','))
dev, bf = 'cuda', torch.bfloat16
if not torch.cuda.is_available():  # a dry run of the script on the CPU (TRITON_INTERPRET=1)
    B, T, L, d, dev = 1, 8, 2, 24, 'cpu'
M = B * T


def timeit(fn, reps=5):
    """ms of GPU kernels per call (the profiler's sum; launch gaps excluded)."""
    if dev == 'cpu':
        t = time.perf_counter(); fn(); return 1000 * (time.perf_counter() - t)
    fn(); torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type != torch.autograd.DeviceType.CPU) / 1000 / reps


def measure(mod, v, BM=4, WARPS=4):
    mod.BM, mod.WARPS = BM, WARPS
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=L, n_head=d // 64, n_embd=d, **VARIANTS[v])).to(dev)
    cli.fast_paths(model, 'fused')
    st = model.stream
    plan = new.PLANS[st.key]
    W = (st.query * st.key_gain).detach()
    e = torch.randn(B, T, d, device=dev)
    ro = mod.Router(plan, e, bf)
    ro.V.normal_(); ro.Lg.normal_()
    if ro.P is not None:
        ro.P.zero_()
    R, n = plan.n_reads, len(plan.ranges)
    add = st.additive
    base = torch.randn(M, d, device=dev) if add else None
    vout = torch.randn(M, d, device=dev, dtype=bf)
    rows = []
    for r in range(R):
        slot = next((j for j in range(1, n) if plan.ranges[j][0] == r), -1)
        k = len(plan.others[r])
        nb = 2 * k + 4 + (8 if add else 0)
        if slot >= 0:
            nb += 4 + 4 * plan.cont[slot] + 4 * plan.keep[slot]
        ms = timeit(lambda: mod.read_mix(ro, r, st.table[r], vout if slot >= 0 else None, W, slot, base, None))
        rows.append(dict(kind='read', r=r, slot=slot, n=k, ms=ms, gbs=nb * M * d / ms / 1e6))
    ro.G = ro.V.new_empty((R,) + ro.V.shape[1:]).normal_()
    ro.Dl = torch.zeros_like(ro.Lg)
    ro.mmax.fill_(3.0); ro.ssum.fill_(10.0); ro.c.normal_()
    gh = torch.randn(M, d, device=dev); mix = torch.randn(M, d, device=dev)
    for r in reversed(range(R)):
        slot = next((j for j in range(1, n) if plan.ranges[j][0] == r), -1)
        nb = 10
        k = 0
        if slot >= 0:
            k = plan.ranges[slot][1] - r
            nb += 2 * k + 4 * plan.cont[slot] + 4 * plan.keep[slot]
        ms = timeit(lambda: mod.read_grad(ro, W, r, slot, gh, mix, None, bf))
        rows.append(dict(kind='read_grad', r=r, slot=slot, n=k, ms=ms, gbs=nb * M * d / ms / 1e6))
    k = plan.ranges[0][1] - plan.ranges[0][0]
    ms = timeit(lambda: mod.source_grad(ro, W, 0, *plan.ranges[0]))
    rows.append(dict(kind='source_grad', r=-1, slot=0, n=k, ms=ms, gbs=(2 * k + 6) * M * d / ms / 1e6))
    tot = {kd: sum(x['ms'] for x in rows if x['kind'] == kd) for kd in ('read', 'read_grad', 'source_grad')}
    bytes_ = sum(x['gbs'] * x['ms'] * 1e6 for x in rows)
    return dict(variant=v, BM=BM, WARPS=WARPS, total_ms=sum(tot.values()), **{f'{k}_ms': t for k, t in tot.items()},
                gb_per_s=bytes_ / sum(tot.values()) / 1e6, rows=rows)


res = []
x = torch.empty(2**28, dtype=torch.uint8, device=dev); y = torch.empty_like(x)
ms = timeit(lambda: y.copy_(x))
copy = 2 * x.numel() / ms / 1e6
print(f'{dev} torch {torch.__version__} copy {copy:.0f} GB/s', flush=True)
res.append(dict(copy_gb_per_s=copy, device=dev, torch=torch.__version__, date=time.strftime('%Y-%m-%d')))
CFGS = [(4, 4), (2, 2), (1, 1), (2, 1)] if sweep else [(2, 1), (1, 1)]
for v in variants:
    m = measure(old, v); m['impl'] = 'old'; res.append(m)
    print(f"{v} old 4x4: total {m['total_ms']:.2f} ms (read {m['read_ms']:.2f}, read_grad {m['read_grad_ms']:.2f}, source_grad {m['source_grad_ms']:.2f}) {m['gb_per_s']:.0f} GB/s", flush=True)
    for bm, w in CFGS:
        try:
            m = measure(new, v, bm, w); m['impl'] = 'new'
            print(f"{v} new {bm}x{w}: total {m['total_ms']:.2f} ms (read {m['read_ms']:.2f}, read_grad {m['read_grad_ms']:.2f}, source_grad {m['source_grad_ms']:.2f}) {m['gb_per_s']:.0f} GB/s", flush=True)
        except Exception as ex:
            m = dict(variant=v, BM=bm, WARPS=w, error=repr(ex)[:300]); print(m, flush=True)
        res.append(m)
        json.dump(res, open(out, 'w'), indent=1)
