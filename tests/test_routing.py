"""routing.py: the weights it records and the importance it measures, against the same quantities computed
by hand in float64 from the papers' formulas (not through Routed.probe)."""

import math

import pytest
import torch
import torch.nn.functional as F

import routing
from model import GPT, GPTConfig


def make(**kw):
    """A tiny model in float64 with routing far from uniform, so that removing a source changes the loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **kw)).double()
    with torch.no_grad():
        model.stream.query.normal_(0, 2.0)
        model.stream.key_gain.add_(0.3 * torch.randn_like(model.stream.key_gain))
    return model


def naive_loss(model, x, y, remove=None, no_term=None):
    """The loss of full AttnRes or full Delta written out: read r mixes the sources it sees with softmax
    weights of q_r . RMSNorm(v_i); remove=(r, j) drops source j from read r and renormalises the others;
    no_term=r gives Delta's read r no routed term (h = x)."""
    m, st = model.transformer, model.stream
    e = m.wte(x) + m.wpe(torch.arange(x.size(1)))
    srcs, x_std, W = [e], e, st.query * st.key_gain  # the values, the standard stream, the queries

    def mix(r):
        logits = [(v * W[r]).sum(-1) / torch.sqrt(v.pow(2).mean(-1) + 1e-6) for v in srcs]
        keep = [i for i in range(len(srcs)) if remove != (r, i)]
        a = torch.stack([logits[i] for i in keep]).softmax(0)
        return sum(a[k].unsqueeze(-1) * srcs[i] for k, i in enumerate(keep))
    for s, (norm, f) in enumerate(model.sublayers()):
        r = s - 1 if st.additive else s  # Delta's sublayer 0 reads e unrouted
        if not st.additive:
            h = mix(r)
        else:
            h = x_std if s == 0 or no_term == r else x_std + mix(r)
        out = f(norm(h))
        x_std, srcs = x_std + out, srcs + [out]
    final = x_std if st.additive else mix(st.n_reads - 1)
    logits = model.lm_head(m.ln_f(final))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


@pytest.mark.parametrize('residual', ['attnres', 'delta'])
def test_importance_is_the_loss_without_the_source(residual):
    model = make(residual=residual)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    imp = routing.importance(model, [(x, y)])
    base = naive_loss(model, x, y)
    assert imp['loss'] == pytest.approx(base, abs=1e-6)
    dests, srcs = routing.labels(model)
    assert imp['drop'].shape == (len(dests), len(srcs))
    for r in range(len(dests)):
        for j in range(len(srcs)):
            seen = r + 1 + int(model.stream.additive)  # read r sees e and the r (or r + 1) outputs before it
            if j >= seen or seen == 1:  # not visible, or its only source: nothing to remove
                assert math.isnan(imp['drop'][r, j]), (r, j)
                continue
            expected = naive_loss(model, x, y, remove=(r, j)) - base
            assert imp['drop'][r, j].item() == pytest.approx(expected, abs=1e-5), (r, j)
    if residual == 'attnres':
        assert imp['term'] is None
    else:  # the whole routed term of each read removed
        for r in range(len(dests)):
            assert imp['term'][r].item() == pytest.approx(naive_loss(model, x, y, no_term=r) - base, abs=1e-5)
    assert model.stream.probe is None and 'read' not in vars(model.stream)  # the model is left as it was


def test_block_importance_names_the_columns_it_measured():
    """Block form: a read sees e, the finished blocks and the partial block (the last column); the columns
    that it does not see stay NaN, the others are measured, and the weights it records sum to 1."""
    model = make(residual='attnres', res_block=3)  # 4 sublayers: block 1 ends after sublayer 2
    x, y = torch.randint(0, 64, (1, 16)), torch.randint(0, 64, (1, 16))
    w = routing.weights(model, x)
    dests, srcs = routing.labels(model)
    assert srcs == ['emb', 'blk1', 'partial'] and w.shape == (5, 3, 1, 16)
    torch.testing.assert_close(w.sum(1), torch.ones(5, 1, 16, dtype=w.dtype))
    drop = routing.importance(model, [(x, y)])['drop']
    visible = (w[:, :, 0, 0] > 0).tolist()
    assert visible == [[True, False, False], [True, False, True], [True, False, True], [True, True, False],
                       [True, True, True]]
    for r, row in enumerate(visible):
        n = sum(row)
        assert [not math.isnan(v) for v in drop[r].tolist()] == [v and n > 1 for v in row], r


def test_standard_and_ddl_have_no_routing():
    for kw in (dict(residual='standard'), dict(residual='ddl')):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **kw))
        assert routing.weights(model, torch.zeros(1, 4, dtype=torch.long)) is None
