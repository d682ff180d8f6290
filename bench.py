"""
Benchmarks: training-step speed and memory of each residual variant, and the routing op alone.

    python bench.py                    # GPT-2 124M, every variant, B=16 T=1024, on the GPU
    python bench.py --variants=standard,delta --steps=20
    python bench.py --device=cpu --n_layer=2 --n_embd=64 --n_head=2 --block_size=64 --batch_size=2 --compile=False

Each variant trains for `warmup` untimed steps (compilation happens there), then `steps` timed steps
on random tokens. One table is printed (ms/step, tok/s, MFU against the device's peak, peak memory,
ratios to the standard variant of the same run) and written as JSON. `--route_impl=plain` or
`--route_impl=fused` times AttnRes, Delta and DDL with model.py's code or the fused paths of fast/
in every form ('auto', the default, picks per form; see FusedRouted.fused and FusedDeepDelta.fused),
applied as train.py applies them. The routing micro-benchmark runs the routing of a whole
`route_variant` stream alone (the sublayers replaced by fixed random outputs), forward and backward,
and reports the bandwidth it achieves counting only the bytes that must move: each (source, read)
pair's source read once forward, and each read's output gradient read once per source backward.
On CUDA the bandwidth is over the GPU time of its kernels (the profiler's sum): run alone, the op's
wall time can be the CPU launching it, which in a training step overlaps the matmuls.
"""

import json
import os
import sys
import time
from dataclasses import asdict

import torch

import cli
from cli import VARIANTS, peak_flops
from model import GPT, GPTConfig, _num_sources

# default: GPT-2 124M as nanoGPT's bench.py, and the variants as the comparisons use them
defaults = dict(
    variants=','.join(VARIANTS), device='cuda', dtype='bfloat16', compile=True, route_impl='auto',
    batch_size=16, block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50304,
    warmup=10, steps=30, seed=1337, json='bench.json',
    # also write the top GPU kernels of 3 profiled steps per variant next to the JSON, and (CUDA)
    # their busy time a step as gpu_ms_per_step
    profile=False,
    route_variant='delta', route_steps=20,  # 0 route_steps skips the routing micro-benchmark
)


RULES = {  # each bad value is one line and exit status 1, before any benchmark runs
    'variants': (lambda v: v != '' and all(n in VARIANTS for n in v.split(',')),
                 f'a comma-separated list of {", ".join(VARIANTS)}'),
    'route_variant': (lambda v: v in VARIANTS, ', '.join(VARIANTS)),
    'dtype': (lambda v: v in cli.DTYPES, ', '.join(cli.DTYPES)),
    'route_impl': (lambda v: v in cli.ROUTE_IMPLS, ', '.join(cli.ROUTE_IMPLS)),
    'steps': (lambda v: v >= 1, '>= 1 timed steps'),
    'warmup': (lambda v: v >= 0, '>= 0'),
    'route_steps': (lambda v: v >= 0, '>= 0 (0 skips the routing micro-benchmark)'),
    'json': (lambda v: v.endswith('.json') and os.path.isdir(os.path.dirname(v) or '.'),
             'a .json file in a folder that exists (the results are written there at the end)'),
    **{k: (lambda v: v >= 1, '>= 1')
       for k in ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'vocab_size')},
}


def parse(argv):
    """--key=value overrides of `defaults`, each cast to its default's type and checked by RULES."""
    cfg = cli.parse(argv, defaults, __doc__, RULES)
    # the model's own checks (n_embd divisible by n_head, a block no longer than the sublayers, ...)
    # for every variant asked for, and the device, before anything runs
    for name in dict.fromkeys(cfg['variants'].split(',') + [cfg['route_variant']]):
        try:
            GPTConfig(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'],
                      block_size=cfg['block_size'], vocab_size=cfg['vocab_size'], **VARIANTS[name])
        except ValueError as e:
            raise SystemExit(f'error: {e} (variant {name})') from None
    try:
        cfg['device'] = cli.pick_device(cfg['device'])
        cfg['dtype'] = cli.pick_dtype(cfg['dtype'], cfg['device'])[0]
    except cli.ConfigError as e:
        raise SystemExit(f'error: {e}') from None
    return cfg


def sync(device):
    if device.type == 'cuda':  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()


def kernel_ms(prof, steps):
    """The GPU time of a profile's kernels (and copies) a step, in ms: the sum of their own times.
    Device events only: the row of the CPU op that launched a kernel repeats the kernel's time."""
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type != torch.autograd.DeviceType.CPU) / 1000 / steps


def bench_variant(name, cfg, device):
    """Time `steps` AdamW training steps of one variant; returns a dict of measurements."""
    torch.manual_seed(cfg['seed'])
    mcfg = GPTConfig(block_size=cfg['block_size'], vocab_size=cfg['vocab_size'],
                     n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'],
                     **VARIANTS[name])
    # fp32 weights; autocast below runs the matmuls in bf16, as train.py does
    model = GPT(mcfg).to(device)
    # before the optimizer: it replaces the stream's parameters
    cli.fast_paths(model, cfg['route_impl'])
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    # each variant compiles afresh: no guards left from the last one's model (whose guard-failure
    # report, in torch 2.13, looks for that model's buffers in this one)
    torch._dynamo.reset()
    cli.compile_model(model, cfg['compile'], device.type)  # in place, as train.py; CUDA only
    B, T = cfg['batch_size'], cfg['block_size']
    # random tokens: the speed of a step does not depend on the data, and no dataset is needed
    x = torch.randint(0, mcfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, mcfg.vocab_size, (B, T), device=device)
    autocast = cli.autocast(device, cfg['dtype'])

    def step():
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(cfg['warmup']):  # compilation and autotuning happen in the first steps
        step()
    sync(device)
    warmup_s = time.time() - t0
    # peak memory of the timed steps: weights, optimizer state and one step's activations
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    for _ in range(cfg['steps']):
        loss = step()
    sync(device)
    dt = (time.time() - t0) / cfg['steps']  # seconds per step, averaged over the timed steps
    tok_s = B * T / dt
    mfu = model.estimate_mfu(tok_s, peak_flops(device))  # None where the device's peak is unknown
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else None
    gpu_ms = None
    if cfg['profile']:
        # acc_events: one profiling cycle either way; without it torch 2.11 warns at every profile
        with torch.profiler.profile(acc_events=True) as prof:
            for _ in range(3):
                step()
            sync(device)
        sort = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
        with open(cfg['json'].removesuffix('.json') + f'_profile_{name}.txt', 'w') as f:
            f.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90))
        if device.type == 'cuda':  # the GPU's busy time a step: below ms_per_step, the CPU is short
            gpu_ms = kernel_ms(prof, 3)
    return dict(variant=name, ms_per_step=1000 * dt, gpu_ms_per_step=gpu_ms, tok_per_s=tok_s,
                mfu=mfu, peak_mem_mb=peak_mb,
                warmup_s=warmup_s, loss=loss.item(), params=model.get_num_params(),
                flops_per_token=model.flops_per_token(), config=asdict(mcfg))


def bench_routing(cfg, device):
    """Forward and backward of the routing of a whole stream, the sublayers replaced by fixed random
    outputs. The bytes that must move (per token, d wide, sources and gradients in the storage
    dtype): forward, each (source, read) pair's source once; backward, each read's output gradient
    once per source that it saw. E.g. Delta, 12 layers: 299 pairs x 768 x 2 bytes x 2 = 0.92 MB a
    token, 15 GB for 16k tokens."""
    torch.manual_seed(cfg['seed'])
    B, T, L, d = cfg['batch_size'], cfg['block_size'], cfg['n_layer'], cfg['n_embd']
    mcfg = GPTConfig(n_layer=L, n_head=cfg['n_head'], n_embd=d, **VARIANTS[cfg['route_variant']])
    model = GPT(mcfg).to(device)
    cli.fast_paths(model, cfg['route_impl'])
    stream = model.stream
    dtype = getattr(torch, cfg['dtype'])
    autocast = cli.autocast(device, cfg['dtype'])
    e = torch.randn(B, T, d, device=device, requires_grad=True)
    outs = [torch.randn(B, T, d, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2 * L)]
    grads = [torch.randn(B, T, d, device=device) for _ in range(2 * L + 1)]

    def run(e, outs):
        st = stream.start(e)
        hs = []
        for s, out in enumerate(outs):
            hs.append(stream.read(st, s))
            stream.write(st, s, out, hs[-1], None)
        return hs + [stream.final(st)]

    fused = hasattr(stream, 'fused') and stream.fused(e)  # fast.route.FusedRouted on its own path
    route = torch.compile(run) if cfg['compile'] else run

    def step():
        with autocast:
            hs = route(e, outs)
        torch.autograd.backward(hs, grads)

    for _ in range(3):
        step()
    sync(device)
    t0 = time.time()
    for _ in range(cfg['route_steps']):
        step()
    sync(device)
    dt = (time.time() - t0) / cfg['route_steps']
    gpu_ms = None
    if device.type == 'cuda':  # the kernels' own time: alone, the op can wait on the CPU's launches
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA],
                                    acc_events=True) as prof:
            for _ in range(cfg['route_steps']):
                step()
            sync(device)
        gpu_ms = kernel_ms(prof, cfg['route_steps'])
    pairs = sum(_num_sources(r + int(stream.additive), stream.S) for r in range(stream.n_reads))
    nbytes = 2 * pairs * B * T * d * dtype.itemsize
    # the ceiling to compare with: a large device-to-device copy (bytes read + bytes written)
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.time()
    for _ in range(20):
        y.copy_(x)
    sync(device)
    copy_bw = 2 * x.numel() * 20 / (time.time() - t0)
    return dict(variant=cfg['route_variant'], impl='fused' if fused else 'plain', pairs=pairs,
                tokens=B * T, d=d, ms=1000 * dt, gpu_ms=gpu_ms, bytes=nbytes,
                gb_per_s=nbytes / (gpu_ms / 1000 if gpu_ms else dt) / 1e9,
                copy_gb_per_s=copy_bw / 1e9)


def main(argv=None):
    cfg = parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(cfg['device'])
    # as train.py: TF32 for the fp32 matmuls that remain (the routing logits)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}, '
              f'peak {peak_flops(device) or float("nan"):.3g} FLOP/s')
    rows = []
    result = dict(device=(torch.cuda.get_device_name(device) if device.type == 'cuda'
                          else device.type),
                  torch=torch.__version__, date=time.strftime('%Y-%m-%d'), config=cfg,
                  variants=rows)
    for name in cfg['variants'].split(','):
        rows.append(bench_variant(name, cfg, device))
        r = rows[-1]
        print(f'{name}: {r["ms_per_step"]:.1f} ms/step (warm-up {r["warmup_s"]:.0f} s)', flush=True)
        if device.type == 'cuda':  # give the memory back, so the next variant's peak is its own
            torch.cuda.empty_cache()
        with open(cfg['json'], 'w') as f:  # so far: a run cut short still leaves its measurements
            json.dump(result, f, indent=1)
    base = next((r for r in rows if r['variant'] == 'standard'), None)
    fmt = lambda v, f: '-' if v is None else format(v, f)
    print('\n| variant | ms/step | tok/s | MFU | peak mem (MB) | step vs standard '
          '| mem vs standard | warm-up (s) |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:  # ratios against the standard model measured in this same run
        r['step_ratio'] = r['ms_per_step'] / base['ms_per_step'] if base else None
        r['mem_ratio'] = (r['peak_mem_mb'] / base['peak_mem_mb'] if base and r['peak_mem_mb']
                          else None)
        print(f'| {r["variant"]} | {r["ms_per_step"]:.1f} | {r["tok_per_s"]:,.0f} | '
              f'{fmt(r["mfu"] and 100 * r["mfu"], ".1f")}{"%" if r["mfu"] else ""} | '
              f'{fmt(r["peak_mem_mb"], ",.0f")} | {fmt(r["step_ratio"], ".2f")}x | '
              f'{fmt(r["mem_ratio"], ".2f")}{"x" if r["mem_ratio"] else ""} | '
              f'{r["warmup_s"]:.0f} |')
    if cfg['route_steps'] > 0:
        rt = result['routing'] = bench_routing(cfg, device)
        print(f'\nrouting of a whole {rt["variant"]} stream ({rt["impl"]}), '
              f'{rt["pairs"]} (source, read) pairs x {rt["tokens"]} tokens x {rt["d"]} wide, '
              f'fwd+bwd: {rt["ms"]:.3f} ms'
              + ('' if rt['gpu_ms'] is None else f' ({rt["gpu_ms"]:.3f} ms of GPU kernels)')
              + f', {rt["gb_per_s"]:.0f} GB/s of bytes that must move'
              f' ({100 * rt["gb_per_s"] / rt["copy_gb_per_s"]:.0f}% of a copy\'s '
              f'{rt["copy_gb_per_s"]:.0f} GB/s)')
    with open(cfg['json'], 'w') as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
