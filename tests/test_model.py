"""Tests of model.py: every variant's shapes, causality and gradients, the invariants of the papers' math,
and each routed path against a naive loop over sources written here in float64."""

import math

import pytest
import torch

import routing
from model import GPT, GPTConfig, DeepDelta, depth_route, source_logits

VOCAB, T = 128, 16
VARIANTS = {
    'standard': dict(residual='standard'),
    'ddl': dict(residual='ddl'),
    'ddl_dv4': dict(residual='ddl', ddl_dv=4),
    'attnres': dict(residual='attnres'),
    'attnres_block': dict(residual='attnres', res_block=4),
    'delta': dict(residual='delta'),
    'delta_block': dict(residual='delta', res_block=4),
    'delta_gate': dict(residual='delta', delta_gate=True),
    'delta_block_gate': dict(residual='delta', res_block=2, delta_gate=True),
}


def make(seed=0, n_layer=3, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=32, **kw)
    return GPT(cfg).eval()


def tokens(B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_variant(model, seed=3):
    """Give the variant's own parameters random values, so routing weights are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith('stream.'):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (3.0 if 'query' in n else 0.3))


# ---------------------------------------------------------------------------------------------------------
# Every variant

@pytest.mark.parametrize('name', VARIANTS)
def test_shapes_loss_generate(name):
    model = make(**VARIANTS[name])
    idx = tokens()
    logits, loss = model(idx, tokens(seed=2))  # (targets = idx would be easy: the embeddings are tied)
    assert logits.shape == (2, T, VOCAB) and torch.isfinite(logits).all()
    assert abs(loss.item() - math.log(VOCAB)) < 0.3, loss.item()  # near-uniform predictions at init
    logits, loss = model(idx)
    assert logits.shape == (2, 1, VOCAB) and loss is None
    out = model.generate(idx[:, :4], max_new_tokens=20, top_k=5)  # runs past block_size: the context is cropped
    assert out.shape == (2, 24) and torch.equal(out[:, :4], idx[:, :4])


@pytest.mark.parametrize('name', VARIANTS)
def test_causality(name):
    model = make(**VARIANTS[name])
    randomize_variant(model)
    idx = tokens()
    idx2 = idx.clone()
    idx2[:, 9:] = (idx2[:, 9:] + 1) % VOCAB  # change every token after position 8
    a, _ = model(idx, idx)
    b, _ = model(idx2, idx2)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize('name', VARIANTS)
def test_backward_reaches_every_parameter(name):
    model = make(**VARIANTS[name]).train()
    randomize_variant(model)  # away from init, where some gradients are zero by construction (below)
    idx = tokens()
    model(idx, tokens(seed=2))[1].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_gradients_at_init():
    idx, tgt = tokens(), tokens(seed=2)
    model = make(residual='attnres')
    model(idx, tgt)[1].backward()
    # logit = (q * g) . v / rms(v): with q = 0 the key gain has no effect yet, the query does
    assert model.stream.key_gain.grad.abs().sum() == 0 and model.stream.query.grad.abs().sum() > 0
    model = make(residual='delta', delta_gate=True)
    model(idx, tgt)[1].backward()
    # the routed term is scaled by gamma = 0, so only gamma itself learns at the first step
    assert model.stream.query.grad.abs().sum() == 0 and model.stream.gate.grad.abs().sum() > 0


def test_bad_configs_raise():
    for field, value in [('residual', 'nope'), ('res_block', -1), ('ddl_dv', 0), ('n_embd', 33), ('dropout', 1.5)]:
        with pytest.raises(ValueError, match=field):
            GPTConfig(**{'n_head': 2, 'n_embd': 32, field: value})


def test_variant_parameters_and_optimizer():
    for name, kw in VARIANTS.items():
        model = make(**kw)
        names = model.variant_param_names()
        assert all(n.startswith('stream.') for n in names) and (name == 'standard') == (not names)
        backbone = {n for n, _ in model.named_parameters()} - names
        assert backbone == {n for n, _ in make().named_parameters()}  # same backbone names in every variant
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', routing_lr_mult=10.0)
        ids = {id(p): n for n, p in model.named_parameters()}
        for g in opt.param_groups:
            for p in g['params']:
                n = ids[id(p)]
                assert g['lr_mult'] == (10.0 if n in names else 1.0)
                assert (g['weight_decay'] > 0) == (p.dim() >= 2 and n not in names), n


def test_flops_count_the_variant_work():
    base = make().flops_per_token()
    assert base == 6 * make().get_num_params() + 12 * 3 * 32 * T
    full, block = make(residual='attnres').flops_per_token(), make(residual='attnres', res_block=2).flops_per_token()
    assert full > block > base and make(residual='ddl', ddl_dv=4).flops_per_token() > base
    assert make().estimate_mfu(1000.0, None) is None and make().estimate_mfu(1000.0, 2 * base * 1000) == 0.5


# ---------------------------------------------------------------------------------------------------------
# Deep Delta Learning: the delta rule (variants.md §6, 4-7)

def ddl_write(stream, X, out, h, c, s=0):
    """One DDL update of the paper's state X (B, T, d, dv); the model stores it as (B, T, dv, d)."""
    st = {'X': X.transpose(-1, -2).clone()}
    stream.write(st, s, out, h, c)
    return st['X'].transpose(-1, -2)


def ddl_inputs(dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2, 5, 32, dv, generator=g, dtype=torch.float64)
    out, h, c = (torch.randn(2, 5, 32, generator=g, dtype=torch.float64) for _ in range(3))
    return X, out, h, c


@pytest.mark.parametrize('dv', [1, 4])
def test_ddl_delta_rule(dv):
    stream = DeepDelta(GPTConfig(n_layer=2, n_head=2, n_embd=32, residual='ddl', ddl_dv=dv)).double()
    X, out, h, c = ddl_inputs(dv)
    k = out / out.norm(dim=-1, keepdim=True)
    v = 4 * torch.sigmoid(torch.einsum('btd,jd->btj', h, stream.w_v[0]) + stream.b_v[0])
    beta = 2 * torch.sigmoid(c @ stream.w_b[0] + stream.b_b[0])
    X1 = ddl_write(stream, X, out, h, c)
    kX, kX1 = torch.einsum('btd,btdj->btj', k, X), torch.einsum('btd,btdj->btj', k, X1)
    # error along k contracts by (1 - beta); the orthogonal complement of k is untouched
    torch.testing.assert_close(kX1 - v, (1 - beta)[..., None] * (kX - v), rtol=1e-5, atol=1e-5)
    P = torch.eye(32, dtype=torch.float64) - k[..., :, None] * k[..., None, :]  # (B, T, d, d)
    torch.testing.assert_close(P @ X1, P @ X, rtol=1e-5, atol=1e-5)
    assert ((beta > 0) & (beta < 2)).all()
    # the size of the sublayer output does not matter, its sign does
    torch.testing.assert_close(ddl_write(stream, X, 7.0 * out, h, c), X1)
    assert not torch.allclose(ddl_write(stream, X, -out, h, c), X1)
    with torch.no_grad():
        stream.b_b.fill_(-1e4)  # beta = 2 sigmoid(-1e4) = 0: the identity, exactly
        assert torch.equal(ddl_write(stream, X, out, h, c), X)
        stream.w_b.zero_(); stream.b_b.zero_()  # beta = 1: the readout along k is overwritten with v
        torch.testing.assert_close(torch.einsum('btd,btdj->btj', k, ddl_write(stream, X, out, h, c)), v)


def test_ddl_expanded_state_starts_as_the_embedding():
    model = make(residual='ddl', ddl_dv=4).double()
    e = torch.randn(2, T, 32, dtype=torch.float64)
    st = model.stream.start(e)
    assert torch.equal(st['X'], e.unsqueeze(-2).expand(-1, -1, 4, -1))      # EC(e) == repeat(e)
    for i in range(model.config.n_layer + 1):
        torch.testing.assert_close(model.stream._compress(st['X'], i), e)    # compress(repeat(e)) == e


def naive_ddl(model, idx):
    """DDL written out as in the paper (App. A), in float64, using the model's sublayers and parameters."""
    p, dv = model.stream, model.config.ddl_dv
    e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    if dv == 1:
        X = e[..., None]
    else:  # causal depthwise conv over time: X[t, i, j] = sum_tau ec[i*dv + j, tau] e[t - 3 + tau, i]
        X = torch.zeros(*e.shape, dv, dtype=e.dtype)
        for t in range(e.size(1)):
            for tau in range(4):
                if t - 3 + tau >= 0:
                    X[:, t] += p.ec[:, 0, tau].view(-1, dv) * e[:, t - 3 + tau, :, None]  # channel i*dv + j
    compress = lambda X, i: X[..., 0] if dv == 1 else torch.einsum('btdj,jd->btd', X, p.compress[i])
    for s, (norm, f) in enumerate(model.sublayers()):
        x_in = compress(X, s // 2)
        c = norm(x_in)
        out = f(c)
        k = out / torch.sqrt((out ** 2).sum(-1, keepdim=True) + 1e-10)
        beta = 2 * torch.sigmoid(c @ p.w_b[s] + p.b_b[s])
        v = 4 * torch.sigmoid(x_in @ p.w_v[s].t() + p.b_v[s])
        X = X + beta[..., None, None] * k[..., :, None] * (v[..., None, :] - torch.einsum('btd,btdj->btj', k, X)[..., None, :])
    return model.lm_head(model.transformer.ln_f(compress(X, -1)))


@pytest.mark.parametrize('dv', [1, 4])
def test_ddl_matches_naive_loop(dv):
    model = make(residual='ddl', ddl_dv=dv).double()
    randomize_variant(model)
    idx = tokens()
    torch.testing.assert_close(model(idx, idx)[0], naive_ddl(model, idx), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# The routing primitive (§6, 8-9)

def route(srcs, w):
    """One read of the model's primitive, with query * key_gain = w."""
    return depth_route(srcs, [source_logits(v, w[None])[..., 0] for v in srcs])


def test_depth_route_invariants():
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(2, 5, 32, generator=g, dtype=torch.float64) for _ in range(4)]
    mix, a = route(srcs, torch.zeros(32, dtype=torch.float64))
    torch.testing.assert_close(mix, torch.stack(srcs).mean(0), rtol=1e-12, atol=1e-12)  # zero query: the mean
    w = torch.randn(32, generator=g, dtype=torch.float64)
    mix, a = route(srcs, w)
    torch.testing.assert_close(a.sum(0), torch.ones(2, 5, dtype=torch.float64))
    lo, hi = torch.stack(srcs).min(0).values, torch.stack(srcs).max(0).values
    assert ((mix >= lo - 1e-12) & (mix <= hi + 1e-12)).all()  # a convex combination
    _, a2 = route([srcs[0], 5.0 * srcs[1], srcs[2], srcs[3]], w)  # keys are RMS-normalised
    torch.testing.assert_close(a2, a, rtol=1e-6, atol=1e-6)
    big = srcs[2] / srcs[2].pow(2).mean(-1, keepdim=True).sqrt()
    mix, _ = route(srcs, 1e4 * big[0, 0])  # a huge logit on source 2 (at token 0, 0) selects it
    torch.testing.assert_close(mix[0, 0], srcs[2][0, 0])
    mix, _ = route([torch.zeros(1, 1, 32), torch.ones(1, 1, 32)], torch.ones(32))  # no NaN for a zero source
    assert torch.isfinite(mix).all()


# ---------------------------------------------------------------------------------------------------------
# AttnRes and Delta AttnRes against naive loops written from the papers (§3.1, §3.2, §4.2, §4.3)

def route64(srcs, q, g, eps=1e-6):
    """sum_i softmax_i(q . RMSNorm(v_i) * g) v_i, with the keys built explicitly."""
    V = torch.stack(srcs)
    K = V / torch.sqrt((V ** 2).mean(-1, keepdim=True) + eps) * g
    a = torch.softmax(torch.einsum('d,nbtd->nbt', q, K), dim=0)
    return torch.einsum('nbt,nbtd->btd', a, V)


def naive_attnres(model, idx):
    q, g, S, L2 = model.stream.query, model.stream.key_gain, model.config.res_block, 2 * model.config.n_layer
    e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    if S == 0:  # Full AttnRes (Eq. 1-4): sources are e and every earlier sublayer output
        srcs = [e]
        for s, (norm, f) in enumerate(model.sublayers()):
            srcs.append(f(norm(route64(srcs, q[s], g[s]))))
        x = route64(srcs, q[L2], g[L2])
    else:  # Block AttnRes (Eq. 5-6, Fig. 2), boundaries every S sublayers
        blocks, partial = [], None
        for s, (norm, f) in enumerate(model.sublayers()):
            if s % S == 0:
                blocks.append(e if s == 0 else partial)
                partial = None
            out = f(norm(route64(blocks + ([] if partial is None else [partial]), q[s], g[s])))
            partial = out if partial is None else partial + out
        x = route64(blocks + [partial], q[L2], g[L2])
    return model.lm_head(model.transformer.ln_f(x))


def naive_delta(model, idx, uniform=False):
    st = model.stream
    S, gate = model.config.res_block, st.gate
    e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    route = (lambda srcs, r: torch.stack(srcs).mean(0)) if uniform else \
        (lambda srcs, r: route64(srcs, st.query[r], st.key_gain[r]))
    x, srcs, blocks, mark = e, [e], [e], e
    for s, (norm, f) in enumerate(model.sublayers()):
        if S == 0:  # Delta AttnRes: sources [e, out_0, ..., out_{s-1}]
            cur = srcs
        else:  # Delta Block, clean: true block deltas, plus the current partial block
            if s % S == 0 and s > 0:
                blocks.append(x - mark)
                mark = x
            cur = blocks + ([x - mark] if s % S != 0 else [])
        mix = route(cur, s - 1)
        h = x if s == 0 else x + (mix if gate is None else gate[s - 1] * mix)
        out = f(norm(h))
        x = x + out
        srcs.append(out)
    return model.lm_head(model.transformer.ln_f(x))


ROUTED = ['attnres', 'attnres_block', 'delta', 'delta_block', 'delta_gate', 'delta_block_gate']


@pytest.mark.parametrize('name', ROUTED)
def test_routing_matches_naive_loop(name):
    model = make(**VARIANTS[name]).double()
    randomize_variant(model)
    idx = tokens()
    naive = naive_delta if model.stream.additive else naive_attnres
    torch.testing.assert_close(model(idx, idx)[0], naive(model, idx), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('res_block', [0, 2])
def test_delta_zero_query_adds_the_mean_of_the_sources(res_block):
    model = make(residual='delta', res_block=res_block).double()
    idx = tokens()
    torch.testing.assert_close(model(idx, idx)[0], naive_delta(model, idx, uniform=True), rtol=1e-10, atol=1e-10)


def test_attnres_zero_query_weights_are_uniform_and_block_1_is_full():
    idx = tokens()
    w = routing.weights(make(residual='attnres'), idx)  # (2L+1 reads, 2L+1 sources, B, T)
    for r in range(w.size(0)):  # read r sees r + 1 sources with weight 1/(r+1)
        assert torch.allclose(w[r, :r + 1], torch.full_like(w[r, :r + 1], 1 / (r + 1))) and (w[r, r + 1:] == 0).all()
    full, one = make(residual='attnres'), make(residual='attnres', res_block=1)
    randomize_variant(full); randomize_variant(one)
    assert torch.equal(full(idx, idx)[0], one(idx, idx)[0])
    assert torch.equal(routing.weights(full, idx), routing.weights(one, idx))


def test_source_counts():
    idx = tokens(B=1)
    for kw, counts in [(dict(residual='attnres', res_block=4), [1, 2, 2, 2, 2, 3, 3]),   # 2L = 6, S = 4
                       (dict(residual='delta', res_block=2), [2, 2, 3, 3, 4]),           # reads of s = 1..5
                       (dict(residual='delta'), [2, 3, 4, 5, 6])]:
        w = routing.weights(make(**kw), idx)
        assert [(w[r, :, 0, 0] > 0).sum().item() for r in range(w.size(0))] == counts, kw
        assert len(routing.labels(make(**kw))[0]) == w.size(0)
        mx, ent = routing.stats(w)
        torch.testing.assert_close(mx, 1 / torch.tensor(counts, dtype=torch.float))   # uniform at init
        torch.testing.assert_close(ent, torch.log(torch.tensor(counts, dtype=torch.float)))


def run_stream(model, idx):
    """Drive the model's residual-stream interface by hand, returning the embedding, the sublayer outputs,
    the states seen before each sublayer and the input of ln_f."""
    e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    st, outs, seen = model.stream.start(e), [], []
    for s, (norm, f) in enumerate(model.sublayers()):
        seen.append({k: (list(v) if isinstance(v, list) else v) for k, v in st.items()})
        h = model.stream.read(st, s)
        c = norm(h)
        outs.append(f(c))
        model.stream.write(st, s, outs[-1], h, c)
    return e, outs, seen, model.stream.final(st)


@pytest.mark.parametrize('name', ['delta', 'delta_block'])
def test_delta_stream_is_standard_and_blocks_telescope(name):
    model = make(**VARIANTS[name]).double()
    randomize_variant(model)
    e, outs, seen, final = run_stream(model, tokens())
    torch.testing.assert_close(final, e + sum(outs), rtol=1e-12, atol=1e-12)  # x_final = e + sum_s out_s
    for s, st in enumerate(seen):
        partial = [] if st['partial'] is None else [st['partial']]
        torch.testing.assert_close(sum(st['blocks'] + partial), st['x'], rtol=1e-12, atol=1e-12)
        assert st['blocks'][0] is e  # the embedding is never folded into a block


def test_attnres_block_bookkeeping():
    model = make(residual='attnres', res_block=4).double()
    _, outs, seen, _ = run_stream(model, tokens())
    for s, st in enumerate(seen[1:], start=1):  # finished blocks + partial block == all outputs so far
        parts = st['blocks'][1:] + ([st['partial']] if st['partial'] is not None else [])
        torch.testing.assert_close(sum(parts), sum(outs[:s]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint conversion

@pytest.mark.parametrize('res_block', [0, 2])
def test_delta_gate_conversion_is_bit_exact(res_block):
    std = make(seed=0)
    with torch.no_grad():  # a "trained" standard model: move every weight away from init
        for p in std.parameters():
            p.add_(0.05 * torch.randn_like(p))
    delta = make(seed=5, residual='delta', res_block=res_block, delta_gate=True)
    missing = delta.load_backbone({'_orig_mod.' + k: v for k, v in std.state_dict().items()})
    assert missing == sorted(delta.variant_param_names())
    idx = tokens()
    assert torch.equal(delta(idx, idx)[0], std(idx, idx)[0])
    nogate = make(seed=5, residual='delta', res_block=res_block)
    nogate.load_backbone(std.state_dict())
    assert not torch.allclose(nogate(idx, idx)[0], std(idx, idx)[0])  # without the gate it is not the identity


def test_load_backbone_refuses_a_mismatch():
    src = make(residual='attnres').state_dict()
    assert make(residual='ddl').load_backbone(src) == sorted(make(residual='ddl').variant_param_names())
    wide = GPT(GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=64))
    with pytest.raises(ValueError, match='transformer.wte.weight'):
        make().load_backbone(wide.state_dict())
    with pytest.raises(ValueError, match='missing transformer.h.2'):
        make().load_backbone(make(n_layer=2).state_dict())
