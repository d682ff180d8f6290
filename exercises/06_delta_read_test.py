"""Exercise 6: Routed.read, what a routed sublayer reads: h = mix (AttnRes) or h = x + gamma * mix (Delta).
Graded by `python exercises.py check 6`; pytest runs it too. Reference mixtures are built here with explicit
RMS-normalised keys, in float64."""

import torch

from model import GPT, GPTConfig

L, D = 2, 8  # 4 sublayers


def tiny(seed=0, query_std=1.0, **kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D, **kw)).double().eval()
    with torch.no_grad():
        model.stream.query.normal_(0, query_std)
    return model


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, D, generator=g, dtype=torch.float64) for _ in range(n)]


def mix_loop(srcs, q, g, eps=1e-6):
    V = torch.stack(srcs)
    K = V / torch.sqrt((V ** 2).mean(-1, keepdim=True) + eps) * g
    a = torch.softmax(torch.einsum('d,nbtd->nbt', q, K), dim=0)
    return torch.einsum('nbt,nbtd->btd', a, V)


def reads(model, e, outs):
    """start(e), then read and write each output in turn; returns what each sublayer read."""
    st, hs = model.stream.start(e), []
    for s, out in enumerate(outs):
        hs.append(model.stream.read(st, s))
        model.stream.write(st, s, out, hs[-1], None)
    return hs


def check_close(got, want, what, tol=1e-10):
    assert torch.is_tensor(got) and got.shape == want.shape, \
        f'{what}: expected a tensor of shape {tuple(want.shape)}, got ' \
        f'{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}'
    err = (got - want).abs().max().item()
    assert err <= tol, f'{what}; it is off by up to {err:.3g}'


def test_delta_sublayer_0_reads_the_embedding():
    """Delta: sublayer 0 reads x = e, unrouted"""
    model = tiny(residual='delta')
    e, *outs = tensors(5)
    check_close(reads(model, e, outs)[0], e, 'Delta: sublayer 0 should read e (there is nothing to route yet)', 0)


def test_delta_zero_query_adds_the_mean_of_the_sources():
    """Delta with zero queries: h = x + the mean of the sources"""
    model = tiny(residual='delta', query_std=0.0)
    e, *outs = tensors(5)
    for s, h in enumerate(reads(model, e, outs)[1:], start=1):
        x = e + sum(outs[:s])
        check_close(h, x + sum([e] + outs[:s]) / (s + 1),
                    f'Delta, zero queries: sublayer {s} should read x + mean(e, out_0, .., out_{s - 1}) '
                    f'(the stream plus the uniform mixture)')


def test_delta_read_s_uses_query_s_minus_1():
    """Delta: sublayer s adds the mixture of read number s - 1 (its own query and key gain)"""
    model = tiny(residual='delta')
    st = model.stream
    with torch.no_grad():
        st.key_gain.uniform_(0.5, 1.5)
    e, *outs = tensors(5)
    for s, h in enumerate(reads(model, e, outs)[1:], start=1):
        x = e + sum(outs[:s])
        check_close(h, x + mix_loop([e] + outs[:s], st.query[s - 1], st.key_gain[s - 1]),
                    f'Delta: sublayer {s} should read x + mix, with the mix of read number {s - 1} '
                    f'(sublayer 0 has no read, so Delta\'s reads are numbered from sublayer 1)')


def test_attnres_read_replaces_the_stream():
    """AttnRes: sublayer s reads the mixture alone, with read number s"""
    model = tiny(residual='attnres')
    st = model.stream
    e, *outs = tensors(5)
    for s, h in enumerate(reads(model, e, outs)):
        check_close(h, mix_loop([e] + outs[:s], st.query[s], st.key_gain[s]),
                    f'AttnRes: sublayer {s} should read the mixture of e, out_0, .., out_{s - 1} with read number '
                    f'{s}, and nothing else (AttnRes replaces the stream)')


def test_the_gate_scales_the_mixture():
    """delta_gate: h = x + gamma_s * mix, with gamma of read s - 1"""
    model = tiny(residual='delta', delta_gate=True)
    st = model.stream
    with torch.no_grad():
        st.gate.copy_(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64))
    e, *outs = tensors(5)
    for s, h in enumerate(reads(model, e, outs)[1:], start=1):
        x = e + sum(outs[:s])
        mix = mix_loop([e] + outs[:s], st.query[s - 1], st.key_gain[s - 1])
        check_close(h, x + st.gate[s - 1] * mix,
                    f'Delta with a gate: sublayer {s} should read x + gamma[{s - 1}] * mix, gamma[{s - 1}] = '
                    f'{st.gate[s - 1].item():g}')


def test_a_zero_gate_converts_a_standard_checkpoint_exactly():
    """gamma = 0: a standard model converted into Delta gives bit-identical logits"""
    torch.manual_seed(0)
    std = GPT(GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D))
    with torch.no_grad():  # a "trained" standard model: every weight moved away from its init
        for p in std.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for res_block in (0, 2):
        delta = GPT(GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D, residual='delta',
                              res_block=res_block, delta_gate=True))
        delta.load_backbone(std.state_dict())
        with torch.no_grad():
            delta.stream.query.normal_(0, 1.0)  # trained queries: still no effect while gamma = 0
        idx = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a, b = delta(idx, idx)[0], std(idx, idx)[0]
        assert torch.equal(a, b), \
            f'res_block={res_block}: with gamma = 0 the converted model\'s logits should equal the standard ' \
            f'model\'s bit for bit; they differ by up to {(a - b).abs().max().item():.3g}. h must be exactly x ' \
            f'+ 0 * mix = x'
