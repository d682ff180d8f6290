"""The fused routing of fast/route.py against model.py's plain Routed: forward values and every gradient.
On CPU the fused path runs its torch kernels (float64 here, so any difference is a bug, not rounding); its
Triton kernels run under Triton's interpreter when triton is installed; on a GPU, in bf16 against float64."""

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import fast
import routing
from fast import route as fastroute
from model import GPT, GPTConfig, Routed

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # n_layer=3: 6 sublayers, so blocks of 4 and 5 end with a partial block
    'attnres': dict(residual='attnres'),
    'attnres_block4': dict(residual='attnres', res_block=4),
    'attnres_block5': dict(residual='attnres', res_block=5),
    'attnres_one_block': dict(residual='attnres', res_block=6),  # one block: reads see e and its running sum
    'delta': dict(residual='delta'),
    'delta_block4': dict(residual='delta', res_block=4),
    'delta_block3': dict(residual='delta', res_block=3),  # the last output (read by no one) ends a block
    'delta_gate': dict(residual='delta', delta_gate=True),
    'delta_block2_gate': dict(residual='delta', res_block=2, delta_gate=True),
}


def build(impl, n_layer=3, n_embd=32, seed=0, **kw):
    """A model with random routing parameters (queries far from zero: the softmax is far from uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=n_layer, n_head=2, n_embd=n_embd, **kw))
    fast.apply(model, impl)  # as train.py does: the fused twin of the stream, applied from outside
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith('stream.'):
                p.add_(torch.randn_like(p) * (3.0 if 'query' in n else 0.3))
    return model


def batch(model, B=2, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, B, T), generator=g).to(model.lm_head.weight.device)


def loss_and_grads(model, B=2, T=16):
    idx, tgt = batch(model, B, T)
    _, loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def rel_err(a, b):
    """|a - b| / |b| over the whole tensor, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def stream_grads(stream, e, outs, seed=2):
    """Run a stream alone on given sources: every read's output and the gradients of e and of every
    sublayer output for random output gradients. Checks the sources' gradients directly."""
    g = torch.Generator().manual_seed(seed)
    st, hs = stream.start(e), []
    for s, out in enumerate(outs):
        hs.append(stream.read(st, s))
        stream.write(st, s, out, hs[-1], None)
    hs.append(stream.final(st))
    torch.autograd.backward(hs, [torch.randn(h.shape, generator=g, dtype=h.dtype) for h in hs])
    return [h.detach() for h in hs], [e.grad] + [o.grad for o in outs]


@pytest.mark.parametrize('name', CASES)
def test_fused_equals_plain_float64(name):
    plain, fused = build('plain', **CASES[name]).double(), build('fused', **CASES[name]).double()
    assert type(plain.stream) is Routed and isinstance(fused.stream, fastroute.FusedRouted)
    # the same parameter names and values: checkpoints move between the two paths
    assert plain.state_dict().keys() == fused.state_dict().keys()
    lp, gp = loss_and_grads(plain)
    lf, gf = loss_and_grads(fused)
    torch.testing.assert_close(lf, lp, rtol=1e-12, atol=0)
    for n in gp:  # every parameter: backbone, queries, key gains, gates
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-10, atol=1e-13, msg=n)
    # and the sources themselves: e and each sublayer output, as independent leaves
    g = torch.Generator().manual_seed(5)
    leaves = lambda: (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64),
                      [torch.randn(2, 16, 32, generator=g, dtype=torch.float64) for _ in range(6)])
    e, outs = leaves()
    hp, sp = stream_grads(plain.stream, e.clone().requires_grad_(), [o.clone().requires_grad_() for o in outs])
    hf, sf = stream_grads(fused.stream, e.clone().requires_grad_(), [o.clone().requires_grad_() for o in outs])
    for a, b in zip(hf + sf, hp + sp):
        if b is None:  # Delta's last output is read by no one
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_plan_matches_the_source_counts():
    """Each read sees the sources the paper's bookkeeping gives it (model._num_sources), every source
    is read by a contiguous range of reads, and its logits against them take rows of their own."""
    from model import _num_sources
    for kw in CASES.values():
        stream = build('fused', **kw).stream
        for r, slots in enumerate(stream.visible):
            assert len(slots) == _num_sources(r + int(stream.additive), stream.S)
            assert slots[0] == 0  # the embedding is always a source
        assert all(r0 < r1 <= stream.n_reads for r0, r1 in stream.ranges)
        # the logits are kept for the (source, read) pairs alone: one row a pair, none unused
        plan = fastroute.PLANS[stream.key]
        rows = sorted(plan.lo[i] + r for r, slots in enumerate(stream.visible) for i in slots)
        assert rows == list(range(plan.pairs))


@pytest.mark.parametrize('name', ['delta', 'delta_block4', 'delta_gate', 'attnres', 'attnres_block4'])
def test_fused_equals_plain_float64_with_every_mix_kept(name, monkeypatch):
    """The other way of the backward: each read's mix (AttnRes: its fp32 h) kept from the forward
    (REMIX = -1), where by default these small models make every mix again (the next test)."""
    monkeypatch.setattr(fastroute, 'REMIX', -1)
    test_fused_equals_plain_float64(name)


def test_reads_keep_their_mix_only_where_they_see_more_than_remix_others(monkeypatch):
    """The backward needs each read's mix (Delta: c_r = g_r . mix_r; AttnRes: its output h, the mix
    itself). A read that sees at most REMIX other sources keeps nothing and makes it again from them
    (2 bytes an element a source, against 8 for an fp32 mix stored and loaded back, and no memory held);
    only a read that sees more keeps it in fp32: Delta's mix (B * T, d), AttnRes's h (B, T, d). AttnRes's
    h is then returned in the sources' dtype (bf16 under autocast: half the bytes of the LayerNorm input
    the backward keeps)."""
    def kept(remix, case='delta'):
        monkeypatch.setattr(fastroute, 'REMIX', remix)
        stream = build('fused', **CASES[case]).stream
        e = torch.randn(2, 16, 32, requires_grad=True)
        st, saved = stream.start(e), []
        for s in range(6):
            h = stream.read(st, s)
            if h.grad_fn is not None and h is not st['x']:  # a routed read: its op's saved tensors
                saved.append(h.grad_fn.saved_tensors[0].shape)
            stream.write(st, s, torch.randn(2, 16, 32), h, None)
        if not stream.additive:  # AttnRes's final norm reads the stream too
            saved.append(stream.final(st).grad_fn.saved_tensors[0].shape)
        plan = fastroute.PLANS[stream.key]
        keep = plan.keep_mix if stream.additive else [not n for n in plan.narrow_h]
        full = (32, 32) if stream.additive else (2, 16, 32)
        assert [r for r, shape in enumerate(saved) if shape == full] == [r for r, k in enumerate(keep) if k]
        assert all(shape == full or shape.numel() == 0 for shape in saved)
        return [r for r, k in enumerate(keep) if k]
    # full Delta, 6 sublayers: read r (of sublayer r + 1) sees e and the outputs 0..r, r + 2 sources, one
    # of them new (made by the read itself), so r + 1 others
    assert kept(fastroute.REMIX) == [] and fastroute.REMIX == 8
    assert kept(4) == [4] and kept(0) == [0, 1, 2, 3, 4] and kept(100) == []
    assert kept(0, 'delta_block4') == [0, 1, 2, 3, 4] and kept(4, 'delta_block4') == []
    # full AttnRes: read r (of sublayer r, 6 the final norm's) sees e and the outputs 0..r-1, r + 1
    # sources, one of them new (output r - 1, written by the read), so r others (read 0: e, 1); block
    # AttnRes (4): at most 2 others, e and the finished block beside the new partial sum
    assert kept(8, 'attnres') == [] and kept(4, 'attnres') == [5, 6]
    assert kept(0, 'attnres') == list(range(7))
    assert kept(2, 'attnres_block4') == [] and kept(1, 'attnres_block4') == [5, 6]
    monkeypatch.setattr(fastroute, 'REMIX', 8)
    stream = build('fused', **CASES['attnres']).stream
    assert not any(fastroute.PLANS[stream.key].keep_mix)
    with torch.autocast('cpu', torch.bfloat16):
        st = stream.start(torch.randn(2, 16, 32).bfloat16())
        assert stream.read(st, 1).dtype == torch.bfloat16


def test_fused_falls_back_to_plain_off_cuda_and_while_probed():
    """'auto' routes with the plain code on CPU; routing.weights probes through the plain code too."""
    auto, plain = build('auto', **CASES['delta_block4']), build('plain', **CASES['delta_block4'])
    idx = torch.randint(0, 128, (1, 16))
    assert not auto.stream.fused(torch.zeros(1))
    torch.testing.assert_close(routing.weights(auto, idx), routing.weights(plain, idx))
    fused = build('fused', **CASES['delta_block4'])
    torch.testing.assert_close(routing.weights(fused, idx), routing.weights(plain, idx))


def test_auto_fuses_every_form_on_cuda_only():
    """'auto' (measured on an H100): every form, full and block, at every width on CUDA; none elsewhere."""
    from types import SimpleNamespace
    dev = lambda cuda, d: SimpleNamespace(is_cuda=cuda, size=lambda dim: d)  # what fused() looks at
    for case in ('delta', 'attnres_block4'):
        stream = build('auto', **CASES[case]).stream
        assert stream.fused(dev(True, 512)) and stream.fused(dev(True, 768))
        assert not stream.fused(dev(False, 768))
    assert build('fused', **CASES['attnres_block4']).stream.fused(dev(False, 512))  # asked for: always


def test_router_is_freed_after_backward(monkeypatch):
    """The Router (a step's sources and read gradients) lives from the forward to the end of the backward,
    not into the next step: nothing else holds it."""
    routers, init = [], fastroute.Router.__init__

    def record(self, *args):
        init(self, *args)
        routers.append(weakref.ref(self))
    monkeypatch.setattr(fastroute.Router, '__init__', record)
    loss_and_grads(build('fused', **CASES['delta_block4']))
    assert len(routers) == 1 and routers[0]() is None


def test_forward_leaves_no_running_sum_to_the_backward():
    """The block's fp32 running sum (B * T, d) is a forward buffer: the forward's last read drops it, so it is not
    held through the loss, and the backward makes its own for the sum's gradient (the float64 tests check those)."""
    model = build('fused', **CASES['attnres_block4'])
    idx = torch.randint(0, 128, (2, 16))
    _, loss = model(idx, idx)
    router = fastroute.PLANS[model.stream.key].router
    assert router.P is None and router.V is not None  # after the forward, before the backward
    loss.backward()


def test_no_grad_forward_and_bad_route_impl():
    model = build('fused', **CASES['attnres'])
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 128, (2, 16)))
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match='route_impl'):
        fast.apply(model, 'triton')


@pytest.mark.slow
@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_compiled_fused_path_matches_eager(device):
    """The ops are registered with torch.library: torch.compile keeps each as one call in a single graph
    (fullgraph: no graph break), and the compiled model computes what the eager one does, in training and
    in evaluation (no_grad: a graph of its own, which once failed to compile). On a GPU the
    compiled graph calls the Triton kernels, as a training step does (a change whose eager GPU tests
    passed once kept the compiled GPU warm-up from finishing: docs/performance.md, fifth and sixth passes)."""
    if device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    eager, model = (build('fused', **CASES['delta_block2_gate']).to(device) for _ in range(2))
    torch._dynamo.reset()  # as in test_fastddl.py: no guards left from another stream's compile
    model.compile(fullgraph=True)  # in place, as train.py and bench.py do
    le, ge = loss_and_grads(eager)
    lc, gc = loss_and_grads(model)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for n in ge:
        assert rel_err(gc[n], ge[n]) < 1e-5, n
    model.eval()  # as train.py's evaluate
    with torch.no_grad():
        _, ln = model(*batch(model))
    torch.testing.assert_close(ln, le, rtol=1e-5, atol=1e-5)


INTERPRET = """
import torch
from fast import route as fastroute
from tests.test_fastroute import build, loss_and_grads, rel_err, CASES
assert fastroute.use_triton(torch.zeros(1))
# 2 layers: 4 sublayers, so blocks of 3 end with a partial block; with REMIX = 1, Delta's reads of more
# than one other source keep their mix, the others make it again in the backward kernel
fastroute.REMIX = 1
for kw in (dict(residual='attnres', res_block=3), CASES['delta'], CASES['delta_block2_gate']):
    lp, gp = loss_and_grads(build('plain', n_layer=2, n_embd=24, **kw))
    lf, gf = loss_and_grads(build('fused', n_layer=2, n_embd=24, **kw))
    errs = [rel_err(lf, lp)] + [rel_err(gf[n], gp[n]) for n in gp]
    assert max(errs) < 1e-5, errs  # fp32 kernels against fp32 torch: rounding-level differences only
print('ok')
"""


@pytest.mark.slow
@pytest.mark.triton_interpreter
def test_triton_kernels_under_the_interpreter():
    """The Triton kernels themselves, on the CPU: n_embd=24 also exercises the masked columns (24 of 32)."""
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, '-c', INTERPRET], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == 'ok', res.stderr[-3000:]


def bf16_errors(name, device, seed=0):
    """One stream alone on the same inputs (e in fp32, sublayer outputs in bf16, as a model makes them)
    and the same output gradients: the relative error of every read's output and of every gradient (e,
    each output, the stream's parameters) of the plain and the fused path under bf16 autocast, against
    a float64 run of the plain path."""
    cfg = dict(n_layer=4, n_embd=256, **CASES[name])
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(4, 16, 256, generator=g) * 0.5
    outs = [(torch.randn(4, 16, 256, generator=g) * 0.5).bfloat16() for _ in range(8)]
    grads = [torch.randn(4, 16, 256, generator=g) for _ in range(9)]

    def run(stream, dtype):
        # fresh leaves (.to() of a tensor already there would return it, and gradients would add up)
        ee = e.to(device, dtype).clone().requires_grad_()
        oo = [o.to(device, dtype if dtype == torch.float64 else o.dtype).clone().requires_grad_() for o in outs]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype != torch.float64):
            st, hs = stream.start(ee), []
            for s, out in enumerate(oo):
                hs.append(stream.read(st, s))
                stream.write(st, s, out, hs[-1], None)
            hs.append(stream.final(st))
        torch.autograd.backward(hs, [gr.to(device, h.dtype) for gr, h in zip(grads, hs)])
        return hs + [ee.grad] + [o.grad for o in oo] + [p.grad for p in stream.parameters()]

    ref = run(build('plain', **cfg).stream.double().to(device), torch.float64)
    return {impl: [rel_err(a, b) for a, b in zip(run(build(impl, **cfg).stream.to(device), torch.float32), ref)
                   if b is not None]
            for impl in ('plain', 'fused')}


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
@pytest.mark.parametrize('name', ['attnres', 'attnres_block4', 'delta', 'delta_block2_gate'])
def test_fused_bf16_as_accurate_as_plain(name, device):
    """Under bf16 autocast the fused path stores its sources and read gradients in bf16 (the plain path
    keeps e and the block sums in fp32): each error may be at most 1.5x the plain path's plus 5e-3, a few
    of bf16's roundings (2^-9 = 2e-3; measured up to 0.7e-2 where the plain path's is 0.2e-2). A softmax
    over sources with sharp logits (build's queries) makes each logit's gradient a difference of
    near-equal terms, a_r (g_r . v - c_r): the fused path passes only if it makes both terms from the
    same rounded values (with c_r from unrounded ones its errors were up to 8e-2). The stream alone, as in a whole bf16 model a rounding in the first layers
    can change the last gradients by more than their size (build's sharp softmax makes it chaotic).
    On CPU the fused path's torch kernels; on a GPU its Triton kernels."""
    if device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    errs = bf16_errors(name, device)
    for i, (ep, ef) in enumerate(zip(errs['plain'], errs['fused'])):
        assert ef <= 1.5 * ep + 5e-3, (i, ef, ep)


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
@pytest.mark.parametrize('name', ['delta', 'attnres_block4'])
def test_fused_bf16_as_accurate_as_plain_with_every_mix_kept(name, device, monkeypatch):
    """The same for the other backward, each read's mix (AttnRes: its fp32 h) kept from the forward
    (REMIX = -1)."""
    monkeypatch.setattr(fastroute, 'REMIX', -1)
    test_fused_bf16_as_accurate_as_plain(name, device)
