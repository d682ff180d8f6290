"""Exercise 4: DeepDelta.write, the delta rule of Deep Delta Learning. Graded by `python exercises.py check 4`;
pytest runs it too. The tests check the rule's invariants (Zhang et al., arXiv:2601.00417, Sec. 3), with k, beta
and v computed here in float64 from the module's parameters."""

import torch

from model import GPT, GPTConfig, DeepDelta

D, S = 16, 2  # width, and the sublayer written: not 0, so using another sublayer's parameters shows


def stream(dv=1, seed=0):
    torch.manual_seed(seed)
    return DeepDelta(GPTConfig(n_layer=2, n_head=2, n_embd=D, residual='ddl', ddl_dv=dv)).double()


def inputs(dv=1, seed=0):
    """X as the model stores it, (B, T, dv, d), and a sublayer's output, input h and normalised input c."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2, 3, dv, D, generator=g, dtype=torch.float64)
    out, h, c = (torch.randn(2, 3, D, generator=g, dtype=torch.float64) for _ in range(3))
    return X, out, h, c


def write(m, X, out, h, c, s=S):
    st = {'X': X.clone()}
    m.write(st, s, out, h, c)
    return st['X']


def k_beta_v(m, out, h, c, s=S):
    """The rule's three ingredients, from the module's parameters."""
    k = out / out.norm(dim=-1, keepdim=True)
    beta = 2 * torch.sigmoid(c @ m.w_b[s] + m.b_b[s])                                    # (B, T)
    v = 4 * torch.sigmoid(torch.einsum('btd,jd->btj', h, m.w_v[s]) + m.b_v[s])          # (B, T, dv)
    return k, beta, v


def along(k, X):
    """k^T X for X stored as (B, T, dv, d): the readout along k, (B, T, dv)."""
    return torch.einsum('btd,btjd->btj', k, X)


def worst(err):
    return tuple(int(j) for j in torch.unravel_index(err.abs().argmax(), err.shape))


def test_write_keeps_the_state_shape():
    """write stores a new state of the same shape (B, T, dv, d) in st['X']"""
    for dv in (1, 4):
        m, (X, out, h, c) = stream(dv), inputs(dv)
        X1 = write(m, X, out, h, c)
        assert torch.is_tensor(X1) and X1.shape == X.shape, \
            f'with dv={dv} the state should stay (B, T, dv, d) = {tuple(X.shape)}; it became ' \
            f'{tuple(X1.shape) if torch.is_tensor(X1) else type(X1).__name__}'


def test_beta_zero_leaves_the_state_unchanged():
    """beta = 0 (gate closed) is the identity"""
    m, (X, out, h, c) = stream(), inputs()
    with torch.no_grad():
        m.b_b.fill_(-1e4)  # beta = 2 sigmoid(-1e4) = 0
    err = (write(m, X, out, h, c) - X).abs().max().item()
    assert err < 1e-12, \
        f'with beta = 0 (b_b = -1e4) the state should not change; it moved by up to {err:.3g}. Every change ' \
        f'must be multiplied by beta = 2 sigmoid(w_b[s] . c + b_b[s])'


def test_beta_one_writes_v_along_k():
    """beta = 1: the readout along k becomes v = 4 sigmoid(w_v[s] h + b_v[s])"""
    for dv in (1, 4):
        m, (X, out, h, c) = stream(dv), inputs(dv)
        with torch.no_grad():
            m.w_b.zero_()
            m.b_b.zero_()  # beta = 2 sigmoid(0) = 1
        k, _, v = k_beta_v(m, out, h, c)
        got = along(k, write(m, X, out, h, c))
        i = worst(got - v)
        assert torch.allclose(got, v, atol=1e-8), \
            f'with beta = 1 (dv={dv}) the readout along k, k^T X, should become v; at token (b, t) = {i[:2]}, ' \
            f'channel {i[2]}: v = {v[i]:.5f}, read {got[i]:.5f} (v = 4 sigmoid(w_v[s] h + b_v[s]), from the ' \
            f'sublayer\'s input h, for sublayer s = {S})'


def test_the_error_along_k_shrinks_by_one_minus_beta():
    """the error along k, k^T X - v, is multiplied by (1 - beta)"""
    for dv in (1, 4):
        m, (X, out, h, c) = stream(dv), inputs(dv)
        k, beta, v = k_beta_v(m, out, h, c)
        before = along(k, X) - v
        after = along(k, write(m, X, out, h, c)) - v
        want = (1 - beta).unsqueeze(-1) * before
        i = worst(after - want)
        assert torch.allclose(after, want, atol=1e-8), \
            f'along k the error k^T X - v should become (1 - beta) times what it was (dv={dv}); at token ' \
            f'(b, t) = {i[:2]}, channel {i[2]}: before {before[i]:.5f}, beta {beta[i[:2]]:.5f}, expected after ' \
            f'{want[i]:.5f}, read {after[i]:.5f}'


def test_directions_orthogonal_to_k_are_untouched():
    """the part of X orthogonal to k does not change (a rank-1 write along k)"""
    for dv in (1, 4):
        m, (X, out, h, c) = stream(dv), inputs(dv)
        k, _, _ = k_beta_v(m, out, h, c)
        X1 = write(m, X, out, h, c)
        # (I - k k^T) X: remove each column's component along k
        P = lambda Y: Y - along(k, Y).unsqueeze(-1) * k.unsqueeze(-2)
        err = (P(X1) - P(X)).abs().max().item()
        assert err < 1e-8, \
            f'the part of X orthogonal to k should stay as it was (dv={dv}); it moved by up to {err:.3g}. The ' \
            f'change must be k times something: X + k (beta (v - k^T X))^T'


def test_only_the_direction_of_the_output_matters():
    """k = out / |out|: 7 out writes the same as out, -out does not"""
    m, (X, out, h, c) = stream(), inputs()
    X1 = write(m, X, out, h, c)
    err = (write(m, X, 7 * out, h, c) - X1).abs().max().item()
    assert err < 1e-8, f'multiplying the sublayer output by 7 changed the new state by up to {err:.3g}: ' \
                       f'k is the unit vector out / |out|'
    assert not torch.allclose(write(m, X, -out, h, c), X1), \
        'the negated output -out wrote the same state as out: the sign of k = out / |out| must matter'


def test_a_zero_output_changes_nothing():
    """out = 0 gives k ~ 0: the state stays, without NaN (eps in the norm)"""
    m, (X, out, h, c) = stream(), inputs()
    X1 = write(m, X, torch.zeros_like(out), h, c)
    assert torch.isfinite(X1).all(), \
        'a zero sublayer output gave NaN or inf: normalise with k = out / sqrt(|out|^2 + eps^2), eps = self.eps_k'
    err = (X1 - X).abs().max().item()
    assert err < 1e-8, f'a zero sublayer output should leave the state unchanged; it moved by up to {err:.3g}'


def test_ddl_models_are_causal_and_train():
    """whole DDL models (dv = 1 and 4): finite loss near ln(vocab) at init, causal, gradients reach the gates"""
    for dv in (1, 4):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=D, residual='ddl', ddl_dv=dv))
        idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        logits, loss = model(idx, torch.roll(idx, 1, 1))
        assert torch.isfinite(loss) and abs(loss.item() - 4.159) < 0.5, \
            f'dv={dv}: the loss at init should be near ln(64) = 4.16; it is {loss.item():.4f}'
        idx2 = idx.clone()
        idx2[:, 5:] = (idx2[:, 5:] + 1) % 64
        logits2, _ = model(idx2, idx2)
        assert torch.allclose(logits[:, :5], logits2[:, :5]), \
            f'dv={dv}: changing tokens 5.. changed the logits of tokens 0..4: the write must act per token'
        loss.backward()
        for name in ('w_b', 'b_b', 'w_v', 'b_v'):
            grad = getattr(model.stream, name).grad
            assert grad is not None and grad.abs().sum() > 0, f'dv={dv}: no gradient reached {name}'
