"""
Fused routing for Attention Residuals and Delta Attention Residuals: the math of model.Routed and
model.depth_route, organised around the GPU's memory bandwidth. model.py stays the reference; this
file is what `fast.apply(model, 'fused')` (anywhere) or `'auto'` (on CUDA) runs, and
tests/test_fastroute.py holds it to the reference, forward and every gradient.

What the plain path costs, and what this one does instead (per token, d wide, n sources at a read):
- Forward, a read mixes its n sources. Plain: one generated kernel per read (fine), plus the block's
  running sum, and its logits against every read, in kernels of their own. Here: one kernel per
  read adds the last sublayer output to the block's running sum (fp32, kept in the Router), stores
  the sum as a source (bf16 under autocast) with its logits against every read that will see it,
  and mixes it (as stored) with the other visible sources, each read once, the softmax done on the
  fly from logits that were computed once, when each source was made.
- Backward, plain: autograd adds each read's contribution into each source's gradient, a
  read-modify-write of an fp32 (B, T, d) tensor per (source, read) pair, about 10 bytes per element
  per pair. Here: a read's backward stores its output gradient g_r (bf16) and one number per token,
  c_r = g_r . mix_r; in the same kernel it makes the gradient of the source it registered, whose
  reads have all run their backward by now, reading v_i and each later g_r once:
      dL/dv_i = sum_r a_ir g_r + (terms of the logits, from dl_ir = a_ir (g_r . v_i - c_r))
  so about 2 bytes per element per pair, with nothing accumulated in memory. The block's running
  sum passes the gradient down (p_s = p_{s-1} + out_s, so dL/dout_s = dL/dp_s), in the same kernel,
  so the sublayer gets its output's gradient with no autograd sum in between. The queries' gradient
  is one batched matmul at the end, over the logit gradients (kept, as the logits, for the reads
  that see a source only, and laid out densely, zeros between, for that matmul alone).

How autograd is made to run a source's backward after all of its reads: every op here takes and
returns a 0-dim "token" tensor, chained in forward order, and every backward op takes and returns
the token's gradient. Backward runs the chain in reverse, so when source i's backward runs, every
later read's backward has run and left its g_r in the Router (the buffers of one forward pass). The
sources are not autograd inputs of the reads (the reads find them in the Router's buffer), so
autograd never builds one gradient tensor per pair.

The ops are registered with torch.library, each with its backward as a torch.autograd.Function:
torch.compile keeps each as one call in the model's graph (the tokens order them there too) and
fuses everything around them. Kernels: Triton on CUDA (and on CPU under TRITON_INTERPRET=1, for
tests); elsewhere the same arithmetic in torch.
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
        # the slot read r registers (i >= 1 first read by r) is made in registers, not loaded: the
        # kernels get the others, as an (R, 2, n) table, [r, 0] their slots and [r, 1] the rows of
        # their logits against read r (Plan.lo), padded with slot 0 and its row, r (a valid
        # address, never used); moved to the device with the model, once, rather than every step
        others = [[i for i in v if i == 0 or self.ranges[i][0] != r]
                  for r, v in enumerate(self.visible)]
        plan = Plan(self.ranges, self.visible, others, R, S, additive)
        n = max(map(len, others)) + 1
        self.register_buffer('table', torch.tensor(
            [[v + [0] * (n - len(v)), [plan.lo[i] + r for i in v] + [r] * (n - len(v))]
             for r, v in enumerate(others)], dtype=torch.int32), persistent=False)
        # the ops find this stream's plan and its latest Router by this key (ints pass through
        # the compiler)
        self.key = OPS.register(self, plan)

    def fused(self, e):
        # 'auto': on CUDA, every form. At 12 x 512 on one H100: attnres / delta block 1.13x /
        # 1.22x a standard step fused against 1.28x / 1.30x plain, with half the warm-up; on a
        # machine with a slower CPU 1.28x / 1.51x fused against 1.29x plain (attnres block): a step
        # that short can wait on the fused op's Python, two calls a sublayer (docs/performance.md)
        return self.probe is None and (self.impl == 'fused' or (self.impl == 'auto' and e.is_cuda))

    def start(self, e):
        if not self.fused(e):
            return super().start(e)
        # sources are stored as the sublayers output them: the autocast dtype, if on
        dev = e.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else e.dtype
        W = self.query * self.key_gain
        # 'new': the last write's output (slot, tensor), added to its block by the next read
        return {'x': e, 'W': W, 'dtype': dtype, 'new': None,
                'token': route_start(e, W, self.key, dtype)}

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
        h, _, st['token'] = route_read(st['token'], v, st['W'], base, gamma, self.table[r],
                                       self.key, slot, r, list(st['x'].shape), st['dtype'])
        st['new'] = None
        return h

    def write(self, st, s, out, h, c):
        if 'token' not in st:
            return super().write(st, s, out, h, c)
        if self.additive:
            st['x'] = st['x'] + out
        # the block's running sum lives in the Router: the next read adds out to it (as Routed's
        # partial, in fp32) and registers the sum as slot s + 1, if anyone reads it
        if s + 1 < len(self.ranges):
            st['new'] = (s + 1, out)

    def final(self, st):
        if 'token' not in st or self.additive:
            return super().final(st)
        return self._read(st, self.n_reads - 1, None, None)


REMIX = 8  # a Delta read that sees at most this many other sources remakes its mix (Plan.keep_mix)


class Plan:
    """A stream's slots and reads, and the Router of its latest forward pass (one forward at a time:
    the backward of a step must run before the next step's forward, as in training)."""

    def __init__(self, ranges, visible, others, n_reads, S, additive):
        self.ranges, self.visible, self.others, self.n_reads = ranges, visible, others, n_reads
        n = len(ranges)
        # the logits (and their gradients) are kept for the (source, read) pairs only: source i's
        # against read r in row lo[i] + r of a (pairs, M) buffer, its rows following the slots
        # before it (lo[0] = 0). A dense (n, R, M) table held 24 x 23 rows for delta block's 79
        # pairs at 124M, B=16: 29.6 of its 36.2 MB unused through the whole step, which took the
        # step's peak over 1.05x standard's (docs/performance.md)
        self.pairs = sum(r1 - r0 for r0, r1 in ranges)
        self.lo = [sum(b - a for a, b in ranges[:i]) - r0 for i, (r0, _) in enumerate(ranges)]
        # keep_mix[r]: Delta's read r keeps its mix (fp32) for the backward's c_r = g_r . mix_r;
        # else the backward makes it again from the sources, as the forward did (remix). Kept only
        # where it sees more than REMIX other sources: recomputed, the mix costs n bf16 loads an
        # element (2n bytes), kept 8 (4 written, 4 read) and 4 bytes an element of memory until the
        # backward: 1.16 GB a step at 124M, B=16, where delta block's peak memory went from 1.15x to
        # 1.05x standard's without it (an H100, docs/performance.md). 8: every block read up to 8
        # blocks remakes it (at most 8 bytes an element more than keeping it: estimated 0.1 ms a
        # step at 124M, full or block); full Delta keeps it from its ninth read on
        self.keep_mix = [additive and len(o) > REMIX for o in others]
        # narrow_h[r]: AttnRes's read r returns h in the sources' dtype (bf16 under autocast), half
        # the bytes of the LayerNorm input the backward keeps (48 -> 24 MB a read at 124M, B=16),
        # and its backward makes the mix again for c_r (as Delta's above); where it sees more than
        # REMIX others, h stays fp32 and is kept as the mix
        self.narrow_h = [not additive and len(o) <= REMIX for o in others]
        # slot j >= 1 is p_{j-1}, the running sum of its block after sublayer j - 1's write:
        # cont, p = P + out (sublayer j - 1 continues a block) or p = out (it starts one);
        # keep, P = p is kept for the next slot, which continues the same block
        self.cont = [False] + [(j - 1) % S != 0 for j in range(1, n)]
        self.keep = [j + 1 < n and self.cont[j + 1] for j in range(n)]
        # the queries' gradient takes every source's logit gradients against every read, (n, R, M),
        # zero where a read does not see the source: row lo[i] + r of Dl, or its last row, kept 0
        self.dense = [self.lo[i] + r if r0 <= r < r1 else self.pairs
                      for i, (r0, r1) in enumerate(ranges) for r in range(n_reads)]
        self.dense_on = {}  # that index on each device it was asked for, made once
        self.router = None

    def rows(self, i):
        """Source i's rows of the logits and their gradients: against its reads r0 <= r < r1."""
        r0, r1 = self.ranges[i]
        return slice(self.lo[i] + r0, self.lo[i] + r1)


class Router:
    """The sources, logits and softmax statistics of one forward pass, shared by its ops."""

    def __init__(self, plan, e, dtype):
        B, T, d = e.shape
        n, R, M = len(plan.ranges), plan.n_reads, B * T
        acc = wide(e).dtype  # statistics in fp32 (or wider)
        self.V = e.new_empty((n, M, d), dtype=dtype)     # slot i: source i, (M, d)
        self.Lg = e.new_empty((plan.pairs, M), dtype=acc)  # row lo[i] + r: source i's logit
        # against read r, where r sees it (Plan.lo)
        # per read
        self.mmax, self.ssum, self.c = (e.new_empty((R, M), dtype=acc) for _ in range(3))
        # the current block's running sum in fp32 (forward), then its gradient (backward)
        self.plan = plan
        self.P = self.running_sum()
        # backward: (R, M, d) read-output gradients, and each source's logit gradients over its
        # rms (as Lg, and a last row of zeros), allocated by the first read backward; then the
        # queries' gradient (R, d)
        self.G = self.Dl = self.dW = None
        self.BD = 1 << (d - 1).bit_length()  # d to a power of 2
        self.grid, self.warps = (-(-M // BM),), max(1, self.BD // 1024)  # programs, warps (see BM)

    def running_sum(self):
        """A new (M, d) fp32 buffer for the block's running sum or its gradient; None in the full
        forms, whose sources are single outputs. The forward's last read drops the forward's, so
        that it is not held through the loss (the step's peak), and the backward makes its own."""
        keep = any(self.plan.keep)
        return self.V.new_empty(self.V.shape[1:], dtype=self.Lg.dtype) if keep else None

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
        """Decorator: the op's kernel, for every device (`autograd` gives it its backward)."""
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
        """The op with its backward, as a torch.autograd.Function (setup saves what the backward
        needs, as register_autograd's setup_context does); returns what the streams call: its apply
        where autograd records, else the op itself. A Function, not torch.library.register_autograd:
        compiled, the graph then calls the op below autograd, one call into Python where
        register_autograd's wrapper makes two. Without grad (evaluation) the op is called directly:
        torch.compile (2.11 to 2.13) fails to trace a Function's setup_context under no_grad."""
        op = getattr(getattr(torch.ops, self.ns), name)
        fn = type(name, (torch.autograd.Function,), dict(
            forward=staticmethod(lambda *args: op(*args)), setup_context=staticmethod(setup),
            backward=staticmethod(backward)))
        return lambda *args: fn.apply(*args) if torch.is_grad_enabled() else op(*args)


OPS = Ops('fastroute', [
    'start(Tensor e, Tensor W, int key, ScalarType dtype) -> Tensor',
    'start_backward(Tensor g_token, Tensor W, int key, SymInt[] shape, ScalarType e_dtype)'
    ' -> (Tensor, Tensor)',
    'read(Tensor token, Tensor? v, Tensor W, Tensor? base, Tensor? gamma, Tensor slots, int key,'
    ' int slot, int r, SymInt[] shape, ScalarType dtype) -> (Tensor, Tensor, Tensor)',
    'read_backward(Tensor g_token, Tensor g_h, Tensor mix, Tensor? gamma, Tensor W, Tensor slots,'
    ' int key, int slot, int r, SymInt[] shape, ScalarType v_dtype) -> (Tensor, Tensor, Tensor)'])
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
    """The embedding's gradient from the routing, and the queries' whole gradient (from the logit
    gradients every source's backward left in the Router). The last of the chain: the step's
    buffers can go now."""
    ro = PLANS[key].router
    de = source_backward(ro, W, 0)
    PLANS[key].router = None
    return de.view(shape).to(e_dtype), ro.dW


@impl('read')
def read_op(token, v, W, base, gamma, slots, key, slot, r, shape, dtype):
    """Adds v (the last write's output, if any) to its block's running sum, registers the sum in
    `slot`, then routed read r: h = mix (AttnRes) or base + gamma * mix (Delta), and (Delta, where
    the plan keeps it) the mix in fp32, for the backward; else an empty tensor."""
    ro = PLANS[key].router
    h, mix = read_mix(ro, r, slots, None if v is None else v.reshape(-1, v.size(-1)), W, slot,
                      base, gamma)
    if r == ro.plan.n_reads - 1:  # the forward's last read: its running sum goes (running_sum)
        ro.P = None
    return (h.view(shape), (mix if mix is not None else h.new_empty(0)),
            token.new_empty(()))


@impl('read_backward')
def read_backward_op(g_token, g_h, mix, gamma, W, slots, key, slot, r, shape, v_dtype):
    """Leaves g_r = gamma dL/dh and c_r = g_r . mix in the Router, then (if the read registered a
    source) that source's whole gradient: every read that saw it has run its backward by now. The
    block's running sum passes it on: dL/dout of the write that made the source is the gradient of
    the sum, this source's own plus what the block's later sums pass down. Returns dL/dh . mix per
    token (for the gate's gradient) and dL/dout."""
    ro = PLANS[key].router
    if ro.G is None:  # the last read's backward comes first
        ro.G = ro.V.new_empty((ro.plan.n_reads,) + ro.V.shape[1:])
        # every row written (each source's backward writes its own) but the last, the zeros
        # source_backward pads with
        ro.Dl = ro.Lg.new_empty((ro.plan.pairs + 1, ro.Lg.size(1)))
        ro.Dl[-1] = 0
        ro.P = ro.running_sum()
    d = g_h.size(-1)
    mix = mix.reshape(-1, d) if mix.numel() else None  # None: made again from the sources
    ch, dv = read_grad(ro, W, r, slot, g_h.reshape(-1, d), mix, gamma, slots, v_dtype)
    dv = g_h.new_empty(0, dtype=v_dtype) if dv is None else dv.view(shape)
    return ch, dv, g_token.new_empty(())


def source_backward(ro, W, slot):
    """The embedding's gradient (M, d); then, the last of the chain, the queries' whole gradient
    from every source's logit gradients (over rms(v), left in Dl): the logit is (W_r . v) / rms(v),
    so dL/dW_r = sum over sources i and tokens of Dl[i, r] * v_i. One batched matmul, (n, R, M) @
    (n, M, d), over the logit gradients laid out densely (zeros where read r does not see source
    i), in the storage dtype as the sources are, then summed over sources in W's: four kernels
    where a matmul and an add a source made 52 at 124M (launches are CPU time a step, and a host
    with a slow CPU waits on them). The dense copy is transient: 20 MB at 124M, B=16."""
    dv = source_grad(ro, W, slot, *ro.plan.ranges[slot])
    plan, dev = ro.plan, W.device
    if dev not in plan.dense_on:  # once per device: a copy from the CPU would wait for the GPU
        plan.dense_on[dev] = torch.tensor(plan.dense, device=dev)
    n, M = len(plan.ranges), ro.Dl.size(1)
    Dl = ro.Dl.to(ro.V.dtype)[plan.dense_on[dev]].view(n, plan.n_reads, M)  # (n, R, M)
    with torch.autocast(dev.type, enabled=False):  # bmm would run in the autocast dtype
        ro.dW = torch.bmm(Dl, ro.V).sum(0, dtype=W.dtype)  # (n, R, d) -> (R, d)
    return dv


@fake('start')
def _(e, W, key, dtype):
    return e.new_empty((), dtype=wide(e).dtype)


@fake('start_backward')
def _(g_token, W, key, shape, e_dtype):
    return g_token.new_empty(shape, dtype=e_dtype), torch.empty_like(W)


@fake('read')
def _(token, v, W, base, gamma, slots, key, slot, r, shape, dtype):
    keep = base is not None and PLANS[key].keep_mix[r]
    mix = token.new_empty((math.prod(shape[:-1]), shape[-1]) if keep else (0,))
    h = token.new_empty(shape, dtype=dtype if PLANS[key].narrow_h[r] else token.dtype)
    return h, mix, token.new_empty(())


@fake('read_backward')
def _(g_token, g_h, mix, gamma, W, slots, key, slot, r, shape, v_dtype):
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
    # AttnRes: h is the mix, or an empty tensor where h is narrow and the backward remakes it;
    # Delta: the mix, or an empty tensor where the backward remakes it
    ctx.save_for_backward(mix if base is not None or PLANS[key].narrow_h[r] else h, gamma, W, slots)


def _read_backward(ctx, g_h, g_mix, g_token):
    mix, gamma, W, slots = ctx.saved_tensors
    ch, dv, g_token = torch.ops.fastroute.read_backward(g_token, g_h, mix, gamma, W, slots,
                                                        ctx.key, ctx.slot, ctx.r, ctx.shape,
                                                        ctx.v_dtype)
    dgamma = None if gamma is None else ch.sum().to(gamma.dtype)
    dv = dv if ctx.slot >= 0 else None
    # W's gradient is returned once, by the start's backward; the token's carries the order
    return (g_token, dv, None, (g_h if ctx.has_base else None), dgamma,
            None, None, None, None, None, None)


route_start = OPS.autograd('start', _start_backward, _start_setup)
route_read = OPS.autograd('read', _read_backward, _read_setup)

# --------------------------------------------------------------------------------------------------
# The computations, each in torch (the definition) and in Triton (one pass over memory)

def use_triton(t):
    return triton is not None and (t.is_cuda or os.environ.get('TRITON_INTERPRET') == '1')


def add_source(ro, v, W, slot, r0, r1):
    """V[slot] = v; its logits (W_r . v) / rms(v) for r in [r0, r1), Lg[lo[slot] + r]: the
    embedding, slot 0 (the reads make the other sources, read_mix)."""
    M, d = v.shape
    if use_triton(v):
        v = v.contiguous()
        _add_source_kernel[ro.grid](v, W, ro.V[slot], ro.Lg, ro.plan.lo[slot], r0, r1, M, d, EPS,
                                    BM=BM, BD=ro.BD, num_warps=ro.warps)
    else:
        ro.V[slot] = v
        ro.Lg[ro.plan.rows(slot)] = source_logits(v, W[r0:r1], EPS).t()


def read_mix(ro, r, table, v, W, slot, base, gamma):
    """Read r. First, if the last write's output v (M, d) is given, it is added to its block's
    running sum p (fp32, as Routed's partial), which becomes source `slot`, with its logits against
    the reads that will see it. Then the mixture of every source read r sees; its softmax max and
    sum are kept for the backward. Returns h (M, d) and, for Delta where the plan keeps it, the mix
    (else None; AttnRes: h is the mix), both in fp32: the backward's c_r = g_r . mix must be
    sum_i a_i g_r . v_i to fp32 precision (read_grad), and the mix takes each source as stored, the
    new one too. Where the backward makes the mix again, AttnRes's h is returned in the sources'
    dtype (Plan.narrow_h)."""
    plan = ro.plan
    M, d = ro.V.shape[1:]
    acc = ro.Lg.dtype
    new = slot >= 0
    h = ro.V.new_empty((M, d), dtype=ro.V.dtype if plan.narrow_h[r] else acc)
    keep = base is not None and plan.keep_mix[r]
    mix = ro.V.new_empty((M, d), dtype=acc) if keep else None
    if use_triton(h):
        dummy = h  # unused pointer arguments
        _read_kernel[ro.grid](
            ro.V, ro.Lg, table[0], table[1], len(plan.others[r]), r,
            dummy if v is None else v.contiguous(), dummy if ro.P is None else ro.P, W,
            ro.V[max(slot, 0)], plan.lo[max(slot, 0)], plan.ranges[slot][1] if new else r,
            dummy if base is None else base.contiguous(), dummy if gamma is None else gamma, h,
            dummy if mix is None else mix, ro.mmax, ro.ssum, M, d, EPS, NEW=new,
            CONT=new and plan.cont[slot], KEEP=new and plan.keep[slot], HAS_BASE=base is not None,
            STORE_MIX=keep, HAS_GAMMA=gamma is not None,
            NP=triton.next_power_of_2(table.size(1)), BM=BM, BD=ro.BD, num_warps=ro.warps)
        return h, mix
    if new:
        p = wide(v) + ro.P if plan.cont[slot] else wide(v)        # (M, d)
        if plan.keep[slot]:
            ro.P.copy_(p)
        ro.V[slot] = p
        r0, r1 = plan.ranges[slot]
        ro.Lg[plan.rows(slot)] = source_logits(p, W[r0:r1], EPS).t()
    lg = ro.Lg[[plan.lo[i] + r for i in plan.visible[r]]]          # (n, M)
    ro.mmax[r] = lg.max(0).values
    ro.ssum[r] = (lg - ro.mmax[r]).exp().sum(0)
    h = remix(ro, r)
    if base is not None:
        if keep:
            mix[:] = h
        h = base.reshape(M, d) + (h if gamma is None else gamma * h)
    return h.to(ro.V.dtype) if plan.narrow_h[r] else h, mix


def remix(ro, r):
    """Read r's mix (M, d) in fp32 from the sources as stored and its softmax statistics: the
    forward's, and Delta's backward where the plan does not keep the mix."""
    slots = ro.plan.visible[r]
    a = (ro.Lg[[ro.plan.lo[i] + r for i in slots]] - ro.mmax[r]).exp() / ro.ssum[r]  # (n, M)
    # every source as stored, the new one too (the backward's v_i): (n, M, d)
    srcs = torch.stack([ro.V[i].to(a.dtype) for i in slots])
    with torch.autocast(srcs.device.type, enabled=False):  # einsum would run in the autocast dtype
        return torch.einsum('nm,nmd->md', a, srcs)


def read_grad(ro, W, r, slot, gh, mix, gamma, table, v_dtype):
    """Read r's backward. G[r] = gamma dL/dh (stored) and c[r] = G[r] . mix (from the stored G[r],
    so that in each source's dl_r = a_r (G[r] . v - c[r]), two near-equal terms where the softmax is
    sharp, the rounding of G[r] cancels) are left for the sources' own backward; then, if read r
    registered source `slot`, every read that saw it has left its G and c, and the source's gradient
    follows (source_grad). The block's running sum passes it down: with p_s = p_{s-1} + out_s,
    dL/dout_s = dL/dp_s, and dL/dp_{s-1} adds it to its own (P holds it between the two). mix None:
    made again (remix). Returns dL/dh . mix per token (M,) and dL/dout (M, d) or None."""
    plan = ro.plan
    M, d = gh.shape
    acc = ro.c.dtype
    new = slot >= 0
    ch = gh.new_empty(M, dtype=acc)
    if use_triton(gh):
        r1 = plan.ranges[slot][1] if new else r + 1
        dv = ro.V.new_empty((M, d), dtype=v_dtype) if new else None
        dummy = ch  # unused pointer arguments
        _read_grad_kernel[ro.grid](
            gh.contiguous(), dummy if mix is None else mix, dummy if gamma is None else gamma, ro.G,
            ro.c, ch, ro.V, ro.Lg, table[0], table[1], len(plan.others[r]), ro.V[max(slot, 0)],
            plan.lo[max(slot, 0)], ro.mmax, ro.ssum, W, dummy if ro.P is None else ro.P,
            dummy if dv is None else dv, ro.Dl, r, r1, M, d, EPS,
            NEW=new, REMIX=mix is None, ADD_DP=new and plan.keep[slot],
            STORE_DP=new and plan.cont[slot], HAS_GAMMA=gamma is not None, BM=BM, BD=ro.BD,
            num_warps=ro.warps)
    else:
        if mix is None:
            mix = remix(ro, r)
        ch[:] = (wide(gh) * wide(mix)).sum(-1)
        ro.G[r] = gh if gamma is None else gamma * gh
        ro.c[r] = (wide(ro.G[r]) * wide(mix)).sum(-1)
        if not new:
            return ch, None
        dv = source_grad(ro, W, slot, *plan.ranges[slot])
        if plan.keep[slot]:  # what the block's later sums pass down (P holds it now)
            dv = dv + ro.P
        if plan.cont[slot]:
            ro.P.copy_(dv)
        dv = dv.to(v_dtype)
    return ch, dv


def source_grad(ro, W, i, r0, r1):
    """dL/dv_i (M, d) from the reads r0 <= r < r1 that saw source i; the logit gradients over
    rms(v_i) go to Dl (rows lo[i] + r), for the queries' gradient. With a_r = softmax weight,
    l_r = logit, g_r = read gradient:
        dl_r = a_r (g_r . v - c_r)
        dv = sum_r a_r g_r + (sum_r dl_r W_r) / rms(v) - (sum_r dl_r l_r) v / (d rms(v)^2)
    the last two terms being d l_r / dv = W_r / rms(v) - l_r v / (d rms(v)^2) (the key's RMS)."""
    M, d = ro.V.shape[1:]
    acc = ro.Lg.dtype
    if use_triton(ro.V):
        dv = ro.V.new_empty((M, d), dtype=acc)
        _source_grad_kernel[ro.grid](
            ro.V[i], ro.G, ro.Lg, ro.mmax, ro.ssum, ro.c, W, r0, r1, dv, ro.Dl, ro.plan.lo[i], M, d,
            EPS, BM=BM, BD=ro.BD, num_warps=ro.warps)
        return dv
    # the matmul and einsums in fp32 (or fp64)
    with torch.autocast(ro.V.device.type, enabled=False):
        v, G = ro.V[i].to(acc), ro.G[r0:r1].to(acc)                   # (M, d), (k, M, d)
        rinv = torch.rsqrt(v.pow(2).mean(-1) + EPS)                     # (M,)
        rows = ro.plan.rows(i)
        lg = ro.Lg[rows]                                                # (k, M)
        a = (lg - ro.mmax[r0:r1]).exp() / ro.ssum[r0:r1]
        dl = a * (torch.einsum('kmd,md->km', G, v) - ro.c[r0:r1])
        dv = (torch.einsum('km,kmd->md', a, G) + rinv[:, None] * (dl.t() @ W[r0:r1].to(acc))
              - ((dl * lg).sum(0) * rinv ** 2 / d)[:, None] * v)
    ro.Dl[rows] = dl * rinv
    return dv


# Tokens a program: one, on a warp per 1024 columns (so 32 elements a thread in each (1, BD) tile).
# Up to 1024 wide a row's sums (g . v, a key's RMS) stay inside the warp, with no barrier between
# warps at every read; and D is a compile-time constant, so the padding (768 of 1024 columns) takes
# no registers. The backward kernels hold 96 registers a thread at 768 wide (128 at 1024), against
# 160-217 with 4 tokens on 4 warps and D a runtime value: 21 warps fit on an SM instead of 8-12,
# keeping more loads in flight. The routing kernels of a step at GPT-2 124M on an H100 (full
# AttnRes / Delta): 14.1 / 13.7 ms at 4 tokens x 4 warps, 9.4 / 9.6 ms now; two tokens a warp were
# 1% faster at 768 wide, 3% slower at 512, and need 255 registers at 1024 (docs/performance.md)
BM = 1

if triton is not None:
    @triton.jit
    def _tile(M, D, BM: tl.constexpr, BD: tl.constexpr):
        """This program's BM tokens (rows) of an (M, D) tensor, D padded to BD: the row and column
        indices, their masks, and the elements' offsets (64-bit: M * D can pass 2^31)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, BD)
        rmask, cmask = rows < M, cols < D
        mask = rmask[:, None] & cmask[None, :]
        return rows, cols, rmask, cmask, mask, rows[:, None].to(tl.int64) * D + cols[None, :]

    @triton.jit
    def _grad_sum(v, rinv, acc, sdl, G, Lg, MMAX, SSUM, C, DLR, r0, r1, rows, rmask, mask, offs,
                  M, D):
        """Pass 1 of a source's gradient, over the reads r0 <= r < r1 that saw it (v, rinv: its
        values and 1/rms; Lg, DLR: its logits and logit gradients, read r's at r * M (Plan.lo);
        G: the (R, M, D) read gradients). Adds sum_r a_r g_r to acc and sum_r dl_r l_r to sdl, with
        dl_r = a_r (g_r . v - c_r), and stores dl_r / rms(v) in DLR[r] (for pass 2 and the queries'
        gradient). Each read's gradient is loaded once, the next one's (and its statistics) before
        this one's math: software pipelining, a second tile in flight while this one is used."""
        gp = G + (r0 * M).to(tl.int64) * D  # read r0's (M, D) gradient; then a step of M * D a read
        q = r0 * M + rows
        # (rows * 0 + ...: a vector condition, which the interpreter accepts in a mask as the
        # compiler does; an empty range loads nothing)
        more = rmask & (rows * 0 + r0 < r1)
        g_next = tl.load(gp + offs, mask=mask & more[:, None], other=0.0)
        l_next, m_next = (tl.load(Lg + q, mask=more, other=0.0),
                          tl.load(MMAX + q, mask=more, other=0.0))
        s_next, c_next = (tl.load(SSUM + q, mask=more, other=1.0),
                          tl.load(C + q, mask=more, other=0.0))
        for r in range(r0, r1):
            g, lg, a, c = g_next.to(tl.float32), l_next, tl.exp(l_next - m_next) / s_next, c_next
            gp += M * D
            q += M
            more = rmask & (rows * 0 + r + 1 < r1)
            g_next = tl.load(gp + offs, mask=mask & more[:, None], other=0.0)
            l_next, m_next = (tl.load(Lg + q, mask=more, other=0.0),
                              tl.load(MMAX + q, mask=more, other=0.0))
            s_next, c_next = (tl.load(SSUM + q, mask=more, other=1.0),
                              tl.load(C + q, mask=more, other=0.0))
            dl = a * (tl.sum(g * v, 1) - c)
            acc += a[:, None] * g
            sdl += dl * lg
            tl.store(DLR + r * M + rows, dl * rinv, mask=rmask)
        return acc, sdl

    @triton.jit
    def _source_dv(v, rinv, acc, sdl, DLR, W, r0, r1, rows, cols, rmask, cmask, M, D):
        """Pass 2 of a source's gradient, after pass 1 (_grad_sum): the logits' terms
            dv = acc + (sum_r dl_r W_r) / rms(v) - (sum_r dl_r l_r) v / (D rms(v)^2)
        from small loads only (dl_r / rms(v) as pass 1 stored it, W_r from cache), kept out of pass
        1's registers; the next read's loaded before this one's math, as in pass 1."""
        tl.debug_barrier()  # reads back what other threads of this program stored
        more = rows * 0 + r0 < r1
        dl_next = tl.load(DLR + r0 * M + rows, mask=rmask & more, other=0.0)
        w_next = tl.load(W + r0 * D + cols, mask=cmask & (cols * 0 + r0 < r1), other=0.0)
        for r in range(r0, r1):  # acc += dl_r W_r / rms(v), into pass 1's sum (no second tile)
            dl, w = dl_next, w_next.to(tl.float32)
            dl_next = tl.load(DLR + (r + 1) * M + rows, mask=rmask & (rows * 0 + r + 1 < r1),
                              other=0.0)
            w_next = tl.load(W + (r + 1) * D + cols, mask=cmask & (cols * 0 + r + 1 < r1),
                             other=0.0)
            acc += dl[:, None] * w[None, :]
        return acc - (sdl * rinv * rinv / D)[:, None] * v

    @triton.jit
    def _mix_others(V, Lg, slots, lrows, n, m, s, acc, rows, rmask, mask, offs, M, D):
        """Adds a read's n other sources (their slots in `slots` and the rows of their logits
        against it in `lrows`, rows of the padded table) to the softmax's sum s and the weighted
        sum acc, with weights exp(l - m): each source read once, the next one's values and logit
        loaded before this one's math (software pipelining)."""
        sl, lr = tl.load(slots).to(tl.int64), tl.load(lrows).to(tl.int64)
        x_next = tl.load(V + sl * M * D + offs, mask=mask, other=0.0)
        l_next = tl.load(Lg + lr * M + rows, mask=rmask, other=0.0)
        for i in range(n):
            x, w = x_next, tl.exp(l_next - m)
            # (rows * 0 + ...: a vector condition, which the interpreter accepts in a mask as
            # the compiler does)
            more = rmask & (rows * 0 + i + 1 < n)
            # the table's padding makes slots[n] a valid slot
            sl, lr = tl.load(slots + i + 1).to(tl.int64), tl.load(lrows + i + 1).to(tl.int64)
            x_next = tl.load(V + sl * M * D + offs, mask=mask & more[:, None], other=0.0)
            l_next = tl.load(Lg + lr * M + rows, mask=more, other=0.0)
            s += w
            acc += w[:, None] * x.to(tl.float32)
        return acc, s

    @triton.jit
    def _add_source_kernel(v_ptr, W, V, Lg, lo, r0, r1, M, D: tl.constexpr, eps, BM: tl.constexpr,
                           BD: tl.constexpr):
        # V: this slot's (M, D) source; Lg: every pair's logits, this slot's against read r in
        # row lo + r (Plan.lo)
        rows, cols, rmask, cmask, mask, offs = _tile(M, D, BM, BD)
        Lg += lo * M
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        tl.store(V + offs, v, mask=mask)
        v = v.to(tl.float32)
        rinv = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
        for r in range(r0, r1):
            w = tl.load(W + r * D + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(Lg + r * M + rows, tl.sum(v * w[None, :], 1) * rinv, mask=rmask)

    @triton.jit
    def _read_kernel(V, Lg, slots, lrows, n, r, OUT, P, W, VN, lo, r1, base, gamma, H, MIX, MMAX,
                     SSUM, M, D: tl.constexpr, eps, NEW: tl.constexpr, CONT: tl.constexpr,
                     KEEP: tl.constexpr, HAS_BASE: tl.constexpr, STORE_MIX: tl.constexpr,
                     HAS_GAMMA: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr,
                     BD: tl.constexpr):
        # V, Lg: every slot's (M, D) source and every pair's logits (Plan.lo); VN: the new slot's
        # source, its logits in rows lo + r; slots, lrows: the n other sources' slots and the rows
        # of their logits against read r (the padded table's, at most NP wide)
        rows, cols, rmask, cmask, mask, offs = _tile(M, D, BM, BD)
        LN = Lg + lo * M
        # the new source p, made here from the last write's output (none: weight exp(-inf) = 0)
        p = tl.zeros([BM, BD], tl.float32)
        m = tl.full([BM], float('-inf'), tl.float32)  # its logit first, then the softmax max
        if NEW:
            p = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
            if CONT:
                p += tl.load(P + offs, mask=mask, other=0.0)
            if KEEP:
                tl.store(P + offs, p, mask=mask)
            tl.store(VN + offs, p, mask=mask)  # in the storage dtype, for the later reads
            # its logits from the sum itself (as Routed's); the mix below takes it as stored, as it
            # takes the other sources, so that the backward's c_r = g_r . mix_r is sum_i a_i g_r . v_i
            # over the v_i it reads (see _read_grad_kernel)
            rinv = tl.rsqrt(tl.sum(p * p, 1) / D + eps)
            wr = tl.load(W + r * D + cols, mask=cmask, other=0.0).to(tl.float32)
            m = tl.sum(p * wr[None, :], 1) * rinv  # its logit against this read
            tl.store(LN + r * M + rows, m, mask=rmask)
            for rr in range(r + 1, r1):  # and against every later read that will see it
                wr = tl.load(W + rr * D + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(LN + rr * M + rows, tl.sum(p * wr[None, :], 1) * rinv, mask=rmask)
            p = p.to(VN.dtype.element_ty).to(tl.float32)
        l_new = m
        # the softmax max first, over the other sources' logits in one (NP, BM) gather: their loads
        # in flight together, not n in a row (a second pass over the logits is cheaper than
        # rescaling the mix)
        ii = tl.arange(0, NP)
        lrs = tl.load(lrows + ii, mask=ii < n, other=0).to(tl.int64)
        lg = tl.load(Lg + lrs[:, None] * M + rows[None, :],
                     mask=(ii < n)[:, None] & rmask[None, :], other=float('-inf'))
        m = tl.maximum(m, tl.max(lg, 0))
        s = tl.exp(l_new - m)
        acc, s = _mix_others(V, Lg, slots, lrows, n, m, s, s[:, None] * p, rows, rmask, mask, offs,
                             M, D)
        mix = acc / s[:, None]
        tl.store(MMAX + r * M + rows, m, mask=rmask)  # this read's row of the (R, M) statistics
        tl.store(SSUM + r * M + rows, s, mask=rmask)
        if HAS_BASE:
            if STORE_MIX:
                tl.store(MIX + offs, mix, mask=mask)
            if HAS_GAMMA:
                mix = mix * tl.load(gamma)
            mix += tl.load(base + offs, mask=mask, other=0.0)
        tl.store(H + offs, mix, mask=mask)

    @triton.jit
    def _read_grad_kernel(GH, MIX, gamma, G, C, CH, V, Lg, slots, lrows, n, VN, lo, MMAX, SSUM, W,
                          P, DV, DL, r, r1, M, D: tl.constexpr, eps, NEW: tl.constexpr,
                          REMIX: tl.constexpr, ADD_DP: tl.constexpr, STORE_DP: tl.constexpr,
                          HAS_GAMMA: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
        # G: the (R, M, D) read gradients; C, MMAX, SSUM: (R, M); VN: the (M, D) source read r
        # registered, its logits and logit gradients in rows lo + r of Lg and DL (every pair's);
        # V, Lg, slots, lrows, n: as _read_kernel's, to make the mix again (REMIX) where it was
        # not kept
        rows, cols, rmask, cmask, mask, offs = _tile(M, D, BM, BD)
        LN, DLR = Lg + lo * M, DL + lo * M  # the new slot's rows, from read r on
        q = r * M + rows
        m = tl.load(MMAX + q, mask=rmask, other=0.0)  # read r's softmax max and sum
        ssum = tl.load(SSUM + q, mask=rmask, other=1.0)
        if NEW:  # the source read r registered (its logit against read r): its gradient is below
            lg = tl.load(LN + q, mask=rmask, other=0.0)
        if REMIX:
            # the mix as _read_kernel made it: the same sums in the same order
            acc = tl.zeros([BM, BD], tl.float32)
            if NEW:  # its values loaded here and again below, not held through the loop: at 768
                # wide 96 registers a thread instead of 126 (ptxas, sm_90)
                vn = tl.load(VN + offs, mask=mask, other=0.0).to(tl.float32)
                acc = tl.exp(lg - m)[:, None] * vn
            acc, _ = _mix_others(V, Lg, slots, lrows, n, m, m * 0, acc, rows, rmask, mask, offs,
                                 M, D)
            mix = acc / ssum[:, None]
        else:
            mix = tl.load(MIX + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GH + offs, mask=mask, other=0.0).to(tl.float32)  # (after the mix: registers)
        tl.store(CH + rows, tl.sum(g * mix, 1), mask=rmask)
        if HAS_GAMMA:
            g = g * tl.load(gamma)
        # g_r as stored (the storage dtype) and c_r from it: each source's dl_r = a_r (g_r . v - c_r)
        # is a difference of near-equal terms where the softmax is sharp; made from the same
        # rounded values, the rounding cancels in it too
        g = g.to(G.dtype.element_ty).to(tl.float32)
        c = tl.sum(g * mix, 1)
        gp = G + (r * M).to(tl.int64) * D + offs  # read r's gradient, for the sources' backward
        tl.store(gp, g, mask=mask)
        tl.store(C + q, c, mask=rmask)
        if NEW:
            # the new source's gradient, as _source_grad_kernel, with read r's g from registers
            v = tl.load(VN + offs, mask=mask, other=0.0).to(tl.float32)
            rinv = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
            a = tl.exp(lg - m) / ssum
            dl = a * (tl.sum(g * v, 1) - c)
            tl.store(DLR + q, dl * rinv, mask=rmask)
            # then a finished block's later reads, each gradient once
            acc, sdl = _grad_sum(v, rinv, a[:, None] * g, dl * lg, G, LN, MMAX, SSUM, C, DLR, r + 1,
                                 r1, rows, rmask, mask, offs, M, D)
            dv = _source_dv(v, rinv, acc, sdl, DLR, W, r, r1, rows, cols, rmask, cmask, M, D)
            if ADD_DP:  # what the block's later sums pass down
                dv += tl.load(P + offs, mask=mask, other=0.0)
            if STORE_DP:
                tl.store(P + offs, dv, mask=mask)
            tl.store(DV + offs, dv, mask=mask)

    @triton.jit
    def _source_grad_kernel(V, G, Lg, MMAX, SSUM, C, W, r0, r1, DV, DL, lo, M, D: tl.constexpr,
                            eps, BM: tl.constexpr, BD: tl.constexpr):
        rows, cols, rmask, cmask, mask, offs = _tile(M, D, BM, BD)
        # V: source i's (M, D) values; its logits and logit gradients in rows lo + r of Lg, DL
        Lg, DLR = Lg + lo * M, DL + lo * M
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        rinv = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
        # pass 1 streams the reads' gradients (the bytes that matter): sum_r a_r g_r and each dl_r
        acc, sdl = _grad_sum(v, rinv, tl.zeros([BM, BD], tl.float32), tl.zeros([BM], tl.float32), G,
                             Lg, MMAX, SSUM, C, DLR, r0, r1, rows, rmask, mask, offs, M, D)
        dv = _source_dv(v, rinv, acc, sdl, DLR, W, r0, r1, rows, cols, rmask, cmask, M, D)
        tl.store(DV + offs, dv, mask=mask)
