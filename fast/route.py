"""
Fused routing for Attention Residuals and Delta Attention Residuals: the math of model.Routed and
model.depth_route, organised around the GPU's memory bandwidth. model.py stays the reference; this
file is what `fast.apply(model, 'fused')` (anywhere) or `'auto'` (on CUDA, per-sublayer forms) runs,
and tests/test_fastroute.py holds it to the reference, forward and every gradient.

What the plain path costs, and what this one does instead (per token, d wide, n sources at a read):
- Forward, a read mixes its n sources. Plain: one generated kernel per read (fine), plus the logits
  of every new partial block against all reads. Here: one kernel per read reads each visible source
  once, in the storage dtype (bf16 under autocast), and computes the softmax on the fly from logits
  that were computed once, when the source was registered.
- Backward, plain: autograd adds each read's contribution into each source's gradient, a
  read-modify-write of an fp32 (B, T, d) tensor per (source, read) pair, about 10 bytes per element
  per pair. Here: a read's backward only stores its output gradient g_r (bf16) and one number per
  token, c_r = g_r . mix_r. A source's backward runs once, after every read that saw it, and reads
  v_i and each later g_r once:
      dL/dv_i = sum_r a_ir g_r + (terms of the logits, from dl_ir = a_ir (g_r . v_i - c_r))
  so about 2 bytes per element per pair, with nothing accumulated in memory.

How autograd is made to run a source's backward after all of its reads: every op here takes and
returns a 0-dim "token" tensor, chained in forward order, and every backward op takes and returns
the token's gradient. Backward runs the chain in reverse, so when source i's backward runs, every
later read's backward has run and left its g_r in the Router (the buffers of one forward pass). The
sources are not autograd inputs of the reads (the reads find them in the Router's buffer), so
autograd never builds one gradient tensor per pair.

The ops are registered with torch.library: torch.compile keeps each as one call in the model's graph
(the tokens order them there too) and fuses everything around them. Kernels: Triton on CUDA (and on
CPU under TRITON_INTERPRET=1, for tests); elsewhere the same arithmetic in torch.
"""

import math
import os
import weakref

import torch

from model import Routed, source_logits, wide

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch versions below do the same arithmetic
    triton = None

EPS = 1e-6  # source_logits' epsilon in the RMS of a key


class FusedRouted(Routed):
    """model.Routed with the fused path: the same parameters, the same math. Falls back to Routed's
    code where the fused path is not used (impl='auto' off CUDA, or while routing.py probes logits).
    """

    def __init__(self, config, additive, impl):
        super().__init__(config, additive)
        self.impl = impl
        # The plan, fixed by the config: slot 0 is the embedding, slot s + 1 the partial (or
        # finished) block after sublayer s's write. A slot is read by a contiguous range of reads
        # [r0, r1): every later read once its block is finished, only the next read while it is
        # a partial block.
        R, S = self.n_reads, self.S
        self.ranges = [(0, R)]  # read number r of sublayer s is r = s (AttnRes) or s - 1 (Delta)
        for s in range(2 * config.n_layer):
            r0 = s + 1 - int(additive)  # the first read after sublayer s's write
            if r0 < R:  # Delta's last output is read by no one: no slot
                self.ranges.append((r0, R if (s + 1) % S == 0 else r0 + 1))
        self.visible = [[i for i, (r0, r1) in enumerate(self.ranges) if r0 <= r < r1]
                        for r in range(R)]
        n = max(map(len, self.visible)) + 1
        # (R, n) slot table for the kernels, padded with slot 0 (a valid address, never used); moved
        # to the device with the model, once, rather than every step
        self.register_buffer('table', torch.tensor([v + [0] * (n - len(v)) for v in self.visible],
                                                   dtype=torch.int32), persistent=False)
        # the ops find this stream's plan and its latest Router by this key (ints pass through
        # the compiler)
        self.key = OPS.register(self, Plan(self.ranges, self.visible, R))

    def fused(self, e):
        # 'auto': on CUDA for the per-sublayer forms only. Measured on an H100 at GPT-2 124M, the
        # fused path is as fast or faster there and compiles in a fifth of the time; in block
        # form (<= 5 sources a read) torch.compile's own fusion of the plain path is faster
        # (docs/performance.md)
        auto = e.is_cuda and self.S == 1
        return self.probe is None and (self.impl == 'fused' or (self.impl == 'auto' and auto))

    def start(self, e):
        if not self.fused(e):
            return super().start(e)
        # sources are stored as the sublayers output them: the autocast dtype, if on
        dev = e.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else e.dtype
        W = self.query * self.key_gain
        # 'new': the source the last write made (slot, tensor), registered by the next read
        return {'x': e, 'W': W, 'partial': None, 'dtype': dtype, 'new': None,
                'token': torch.ops.fastroute.start(e, W, self.key, dtype)}

    def read(self, st, s):
        if 'token' not in st:
            return super().read(st, s)
        if self.additive and s == 0:
            return st['x']  # as Routed: sublayer 0 of Delta reads e unrouted
        r = s - int(self.additive)
        gamma = None if self.gate is None else self.gate[r]
        return self._read(st, r, st['x'] if self.additive else None, gamma)

    def _read(self, st, r, base, gamma):
        slot, v = st['new'] or (-1, None)
        h, _, st['token'] = torch.ops.fastroute.read(st['token'], v, st['W'], base, gamma,
                                                     self.table[r], self.key, slot, r,
                                                     list(st['x'].shape), st['dtype'])
        st['new'] = None
        return h

    def write(self, st, s, out, h, c):
        if 'token' not in st:
            return super().write(st, s, out, h, c)
        if self.additive:
            st['x'] = st['x'] + out
        st['partial'] = out if st['partial'] is None else wide(st['partial']) + out  # as Routed
        if s + 1 < len(self.ranges):  # a source for the reads to come, registered by the next one
            st['new'] = (s + 1, st['partial'])
        if (s + 1) % self.S == 0:
            st['partial'] = None

    def final(self, st):
        if 'token' not in st or self.additive:
            return super().final(st)
        return self._read(st, self.n_reads - 1, None, None)


class Plan:
    """A stream's slots and reads, and the Router of its latest forward pass (one forward at a time:
    the backward of a step must run before the next step's forward, as in training)."""

    def __init__(self, ranges, visible, n_reads):
        self.ranges, self.visible, self.n_reads, self.router = ranges, visible, n_reads, None


class Router:
    """The sources, logits and softmax statistics of one forward pass, shared by its ops."""

    def __init__(self, plan, e, dtype):
        B, T, d = e.shape
        n, R, M = len(plan.ranges), plan.n_reads, B * T
        acc = wide(e).dtype  # statistics in fp32 (or wider)
        self.V = e.new_empty((n, M, d), dtype=dtype)     # slot i: source i, (M, d)
        self.Lg = e.new_empty((n, R, M), dtype=acc)      # its logit against read r, where r sees it
        # per read
        self.mmax, self.ssum, self.c = (e.new_empty((R, M), dtype=acc) for _ in range(3))
        self.G = None   # (R, M, d) read-output gradients, allocated by the first read backward
        self.dW = None  # (R, d) the queries' gradient, summed over the sources' backward
        self.plan = plan

# --------------------------------------------------------------------------------------------------
# The ops, registered with torch.library so that torch.compile keeps each as one opaque call in its
# graph. Two ops: start (a new Router, the embedding as its first source) and read (the source the
# last write made, registered, then a routed read), each with its backward. Each takes the token of
# the op before it and returns a new one (see the top of this file); the backward ops take and
# return the token's gradient, so the compiled backward keeps the same order. One op per sublayer,
# kept lean: a plain Library kernel (the least dispatch overhead), no work on the token but a 0-dim
# allocation.

class Ops:
    """A torch.library namespace of ops, defined once per process. A second import of the file that
    defines them (a tool that reloads the project's modules, as exercises.py's grader does) finds
    them there, and shares their registry (the per-stream state the ops find by an int key).
    fast/ddl.py uses it too."""

    def __init__(self, ns, schemas):
        ops = getattr(torch.ops, ns)
        self.first = not hasattr(ops, 'registry')
        if self.first:
            ops.registry = {}
            ops.lib = torch.library.Library(ns, 'DEF')  # kept alive with the ops
            for schema in schemas:
                ops.lib.define(schema)
        self.ns, self.lib, self.registry = ns, ops.lib, ops.registry

    def impl(self, name):
        """Decorator: the op's kernel, for every device (`autograd` registers its autograd)."""
        def register(fn):
            if self.first:
                self.lib.impl(name, fn, 'CompositeExplicitAutograd')
            return fn
        return register

    def fake(self, name):
        """Decorator: the op's output shapes, for the compiler."""
        return torch.library.register_fake(f'{self.ns}::{name}') if self.first else (lambda fn: fn)

    def register(self, owner, value):
        """A new key under which the ops find value, for as long as owner (a module) lives."""
        key = len(self.registry) and max(self.registry) + 1
        self.registry[key] = value
        weakref.finalize(owner, self.registry.pop, key, None)
        return key

    def autograd(self, name, backward, setup):
        if self.first:
            torch.library.register_autograd(f'{self.ns}::{name}', backward, setup_context=setup)


OPS = Ops('fastroute', [
    'start(Tensor e, Tensor W, int key, ScalarType dtype) -> Tensor',
    'start_backward(Tensor g_token, Tensor W, int key, SymInt[] shape, ScalarType e_dtype)'
    ' -> (Tensor, Tensor)',
    'read(Tensor token, Tensor? v, Tensor W, Tensor? base, Tensor? gamma, Tensor slots, int key,'
    ' int slot, int r, SymInt[] shape, ScalarType dtype) -> (Tensor, Tensor, Tensor)',
    'read_backward(Tensor g_token, Tensor g_h, Tensor mix, Tensor? gamma, Tensor W, int key,'
    ' int slot, int r, SymInt[] shape, ScalarType v_dtype) -> (Tensor, Tensor, Tensor)'])
PLANS = OPS.registry
impl, fake = OPS.impl, OPS.fake


@impl('start')
def start_op(e, W, key, dtype):
    """A new Router for this forward pass, with the embedding as its slot 0."""
    ro = PLANS[key].router = Router(PLANS[key], e, dtype)
    add_source(ro, e.reshape(-1, e.size(-1)), W, 0, *ro.plan.ranges[0])
    return e.new_empty((), dtype=ro.Lg.dtype)


@impl('start_backward')
def start_backward_op(g_token, W, key, shape, e_dtype):
    """The embedding's gradient from the routing, and the queries' whole gradient (summed over the
    sources' backward in the Router). The last of the chain: the step's buffers can go now."""
    ro = PLANS[key].router
    de = source_backward(ro, W, 0)
    PLANS[key].router = None
    return de.view(shape).to(e_dtype), ro.dW


@impl('read')
def read_op(token, v, W, base, gamma, slots, key, slot, r, shape, dtype):
    """Registers the source v (the last write's, if any) in `slot`, then routed read r: h = mix
    (AttnRes) or base + gamma * mix (Delta), and (Delta) the mix in the storage dtype, for the
    backward."""
    ro = PLANS[key].router
    if v is not None:
        add_source(ro, v.reshape(-1, v.size(-1)), W, slot, *ro.plan.ranges[slot])
    h, mix = read_mix(ro, r, slots, base, gamma)
    return (h.view(shape), (mix if mix is not None else h.new_empty(0, dtype=dtype)),
            token.new_empty(()))


@impl('read_backward')
def read_backward_op(g_token, g_h, mix, gamma, W, key, slot, r, shape, v_dtype):
    """Leaves g_r = gamma dL/dh and c_r = g_r . mix in the Router, then (if the read registered a
    source) that source's whole gradient: every read that saw it has run its backward by now.
    Returns dL/dh . mix per token (for the gate's gradient) and the source's gradient."""
    ro = PLANS[key].router
    if ro.G is None:  # the last read's backward comes first
        ro.G = ro.V.new_empty((ro.plan.n_reads,) + ro.V.shape[1:])
    d = g_h.size(-1)
    ch = read_grad(ro, r, g_h.reshape(-1, d), mix.reshape(-1, d), gamma)
    dv = (g_h.new_empty(0, dtype=v_dtype) if slot < 0
          else source_backward(ro, W, slot).view(shape).to(v_dtype))
    return ch, dv, g_token.new_empty(())


def source_backward(ro, W, slot):
    """A source's gradient (M, d); its share of the queries' gradient goes into the Router's sum."""
    r0, r1 = ro.plan.ranges[slot]
    v = ro.V[slot]
    dv, dlr = source_grad(ro, W, slot, r0, r1)  # dlr: (r1 - r0, M) logit gradients over rms(v)
    if ro.dW is None:
        ro.dW = torch.zeros_like(W)
    # dL/dW_r = sum over tokens of dl_r * v / rms(v): the logit is (W_r . v) / rms(v)
    ro.dW[r0:r1] += dlr.to(v.dtype) @ v
    return dv


@fake('start')
def _(e, W, key, dtype):
    return e.new_empty((), dtype=wide(e).dtype)


@fake('start_backward')
def _(g_token, W, key, shape, e_dtype):
    return g_token.new_empty(shape, dtype=e_dtype), torch.empty_like(W)


@fake('read')
def _(token, v, W, base, gamma, slots, key, slot, r, shape, dtype):
    mix = token.new_empty((math.prod(shape[:-1]), shape[-1]) if base is not None else (0,),
                          dtype=dtype)
    return token.new_empty(shape), mix, token.new_empty(())


@fake('read_backward')
def _(g_token, g_h, mix, gamma, W, key, slot, r, shape, v_dtype):
    dv = g_token.new_empty(shape if slot >= 0 else (0,), dtype=v_dtype)
    return g_token.new_empty(g_h.numel() // g_h.size(-1)), dv, g_token.new_empty(())


def _start_setup(ctx, inputs, output):
    e, W, key, dtype = inputs
    ctx.key, ctx.shape, ctx.e_dtype = key, list(e.shape), e.dtype
    ctx.save_for_backward(W)


def _start_backward(ctx, g_token):
    W, = ctx.saved_tensors
    de, dW = torch.ops.fastroute.start_backward(g_token, W, ctx.key, ctx.shape, ctx.e_dtype)
    return de, dW, None, None


def _read_setup(ctx, inputs, output):
    token, v, W, base, gamma, slots, key, slot, r, shape, dtype = inputs
    h, mix, _ = output
    ctx.key, ctx.slot, ctx.r, ctx.shape, ctx.has_base = key, slot, r, shape, base is not None
    ctx.v_dtype = v.dtype if v is not None else dtype
    ctx.save_for_backward(mix if base is not None else h, gamma, W)  # AttnRes: h is the mix


def _read_backward(ctx, g_h, g_mix, g_token):
    mix, gamma, W = ctx.saved_tensors
    ch, dv, g_token = torch.ops.fastroute.read_backward(g_token, g_h, mix, gamma, W, ctx.key,
                                                        ctx.slot, ctx.r, ctx.shape, ctx.v_dtype)
    dgamma = None if gamma is None else ch.sum().to(gamma.dtype)
    dv = dv if ctx.slot >= 0 else None
    # W's gradient is returned once, by the start's backward; the token's carries the order
    return (g_token, dv, None, (g_h if ctx.has_base else None), dgamma,
            None, None, None, None, None, None)


OPS.autograd('start', _start_backward, _start_setup)
OPS.autograd('read', _read_backward, _read_setup)

# --------------------------------------------------------------------------------------------------
# The three computations, each in torch (the definition) and in Triton (one pass over memory)

def use_triton(t):
    return triton is not None and (t.is_cuda or os.environ.get('TRITON_INTERPRET') == '1')


def add_source(ro, v, W, slot, r0, r1):
    """V[slot] = v; Lg[slot, r] = (W_r . v) / rms(v) for r in [r0, r1)."""
    M, d = v.shape
    if use_triton(v):
        v = v.contiguous()
        _add_source_kernel[(triton.cdiv(M, BM),)](
            v, W, ro.V[slot], ro.Lg[slot], r0, r1, M, d, EPS,
            BM=BM, BD=triton.next_power_of_2(d), num_warps=WARPS)
    else:
        ro.V[slot] = v
        ro.Lg[slot, r0:r1] = source_logits(v, W[r0:r1], EPS).t()


def read_mix(ro, r, table, base, gamma):
    """The mixture of the sources read r sees; its softmax max and sum are kept for the backward.
    Returns h (M, d) and, for Delta, the mix in the storage dtype (AttnRes: None, h is the mix)."""
    slots = ro.plan.visible[r]
    M, d = ro.V.shape[1:]
    acc = ro.Lg.dtype
    h = ro.V.new_empty((M, d), dtype=acc)
    mix = None if base is None else ro.V.new_empty((M, d))
    if use_triton(h):
        dummy = h  # unused pointer arguments
        _read_kernel[(triton.cdiv(M, BM),)](
            ro.V, ro.Lg, table, len(slots), r, dummy if base is None else base.contiguous(),
            dummy if gamma is None else gamma, h, dummy if mix is None else mix, ro.mmax[r],
            ro.ssum[r], M, d, ro.Lg.size(1),
            HAS_BASE=base is not None, HAS_GAMMA=gamma is not None, BM=BM,
            BD=triton.next_power_of_2(d), num_warps=WARPS)
    else:
        lg = ro.Lg[slots, r]                                       # (n, M)
        ro.mmax[r] = lg.max(0).values
        w = (lg - ro.mmax[r]).exp()
        ro.ssum[r] = w.sum(0)
        # einsum would otherwise run in the autocast dtype
        with torch.autocast(h.device.type, enabled=False):
            # (n, M) weights against (n, M, d) sources -> (M, d)
            h = torch.einsum('nm,nmd->md', w / ro.ssum[r], ro.V[slots].to(acc))
        if base is not None:
            mix[:] = h
            h = base.reshape(M, d) + (h if gamma is None else gamma * h)
    return h, mix


def read_grad(ro, r, gh, mix, gamma):
    """G[r] = gamma * dL/dh, c[r] = G[r] . mix; returns dL/dh . mix per token (M,)."""
    M, d = gh.shape
    ch = gh.new_empty(M, dtype=ro.c.dtype)
    if use_triton(gh):
        _read_grad_kernel[(triton.cdiv(M, BM),)](
            gh.contiguous(), mix, gamma if gamma is not None else ch, ro.G[r], ro.c[r], ch, M, d,
            HAS_GAMMA=gamma is not None, BM=BM, BD=triton.next_power_of_2(d), num_warps=WARPS)
    else:
        g = gh if gamma is None else gamma * gh
        ro.G[r] = g
        ch[:] = (wide(gh) * wide(mix)).sum(-1)
        ro.c[r] = ch if gamma is None else gamma * ch
    return ch


def source_grad(ro, W, i, r0, r1):
    """dL/dv_i (M, d) from the reads r0 <= r < r1 that saw source i, and the logit gradients over
    rms(v_i) (r1 - r0, M) for the queries' gradient. With a_r = softmax weight, l_r = logit,
    g_r = read gradient:
        dl_r = a_r (g_r . v - c_r)
        dv = sum_r a_r g_r + (sum_r dl_r W_r) / rms(v) - (sum_r dl_r l_r) v / (d rms(v)^2)
    the last two terms being d l_r / dv = W_r / rms(v) - l_r v / (d rms(v)^2) (the key's RMS)."""
    M, d = ro.V.shape[1:]
    acc = ro.Lg.dtype
    if use_triton(ro.V):
        dv = ro.V.new_empty((M, d), dtype=acc)
        dlr = ro.V.new_empty((r1 - r0, M), dtype=acc)
        _source_grad_kernel[(triton.cdiv(M, BM),)](
            ro.V[i], ro.G[r0], ro.Lg[i], ro.mmax, ro.ssum, ro.c, W, r0, r1, dv, dlr, M, d, EPS,
            BM=BM, BD=triton.next_power_of_2(d), num_warps=WARPS)
        return dv, dlr
    # the matmul and einsums in fp32 (or fp64)
    with torch.autocast(ro.V.device.type, enabled=False):
        v, G = ro.V[i].to(acc), ro.G[r0:r1].to(acc)                   # (M, d), (k, M, d)
        rinv = torch.rsqrt(v.pow(2).mean(-1) + EPS)                     # (M,)
        lg = ro.Lg[i, r0:r1]                                            # (k, M)
        a = (lg - ro.mmax[r0:r1]).exp() / ro.ssum[r0:r1]
        dl = a * (torch.einsum('kmd,md->km', G, v) - ro.c[r0:r1])
        dv = (torch.einsum('km,kmd->md', a, G) + rinv[:, None] * (dl.t() @ W[r0:r1].to(acc))
              - ((dl * lg).sum(0) * rinv ** 2 / d)[:, None] * v)
    return dv, dl * rinv


BM, WARPS = 4, 4  # tokens per program and warps: a 4 x 1024 fp32 tile is 32 registers a thread

if triton is not None:
    @triton.jit
    def _add_source_kernel(v_ptr, W, V, Lg, r0, r1, M, D, eps, BM: tl.constexpr, BD: tl.constexpr):
        # V, Lg: this slot's (M, D) source and (R, M) logits
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BD)
        rmask, cmask = rows < M, cols < D
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        tl.store(V + offs, v, mask=mask)
        v = v.to(tl.float32)
        rinv = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
        for r in range(r0, r1):
            w = tl.load(W + r * D + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(Lg + r * M + rows, tl.sum(v * w[None, :], 1) * rinv, mask=rmask)

    @triton.jit
    def _read_kernel(V, Lg, slots, n, r, base, gamma, H, MIX, MMAX, SSUM, M, D, R,
                     HAS_BASE: tl.constexpr, HAS_GAMMA: tl.constexpr, BM: tl.constexpr,
                     BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BD)
        rmask = rows < M
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        m = tl.full([BM], float('-inf'), tl.float32)
        # the softmax max first: a second pass over n logits is cheaper than rescaling
        for i in range(n):
            sl = tl.load(slots + i).to(tl.int64)
            m = tl.maximum(m, tl.load(Lg + (sl * R + r) * M + rows, mask=rmask, other=0.0))
        s = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        # the next source's values and logit are loaded before this one's math (software pipelining)
        sl = tl.load(slots).to(tl.int64)
        x_next = tl.load(V + sl * M * D + offs, mask=mask, other=0.0)
        l_next = tl.load(Lg + (sl * R + r) * M + rows, mask=rmask, other=0.0)
        for i in range(n):  # each source is read once
            x, w = x_next, tl.exp(l_next - m)
            # (rows * 0 + ...: a vector condition, which the interpreter accepts in a mask as
            # the compiler does)
            more = rmask & (rows * 0 + i + 1 < n)
            # the table's padding makes slots[n] a valid slot
            sl = tl.load(slots + i + 1).to(tl.int64)
            x_next = tl.load(V + sl * M * D + offs, mask=mask & more[:, None], other=0.0)
            l_next = tl.load(Lg + (sl * R + r) * M + rows, mask=more, other=0.0)
            s += w
            acc += w[:, None] * x.to(tl.float32)
        mix = acc / s[:, None]
        tl.store(MMAX + rows, m, mask=rmask)  # this read's rows of the (R, M) statistics
        tl.store(SSUM + rows, s, mask=rmask)
        if HAS_BASE:
            tl.store(MIX + offs, mix, mask=mask)
            if HAS_GAMMA:
                mix = mix * tl.load(gamma)
            mix += tl.load(base + offs, mask=mask, other=0.0)
        tl.store(H + offs, mix, mask=mask)

    @triton.jit
    def _read_grad_kernel(GH, MIX, gamma, G, C, CH, M, D,
                          HAS_GAMMA: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BD)
        rmask = rows < M
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        gh = tl.load(GH + offs, mask=mask, other=0.0).to(tl.float32)
        ch = tl.sum(gh * tl.load(MIX + offs, mask=mask, other=0.0).to(tl.float32), 1)
        tl.store(CH + rows, ch, mask=rmask)
        if HAS_GAMMA:
            gm = tl.load(gamma)
            gh, ch = gh * gm, ch * gm
        tl.store(G + offs, gh, mask=mask)  # G, C: this read's rows
        tl.store(C + rows, ch, mask=rmask)

    @triton.jit
    def _source_grad_kernel(V, G, Lg, MMAX, SSUM, C, W, r0, r1, DV, DLR, M, D, eps,
                            BM: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BD)
        rmask, cmask = rows < M, cols < D
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)  # V, Lg: source i's slot
        rinv = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
        # pass 1 streams the reads' gradients (the bytes that matter): sum_r a_r g_r and each dl_r
        acc = tl.zeros([BM, BD], tl.float32)
        # G starts at read r0's gradient; a step of M * D per read (64-bit pointer arithmetic)
        gp = G + offs
        # the next read's gradient and statistics are loaded before this one's math
        # (software pipelining)
        g_next = tl.load(gp, mask=mask, other=0.0)
        q = r0 * M + rows
        l_next, m_next = (tl.load(Lg + q, mask=rmask, other=0.0),
                          tl.load(MMAX + q, mask=rmask, other=0.0))
        s_next, c_next = (tl.load(SSUM + q, mask=rmask, other=1.0),
                          tl.load(C + q, mask=rmask, other=0.0))
        for r in range(r0, r1):  # each later read's gradient is read once
            g, a, c = g_next.to(tl.float32), tl.exp(l_next - m_next) / s_next, c_next
            gp += M * D
            more = rmask & (rows * 0 + r + 1 < r1)
            q += M
            g_next = tl.load(gp, mask=mask & more[:, None], other=0.0)
            l_next, m_next = (tl.load(Lg + q, mask=more, other=0.0),
                              tl.load(MMAX + q, mask=more, other=0.0))
            s_next, c_next = (tl.load(SSUM + q, mask=more, other=1.0),
                              tl.load(C + q, mask=more, other=0.0))
            dl = a * (tl.sum(g * v, 1) - c)
            acc += a[:, None] * g
            tl.store(DLR + (r - r0) * M + rows, dl, mask=rmask)
        tl.debug_barrier()  # pass 2 reads back what other threads of this program stored
        # pass 2, small loads only (dl_r, l_r, W_r from cache): the logits' terms, kept out of
        # pass 1's registers
        accw = tl.zeros([BM, BD], tl.float32)  # sum_r dl_r W_r
        sdl = tl.zeros([BM], tl.float32)       # sum_r dl_r l_r
        for r in range(r0, r1):
            dl = tl.load(DLR + (r - r0) * M + rows, mask=rmask, other=0.0)
            accw += (dl[:, None]
                     * tl.load(W + r * D + cols, mask=cmask, other=0.0).to(tl.float32)[None, :])
            sdl += dl * tl.load(Lg + r * M + rows, mask=rmask, other=0.0)
            tl.store(DLR + (r - r0) * M + rows, dl * rinv, mask=rmask)
        dv = acc + rinv[:, None] * accw - (sdl * rinv * rinv / D)[:, None] * v
        tl.store(DV + offs, dv, mask=mask)
