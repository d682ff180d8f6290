"""
Fused Deep Delta Learning: model.DeepDelta's delta rule, one kernel per sublayer write each way,
organised around the GPU's memory bandwidth. model.py stays the reference; this file is what
`fast.apply(model, 'fused')` (anywhere) or `'auto'` (on CUDA) runs for `residual='ddl'`, and
tests/test_fastddl.py holds it to the reference, forward and every gradient.

A write, per token, with the state X (dv x d), the sublayer output out, its normalised input c
and x_in:
    k = out / sqrt(|out|^2 + eps^2), beta = 2 sigmoid(w_b . c + b_b), v = 4 sigmoid(W_v x_in + b_v)
    u = beta (v - k^T X),  X' = X + k u^T,  x_in' = compress'(X')  (the next read)
Forward, one kernel reads X once and writes X' once, computing the next sublayer's input on the way.
Backward, one kernel per write takes dL/dX' and dL/dx_in', and gives dL/dX and the gradients of out,
c, x_in and of the write's parameters, whose sums over tokens (w_b, W_v, the compressor) are
accumulated per program in registers, not in a separate pass over memory.

What is saved for the backward. With dv > 1 the plain path keeps X (dv x d fp32: 12 KB a token at
d = 768, dv = 4) for each of the 2L writes, 4.8 GB at GPT-2 124M, B = 16, T = 1024. Here the delta
rule is run backwards instead: X = X' - k u^T needs only u (dv numbers a token) and out, which the
backward reads for k anyway. One (M, dv, d) buffer holds the state: the forward updates it in place,
and each write's backward turns it back into that write's input before the write before it needs it.
(dv = 1: the state is x_in, which the sublayer's LayerNorm keeps for its own backward, so nothing is
buffered.) The same in fp32 is exact up to rounding, about 1e-7 of X's size per write.
c is not kept either: the backward needs it only for w_b's gradient, and recomputes it from x_in
with the sublayer's LayerNorm parameters, which is why the fused stream is given the norms.

How autograd is made to run the writes' backward in order, newest first, with the state buffer
between them: as in fast/route.py, every op takes and returns a 0-dim token tensor chained in
forward order, so the backward of write s runs only after the backward of write s + 1. The ops are
registered with torch.library, so torch.compile keeps each as one call in the model's graph and
fuses what is around it. Kernels: Triton on CUDA (and on CPU under TRITON_INTERPRET=1, for tests);
elsewhere the same math in torch.
"""

import torch
from torch.nn import functional as F

from fast.route import Ops, use_triton
from model import DeepDelta, LayerNorm, wide

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch versions below do the same arithmetic
    triton = None

LN_EPS = LayerNorm.eps  # for recomputing c
EPS_K = DeepDelta.eps_k


class FusedDeepDelta(DeepDelta):
    """model.DeepDelta with the fused write: the same parameters, the same math. Falls back to
    DeepDelta's own code where the fused path is not used (impl='auto' off CUDA)."""

    def __init__(self, config, norms, impl):
        super().__init__(config)
        self.impl = impl
        # the pre-norm of each sublayer, to recompute c in the backward. A plain list: the modules
        # belong to the transformer blocks, so they are not registered (nor saved) twice
        self.norms = norms
        # the ops find this stream's state buffers by this key (ints pass through the compiler)
        self.key = OPS.register(self, None)

    def fused(self, e):
        # 'auto': on CUDA for dv > 1. Measured on an H100 at GPT-2 124M, the fused dv = 4 step is
        # 1.47x the standard one against 2.22x compiled plain; at dv = 1 the compiled plain step
        # (1.06x), where the compiler fuses the write with the LayerNorms around it, beats a
        # separate kernel (docs/performance.md)
        return self.impl == 'fused' or (self.impl == 'auto' and e.is_cuda and self.dv > 1)

    def start(self, e):
        if not self.fused(e):
            return super().start(e)
        X = wide(super().start(e)['X'])  # (B, T, dv, d): e, or its embedding conv, in plain torch
        W = self.compress[0] if self.dv > 1 else None
        x_in, token = ddl_start(X, W, self.key)
        return {'x_in': x_in, 'token': token}

    def read(self, st, s):
        return st['x_in'] if 'token' in st else super().read(st, s)  # the last write computed it

    def write(self, st, s, out, h, c):
        if 'token' not in st:
            return super().write(st, s, out, h, c)
        # the next read's compressor: the same layer's (s even), the next layer's, or the readout's
        W = self.compress[(s + 1) // 2] if self.dv > 1 else None
        ln = self.norms[s]
        st['x_in'], _, st['token'] = ddl_write(
            st['token'], out, c, h, self.w_b[s], self.b_b[s], self.w_v[s], self.b_v[s], W,
            ln.weight, ln.bias, self.key)

    def final(self, st):
        # the last write read out with compress[L]
        return st['x_in'] if 'token' in st else super().final(st)


class State:
    """The state buffer of one forward pass and its gradient, shared by its ops (dv > 1 only)."""

    def __init__(self, X):
        B, T, dv, d = X.shape
        # a contiguous copy, updated in place: X_s after write s - 1's forward and after write s's
        # backward; G: dL/dX_s, made by the last write's backward
        self.X = X.new_empty((B * T, dv, d)).copy_(X.detach().reshape(B * T, dv, d))
        self.G = None

# --------------------------------------------------------------------------------------------------
# The ops. Each takes the token of the op before it and returns a new one; the backward ops take and
# return the token's gradient, so the compiled backward keeps the same order.

OPS = Ops('fastddl', [
    'start(Tensor X, Tensor? W, int key) -> (Tensor, Tensor)',
    'start_backward(Tensor g_token, Tensor g_x, Tensor? W, int key) -> (Tensor, Tensor)',
    'write(Tensor token, Tensor out, Tensor c, Tensor x, Tensor w_b, Tensor b_b, Tensor w_v,'
    ' Tensor b_v, Tensor? W, Tensor ln_w, Tensor? ln_b, int key) -> (Tensor, Tensor, Tensor)',
    'write_backward(Tensor g_token, Tensor g_xn, Tensor out, Tensor x, Tensor saved, Tensor w_b,'
    ' Tensor w_v, Tensor? W, Tensor ln_w, Tensor? ln_b, int key, ScalarType c_dtype)'
    ' -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)'])
STREAMS = OPS.registry  # key -> the State of the stream's latest forward pass
impl, fake = OPS.impl, OPS.fake


@impl('start')
def start_op(X, W, key):
    """x_in of sublayer 0; with dv > 1 a new State holds X."""
    B, T, dv, d = X.shape
    if W is None:
        return X.reshape(B, T, d).clone(), X.new_empty(())
    STREAMS[key] = State(X)
    return (X * W).sum(-2), X.new_empty(())  # (B, T, dv, d) -> (B, T, d): compress_0(X)


@impl('start_backward')
def start_backward_op(g_token, g_x, W, key):
    """dL/dX_0 and the first compressor's gradient. The last of the chain: the buffers can go."""
    B, T, d = g_x.shape
    if W is None:
        return g_x.view(B, T, 1, d).clone(), g_x.new_empty(0)
    st = STREAMS[key]
    STREAMS[key] = None
    g = g_x.reshape(B * T, 1, d)
    # (M, dv, d); without writes (n_layer = 0) G is only this
    G = g * W if st.G is None else st.G + g * W
    return G.view(B, T, -1, d), (st.X * g).sum(0)


@impl('write')
def write_op(token, out, c, x, w_b, b_b, w_v, b_v, W, ln_w, ln_b, key):
    """One delta-rule write; returns the next read's input x_in', the per-token numbers the backward
    needs (beta, v, u: (M, 1 + 2 dv)), and the token."""
    B, T, d = out.shape
    st = STREAMS[key] if W is not None else None
    xn, saved = write_forward(st, out.view(-1, d), c.view(-1, d), x.view(-1, d), w_b, b_b, w_v, b_v,
                              W)
    return xn.view(B, T, d), saved, token.new_empty(())


@impl('write_backward')
def write_backward_op(g_token, g_xn, out, x, saved, w_b, w_v, W, ln_w, ln_b, key, c_dtype):
    """dL/d(out, c, x_in) and the write's parameter gradients, from dL/dx_in' (and, dv > 1, dL/dX'
    in the State); leaves dL/dX and X itself in the State for the write before."""
    shape, d = out.shape, out.size(-1)
    st = STREAMS[key] if W is not None else None
    grads = write_backward(st, g_xn.reshape(-1, d), out.view(-1, d), x.view(-1, d), saved, w_b, w_v,
                           W, ln_w, ln_b)
    dout, dc, dx, dw_b, db_b, dw_v, db_v, dW = grads
    return (dout.view(shape), dc.view(shape).to(c_dtype), dx.view(shape), dw_b, db_b, dw_v, db_v,
            dW, g_token.new_empty(()))


@fake('start')
def _(X, W, key):
    B, T, dv, d = X.shape
    return X.new_empty((B, T, d)), X.new_empty(())


@fake('start_backward')
def _(g_token, g_x, W, key):
    B, T, d = g_x.shape
    return (g_x.new_empty((B, T, 1 if W is None else W.size(0), d)),
            g_x.new_empty(0 if W is None else W.shape))


@fake('write')
def _(token, out, c, x, w_b, b_b, w_v, b_v, W, ln_w, ln_b, key):
    M = out.numel() // out.size(-1)
    return x.new_empty(out.shape), x.new_empty((M, 1 + 2 * w_v.size(0))), token.new_empty(())


@fake('write_backward')
def _(g_token, g_xn, out, x, saved, w_b, w_v, W, ln_w, ln_b, key, c_dtype):
    return (torch.empty_like(out), out.new_empty(out.shape, dtype=c_dtype), torch.empty_like(x),
            torch.empty_like(w_b), w_b.new_empty(()), torch.empty_like(w_v),
            w_v.new_empty(w_v.size(0)), w_v.new_empty(0) if W is None else torch.empty_like(W),
            g_token.new_empty(()))


def _start_setup(ctx, inputs, output):
    X, W, key = inputs
    ctx.key = key
    ctx.save_for_backward(W)


def _start_backward(ctx, g_x, g_token):
    W, = ctx.saved_tensors
    dX, dW = torch.ops.fastddl.start_backward(g_token, g_x, W, ctx.key)
    return dX, (dW if W is not None else None), None


def _write_setup(ctx, inputs, output):
    token, out, c, x, w_b, b_b, w_v, b_v, W, ln_w, ln_b, key = inputs
    ctx.key, ctx.c_dtype = key, c.dtype
    # out (for k) and x_in (the LayerNorm keeps it too); not X nor c, which the backward rebuilds
    ctx.save_for_backward(out, x, output[1], w_b, w_v, W, ln_w, ln_b)


def _write_backward(ctx, g_xn, g_saved, g_token):
    out, x, saved, w_b, w_v, W, ln_w, ln_b = ctx.saved_tensors
    dout, dc, dx, dw_b, db_b, dw_v, db_v, dW, g_token = torch.ops.fastddl.write_backward(
        g_token, g_xn, out, x, saved, w_b, w_v, W, ln_w, ln_b, ctx.key, ctx.c_dtype)
    # the LayerNorm's parameters were only borrowed to recompute c: their gradients come through dc
    return (g_token, dout, dc, dx, dw_b, db_b, dw_v, db_v, (dW if W is not None else None),
            None, None, None)


ddl_start = OPS.autograd('start', _start_backward, _start_setup)
ddl_write = OPS.autograd('write', _write_backward, _write_setup)

# --------------------------------------------------------------------------------------------------
# The two computations, each in torch (the definition) and in Triton (one pass over memory)

def write_forward(st, out, c, x, w_b, b_b, w_v, b_v, W):
    """The delta-rule write for M tokens: out, c, x (M, d); the state is st.X (M, dv, d), updated in
    place, or x itself when st is None (dv = 1). Returns x_in' (M, d) and saved = [beta, v, u],
    (M, 1 + 2 dv)."""
    M, d = out.shape
    dv = w_v.size(0)
    acc = x.dtype  # fp32 (fp64 in the tests)
    if use_triton(out):
        xn = x.new_empty((M, d))
        saved = x.new_empty((M, 1 + 2 * dv))
        X = x if st is None else st.X
        _write_fwd_kernel[(M,)](X, x, out.contiguous(), c.contiguous(), w_b, b_b, w_v, b_v,
                                W if W is not None else w_v, xn, saved, d, EPS_K,
                                DV=dv, DVP=triton.next_power_of_2(dv), BD=triton.next_power_of_2(d),
                                STATE=st is not None, num_warps=4 if dv == 1 else 8)
        return xn, saved
    # as model.DeepDelta.write: every product in fp32
    with torch.autocast(out.device.type, enabled=False):
        o = out.to(acc)
        k = o * torch.rsqrt(o.pow(2).sum(-1, keepdim=True) + EPS_K ** 2)  # (M, d)
        beta = 2 * torch.sigmoid((c.to(acc) * w_b).sum(-1) + b_b)         # (M,)
        v = 4 * torch.sigmoid((x.unsqueeze(1) * w_v).sum(-1) + b_v)       # (M, dv)
        X = x.unsqueeze(1) if st is None else st.X                        # (M, dv, d)
        u = beta.unsqueeze(-1) * (v - (k.unsqueeze(1) * X).sum(-1))       # (M, dv)
        Xn = X + u.unsqueeze(-1) * k.unsqueeze(1)                         # X' = X + k u^T
        if st is None:
            xn = Xn.squeeze(1)
        else:
            st.X.copy_(Xn)
            xn = (Xn * W).sum(1)                                          # compress'(X')
    return xn, torch.cat([beta.unsqueeze(-1), v, u], -1)


def write_backward(st, g_xn, out, x, saved, w_b, w_v, W, ln_w, ln_b):
    """The write's backward for M tokens. With G' = dL/dX' (+ W' g_xn, the next read's share):
        du = G'^T k   dk = G' u + X dr   dbeta = du . (v - r)   dr = -beta du
        dz_v = beta du v (1 - v/4)   dX = G' + k dr^T   dout = (dk - k (k . dk)) / |out|
        dc = dz_b w_b   dx_in = W_v^T dz_v (+ dX, dv = 1)
    with dz_b = dbeta beta (1 - beta/2), and X = X' - k u^T rebuilt first (dv > 1). Returns
    (dout, dc, dx_in, dw_b, db_b, dw_v, db_v, dW'); dW' is empty for dv = 1."""
    M, d = out.shape
    dv = w_v.size(0)
    acc = x.dtype
    # the last write's backward comes first: nothing flows into X' yet
    if st is not None and st.G is None:
        st.G = torch.zeros_like(st.X)
    if use_triton(out):
        per_sm, warps, stages = BWD[min(dv, 2)]
        nprog = min(M, per_sm * sm_count(out.device))
        dout, dc, dx = torch.empty_like(out), x.new_empty((M, d)), x.new_empty((M, d))
        part = x.new_empty((nprog, 2 * dv * d + d + dv + 1))  # each program's sums over its tokens
        _write_bwd_kernel[(nprog,)](
            st.X if st else x, st.G if st else x, g_xn.contiguous(), out.contiguous(), x, saved,
            w_b, w_v, W if W is not None else w_v, ln_w, ln_b if ln_b is not None else ln_w,
            dout, dc, dx, part, M, nprog, d, EPS_K, LN_EPS,
            DV=dv, DVP=triton.next_power_of_2(dv), BD=triton.next_power_of_2(d),
            STATE=st is not None, HAS_LNB=ln_b is not None, STAGES=stages, num_warps=warps)
        # the programs' sums added up; each gradient a tensor of its own (the compiler wants
        # them aligned)
        dW, dw_v, dw_b, db_v, db_b = (t.clone()
                                      for t in part.sum(0).split([dv * d, dv * d, d, dv, 1]))
        dW = dW.view(dv, d) if st is not None else dW[:0]
        return dout, dc, dx, dw_b, db_b.view(()), dw_v.view(dv, d), db_v, dW
    with torch.autocast(out.device.type, enabled=False):
        beta, v, u = saved[:, 0], saved[:, 1:1 + dv], saved[:, 1 + dv:]    # (M,), (M, dv) x 2
        o = out.to(acc)
        n = torch.sqrt(o.pow(2).sum(-1, keepdim=True) + EPS_K ** 2)        # (M, 1)
        k = o / n
        if st is None:
            X, G = x.unsqueeze(1), g_xn.unsqueeze(1)                       # (M, 1, d)
        else:
            dW = (st.X * g_xn.unsqueeze(1)).sum(0)                         # (dv, d)
            G = st.G + W * g_xn.unsqueeze(1)                               # (M, dv, d)
            X = st.X - u.unsqueeze(-1) * k.unsqueeze(1)  # the delta rule backwards: X = X' - k u^T
        r = (k.unsqueeze(1) * X).sum(-1)                                   # (M, dv)
        du = (G * k.unsqueeze(1)).sum(-1)                                  # (M, dv)
        dr = -beta.unsqueeze(-1) * du
        dk = (u.unsqueeze(-1) * G).sum(1) + (dr.unsqueeze(-1) * X).sum(1)  # (M, d)
        dz_b = (du * (v - r)).sum(-1) * beta * (1 - beta / 2)              # (M,)
        dz_v = beta.unsqueeze(-1) * du * v * (1 - v / 4)                   # (M, dv)
        dout = ((dk - k * (k * dk).sum(-1, keepdim=True)) / n).to(out.dtype)
        dx = (dz_v.unsqueeze(-1) * w_v).sum(1)                             # (M, d)
        dX = G + dr.unsqueeze(-1) * k.unsqueeze(1)                         # (M, dv, d)
        if st is None:
            dx, dW = dx + dX.squeeze(1), w_v.new_empty(0)
        else:
            st.X.copy_(X)
            st.G.copy_(dX)
        c = F.layer_norm(x, (d,), ln_w.to(acc), None if ln_b is None else ln_b.to(acc), LN_EPS)
        return (dout, dz_b.unsqueeze(-1) * w_b, dx, dz_b @ c, dz_b.sum(), dz_v.t() @ x, dz_v.sum(0),
                dW)


# backward launch: (programs per SM, warps, pipeline stages) for dv = 1 and dv >= 2. Each program
# sums the parameter gradients over its share of the tokens
BWD = {1: (4, 4, 3), 2: (1, 8, 3)}


def sm_count(device):
    return (torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == 'cuda' else 4)

if triton is not None:
    @triton.jit
    def _write_fwd_kernel(X, XIN, OUT, C, wb, bb, wv, bv, Wn, XN, SAVED, D, eps_k,
                          DV: tl.constexpr, DVP: tl.constexpr, BD: tl.constexpr,
                          STATE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token per program
        cols, js = tl.arange(0, BD), tl.arange(0, DVP)
        cm, jm = cols < D, js < DV
        m2 = jm[:, None] & cm[None, :]
        o2 = js[:, None] * D + cols[None, :]  # (DVP, BD): a token's state, or a (dv, d) weight
        out = tl.load(OUT + row * D + cols, mask=cm, other=0.0).to(tl.float32)
        k = out * tl.rsqrt(tl.sum(out * out, 0) + eps_k * eps_k)
        c = tl.load(C + row * D + cols, mask=cm, other=0.0).to(tl.float32)
        beta = 2 * tl.sigmoid(tl.sum(c * tl.load(wb + cols, mask=cm, other=0.0), 0) + tl.load(bb))
        x = tl.load(XIN + row * D + cols, mask=cm, other=0.0)
        zv = (tl.sum(x[None, :] * tl.load(wv + o2, mask=m2, other=0.0), 1)
              + tl.load(bv + js, mask=jm, other=0.0))
        v = 4 * tl.sigmoid(zv)                                                   # (DVP,)
        if STATE:
            S = tl.load(X + row * DV * D + o2, mask=m2, other=0.0)               # (DVP, BD)
        else:
            S = tl.load(XIN + row * D + o2, mask=m2, other=0.0)                 # (1, BD): x_in
        u = beta * (v - tl.sum(S * k[None, :], 1))                              # (DVP,)
        S += u[:, None] * k[None, :]                                             # X' = X + k u^T
        if STATE:
            tl.store(X + row * DV * D + o2, S, mask=m2)
            xn = tl.sum(S * tl.load(Wn + o2, mask=m2, other=0.0), 0)            # compress'(X')
        else:
            xn = tl.sum(S, 0)
        tl.store(XN + row * D + cols, xn, mask=cm)
        sv = SAVED + row * (1 + 2 * DV)
        tl.store(sv, beta)
        tl.store(sv + 1 + js, v, mask=jm)
        tl.store(sv + 1 + DV + js, u, mask=jm)

    @triton.jit
    def _write_bwd_kernel(X, G, GXN, OUT, XIN, SAVED, wb, wv, Wn, lnw, lnb, DOUT, DC, DX, PART, M,
                          NPROG, D, eps_k, ln_eps, DV: tl.constexpr, DVP: tl.constexpr,
                          BD: tl.constexpr, STATE: tl.constexpr, HAS_LNB: tl.constexpr,
                          STAGES: tl.constexpr):
        pid = tl.program_id(0)
        cols, js = tl.arange(0, BD), tl.arange(0, DVP)
        cm, jm = cols < D, js < DV
        m2 = jm[:, None] & cm[None, :]
        o2 = js[:, None] * D + cols[None, :]
        wbv = tl.load(wb + cols, mask=cm, other=0.0)
        wvv = tl.load(wv + o2, mask=m2, other=0.0)
        lw = tl.load(lnw + cols, mask=cm, other=0.0)
        # this program's sums over its tokens: the parameter gradients
        acc_W = tl.zeros([DVP, BD], tl.float32)
        acc_wv = tl.zeros([DVP, BD], tl.float32)
        acc_wb = tl.zeros([BD], tl.float32)
        acc_bv = tl.zeros([DVP], tl.float32)
        acc_bb = tl.zeros([1], tl.float32)
        if STATE:
            Wv = tl.load(Wn + o2, mask=m2, other=0.0)
        # 64-bit offsets: M * dv * d passes 2^31 at 16 k tokens and d = 32 k
        zero = pid.to(tl.int64) * 0
        for i in tl.range(pid, M, NPROG, num_stages=STAGES):  # tokens pid, pid + NPROG, ...
            row = zero + i
            x = tl.load(XIN + row * D + cols, mask=cm, other=0.0)
            out = tl.load(OUT + row * D + cols, mask=cm, other=0.0).to(tl.float32)
            n = tl.sqrt(tl.sum(out * out, 0) + eps_k * eps_k)
            k = out / n
            sv = SAVED + row * (1 + 2 * DV)
            beta = tl.load(sv)
            v = tl.load(sv + 1 + js, mask=jm, other=0.0)
            u = tl.load(sv + 1 + DV + js, mask=jm, other=0.0)
            if STATE:
                gxn = tl.load(GXN + row * D + cols, mask=cm, other=0.0)
                S = tl.load(X + row * DV * D + o2, mask=m2, other=0.0)          # X'
                Gs = tl.load(G + row * DV * D + o2, mask=m2, other=0.0) + Wv * gxn[None, :]
                acc_W += S * gxn[None, :]
                S -= u[:, None] * k[None, :]                                     # X = X' - k u^T
                tl.store(X + row * DV * D + o2, S, mask=m2)
            else:  # the state is x_in, (1, BD). Loaded as a 2-d tile: made from x by
                # broadcasting, the tile's layout took 5x longer on an H100
                S = tl.load(XIN + row * D + o2, mask=m2, other=0.0)
                Gs = tl.load(GXN + row * D + o2, mask=m2, other=0.0)
            r = tl.sum(S * k[None, :], 1)
            du = tl.sum(Gs * k[None, :], 1)
            dr = -beta * du
            dk = tl.sum(u[:, None] * Gs + dr[:, None] * S, 0)
            dzb = tl.sum(du * (v - r), 0) * beta * (1 - beta / 2)
            dzv = beta * du * v * (1 - v / 4)
            dout = (dk - k * tl.sum(k * dk, 0)) / n
            tl.store(DOUT + row * D + cols, dout.to(DOUT.dtype.element_ty), mask=cm)
            tl.store(DC + row * D + cols, dzb * wbv, mask=cm)
            dx = tl.sum(dzv[:, None] * wvv, 0)
            dS = Gs + dr[:, None] * k[None, :]                                   # dL/dX
            if STATE:
                tl.store(G + row * DV * D + o2, dS, mask=m2)
            else:
                dx += tl.sum(dS, 0)
            tl.store(DX + row * D + cols, dx, mask=cm)
            # c = LayerNorm(x), recomputed for w_b's gradient
            xc = tl.where(cm, x - tl.sum(x, 0) / D, 0.0)
            c = xc * tl.rsqrt(tl.sum(xc * xc, 0) / D + ln_eps) * lw
            if HAS_LNB:
                c += tl.load(lnb + cols, mask=cm, other=0.0)
            acc_wb += dzb * c
            acc_bb += dzb
            acc_wv += dzv[:, None] * x[None, :]
            acc_bv += dzv
        # PART[pid] = [dW' (dv, d) | dW_v (dv, d) | dw_b (d) | db_v (dv) | db_b]
        p = PART + pid * (2 * DV * D + D + DV + 1)
        if STATE:
            tl.store(p + o2, acc_W, mask=m2)
        tl.store(p + DV * D + o2, acc_wv, mask=m2)
        tl.store(p + 2 * DV * D + cols, acc_wb, mask=cm)
        tl.store(p + 2 * DV * D + D + js, acc_bv, mask=jm)
        tl.store(p + 2 * DV * D + D + DV + tl.arange(0, 1), acc_bb)
