"""Exercise 6: Routed.read, what a routed sublayer reads: h = mix (AttnRes) or h = x + gamma * mix (Delta).
Graded by `python exercises.py check 6`. Each test is a pair: compute_X(M, seed) runs the student's model.py (M)
on inputs made from the seed, in a child process, and returns the outputs; check_X(out, ref) runs in the grader,
makes the same inputs from ref.seed and checks the outputs. Reference mixtures are built in the grader with
explicit RMS-normalised keys, in float64, from the queries of the model made from the same seed."""

import torch

L, D = 2, 8  # 4 sublayers
GATE = [0.5, -2.0, 3.0]  # one gamma per Delta read


def tiny(M, seed, query_std=1.0, key_gain=False, **kw):
    """A tiny routed model in float64 with random queries (and key gains, if key_gain)."""
    torch.manual_seed(seed)
    model = M.GPT(M.GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D, **kw)).double().eval()
    with torch.no_grad():
        model.stream.query.normal_(0, query_std)
        if key_gain:
            model.stream.key_gain.uniform_(0.5, 1.5)
        if model.stream.gate is not None:
            model.stream.gate.copy_(torch.tensor(GATE, dtype=torch.float64))
    return model


def tensors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, D, generator=g, dtype=torch.float64) for _ in range(n)]


def mix_loop(srcs, q, g, eps=1e-6):
    V = torch.stack(srcs)
    K = V / torch.sqrt((V ** 2).mean(-1, keepdim=True) + eps) * g
    a = torch.softmax(torch.einsum('d,nbtd->nbt', q, K), dim=0)
    return torch.einsum('nbt,nbtd->btd', a, V).detach()


def reads(model, seed):
    """start(e), then read and write each output in turn; returns what each sublayer read."""
    e, *outs = tensors(5, seed)
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


def compute_delta_sublayer_0_reads_the_embedding(M, seed):
    """Delta: sublayer 0 reads x = e, unrouted"""
    return reads(tiny(M, seed, residual='delta'), seed)[0]


def check_delta_sublayer_0_reads_the_embedding(h, ref):
    check_close(h, tensors(1, ref.seed)[0], 'Delta: sublayer 0 should read e (there is nothing to route yet)', 0)


def compute_delta_zero_query_adds_the_mean_of_the_sources(M, seed):
    """Delta with zero queries: h = x + the mean of the sources"""
    return reads(tiny(M, seed, query_std=0.0, residual='delta'), seed)


def check_delta_zero_query_adds_the_mean_of_the_sources(hs, ref):
    e, *outs = tensors(5, ref.seed)
    for s in range(1, 4):
        x = e + sum(outs[:s])
        check_close(hs[s], x + sum([e] + outs[:s]) / (s + 1),
                    f'Delta, zero queries: sublayer {s} should read x + mean(e, out_0, .., out_{s - 1}) '
                    f'(the stream plus the uniform mixture)')


def compute_delta_read_s_uses_query_s_minus_1(M, seed):
    """Delta: sublayer s adds the mixture of read number s - 1 (its own query and key gain)"""
    return reads(tiny(M, seed, key_gain=True, residual='delta'), seed)


def check_delta_read_s_uses_query_s_minus_1(hs, ref):
    st = tiny(ref.model, ref.seed, key_gain=True, residual='delta').stream
    e, *outs = tensors(5, ref.seed)
    for s in range(1, 4):
        x = e + sum(outs[:s])
        check_close(hs[s], x + mix_loop([e] + outs[:s], st.query[s - 1], st.key_gain[s - 1]),
                    f'Delta: sublayer {s} should read x + mix, with the mix of read number {s - 1} '
                    f'(sublayer 0 has no read, so Delta\'s reads are numbered from sublayer 1)')


def compute_attnres_read_replaces_the_stream(M, seed):
    """AttnRes: sublayer s reads the mixture alone, with read number s"""
    return reads(tiny(M, seed, residual='attnres'), seed)


def check_attnres_read_replaces_the_stream(hs, ref):
    st = tiny(ref.model, ref.seed, residual='attnres').stream
    e, *outs = tensors(5, ref.seed)
    for s in range(4):
        check_close(hs[s], mix_loop([e] + outs[:s], st.query[s], st.key_gain[s]),
                    f'AttnRes: sublayer {s} should read the mixture of e, out_0, .., out_{s - 1} with read number '
                    f'{s}, and nothing else (AttnRes replaces the stream)')


def compute_the_gate_scales_the_mixture(M, seed):
    """delta_gate: h = x + gamma_s * mix, with gamma of read s - 1"""
    return reads(tiny(M, seed, residual='delta', delta_gate=True), seed)


def check_the_gate_scales_the_mixture(hs, ref):
    st = tiny(ref.model, ref.seed, residual='delta', delta_gate=True).stream
    e, *outs = tensors(5, ref.seed)
    for s in range(1, 4):
        x = e + sum(outs[:s])
        mix = mix_loop([e] + outs[:s], st.query[s - 1], st.key_gain[s - 1])
        check_close(hs[s], x + GATE[s - 1] * mix,
                    f'Delta with a gate: sublayer {s} should read x + gamma[{s - 1}] * mix, gamma[{s - 1}] = '
                    f'{GATE[s - 1]:g}')


def compute_a_zero_gate_converts_a_standard_checkpoint_exactly(M, seed):
    """gamma = 0: a standard model converted into Delta gives bit-identical logits"""
    torch.manual_seed(seed)
    std = M.GPT(M.GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D))
    with torch.no_grad():  # a "trained" standard model: every weight moved away from its init
        for p in std.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(seed + 1))
    out = []
    for res_block in (0, 2):
        delta = M.GPT(M.GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D, residual='delta',
                                  res_block=res_block, delta_gate=True))
        delta.load_backbone(std.state_dict())
        with torch.no_grad():
            delta.stream.query.normal_(0, 1.0)  # trained queries: still no effect while gamma = 0
            out.append((delta(idx, idx)[0], std(idx, idx)[0]))
    return out


def check_a_zero_gate_converts_a_standard_checkpoint_exactly(out, ref):
    for i, res_block in enumerate((0, 2)):
        a, b = out[i]
        assert torch.equal(a, b), \
            f'res_block={res_block}: with gamma = 0 the converted model\'s logits should equal the standard ' \
            f'model\'s bit for bit; they differ by up to {(a - b).abs().max().item():.3g}. h must be exactly x ' \
            f'+ 0 * mix = x'
