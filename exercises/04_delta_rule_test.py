"""Exercise 4: DeepDelta.write, the delta rule of Deep Delta Learning. Graded by `python exercises.py check 4`.
Each test is a pair: compute_X(M, seed) runs the student's model.py (M) on inputs made from the seed, in a child
process, and returns the outputs; check_X(out, ref) runs in the grader, makes the same inputs from ref.seed and
checks the outputs. The tests check the rule's invariants (Zhang et al., arXiv:2601.00417, Sec. 3), with k, beta
and v computed in the grader in float64 from the parameters of the module made from the same seed."""

import math

import torch

D, S = 16, 2  # width, and the sublayer written: not 0, so using another sublayer's parameters shows
DVS = (1, 4)  # the scalar form and a matrix state


def stream(M, dv, seed):
    torch.manual_seed(seed)
    return M.DeepDelta(M.GPTConfig(n_layer=2, n_head=2, n_embd=D, residual='ddl', ddl_dv=dv)).double()


def inputs(dv, seed):
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
    return k.detach(), beta.detach(), v.detach()


def along(k, X):
    """k^T X for X stored as (B, T, dv, d): the readout along k, (B, T, dv)."""
    return torch.einsum('btd,btjd->btj', k, X)


def worst(err):
    return tuple(int(j) for j in torch.unravel_index(err.abs().argmax(), err.shape))


def compute_write_keeps_the_state_shape(M, seed):
    """write stores a new state of the same shape (B, T, dv, d) in st['X']"""
    return [write(stream(M, dv, seed), *inputs(dv, seed)) for dv in DVS]


def check_write_keeps_the_state_shape(states, ref):
    for j, dv in enumerate(DVS):
        X, X1 = inputs(dv, ref.seed)[0], states[j]
        assert torch.is_tensor(X1) and X1.shape == X.shape, \
            f'with dv={dv} the state should stay (B, T, dv, d) = {tuple(X.shape)}; it became ' \
            f'{tuple(X1.shape) if torch.is_tensor(X1) else type(X1).__name__}'


def compute_beta_zero_leaves_the_state_unchanged(M, seed):
    """beta = 0 (gate closed) is the identity"""
    m = stream(M, 1, seed)
    with torch.no_grad():
        m.b_b.fill_(-1e4)  # beta = 2 sigmoid(-1e4) = 0
    return write(m, *inputs(1, seed))


def check_beta_zero_leaves_the_state_unchanged(X1, ref):
    err = (X1 - inputs(1, ref.seed)[0]).abs().max().item()
    assert err < 1e-12, \
        f'with beta = 0 (b_b = -1e4) the state should not change; it moved by up to {err:.3g}. Every change ' \
        f'must be multiplied by beta = 2 sigmoid(w_b[s] . c + b_b[s])'


def open_gate(m):
    with torch.no_grad():
        m.w_b.zero_()
        m.b_b.zero_()  # beta = 2 sigmoid(0) = 1
    return m


def compute_beta_one_writes_v_along_k(M, seed):
    """beta = 1: the readout along k becomes v = 4 sigmoid(w_v[s] h + b_v[s])"""
    return [write(open_gate(stream(M, dv, seed)), *inputs(dv, seed)) for dv in DVS]


def check_beta_one_writes_v_along_k(states, ref):
    for j, dv in enumerate(DVS):
        X, out, h, c = inputs(dv, ref.seed)
        k, _, v = k_beta_v(open_gate(stream(ref.model, dv, ref.seed)), out, h, c)
        got = along(k, states[j])
        i = worst(got - v)
        assert torch.allclose(got, v, atol=1e-8), \
            f'with beta = 1 (dv={dv}) the readout along k, k^T X, should become v; at token (b, t) = {i[:2]}, ' \
            f'channel {i[2]}: v = {v[i]:.5f}, read {got[i]:.5f} (v = 4 sigmoid(w_v[s] h + b_v[s]), from the ' \
            f'sublayer\'s input h, for sublayer s = {S})'


def compute_the_error_along_k_shrinks_by_one_minus_beta(M, seed):
    """the error along k, k^T X - v, is multiplied by (1 - beta)"""
    return [write(stream(M, dv, seed), *inputs(dv, seed)) for dv in DVS]


def check_the_error_along_k_shrinks_by_one_minus_beta(states, ref):
    for j, dv in enumerate(DVS):
        X, out, h, c = inputs(dv, ref.seed)
        k, beta, v = k_beta_v(stream(ref.model, dv, ref.seed), out, h, c)
        before = along(k, X) - v
        after = along(k, states[j]) - v
        want = (1 - beta).unsqueeze(-1) * before
        i = worst(after - want)
        assert torch.allclose(after, want, atol=1e-8), \
            f'along k the error k^T X - v should become (1 - beta) times what it was (dv={dv}); at token ' \
            f'(b, t) = {i[:2]}, channel {i[2]}: before {before[i]:.5f}, beta {beta[i[:2]]:.5f}, expected after ' \
            f'{want[i]:.5f}, read {after[i]:.5f}'


def compute_directions_orthogonal_to_k_are_untouched(M, seed):
    """the part of X orthogonal to k does not change (a rank-1 write along k)"""
    return [write(stream(M, dv, seed), *inputs(dv, seed)) for dv in DVS]


def check_directions_orthogonal_to_k_are_untouched(states, ref):
    for j, dv in enumerate(DVS):
        X, out, _, _ = inputs(dv, ref.seed)
        k = out / out.norm(dim=-1, keepdim=True)
        # (I - k k^T) X: remove each column's component along k
        P = lambda Y: Y - along(k, Y).unsqueeze(-1) * k.unsqueeze(-2)
        err = (P(states[j]) - P(X)).abs().max().item()
        assert err < 1e-8, \
            f'the part of X orthogonal to k should stay as it was (dv={dv}); it moved by up to {err:.3g}. The ' \
            f'change must be k times something: X + k (beta (v - k^T X))^T'


def compute_only_the_direction_of_the_output_matters(M, seed):
    """k = out / |out|: 7 out writes the same as out, -out does not"""
    m, (X, out, h, c) = stream(M, 1, seed), inputs(1, seed)
    return write(m, X, out, h, c), write(m, X, 7 * out, h, c), write(m, X, -out, h, c)


def check_only_the_direction_of_the_output_matters(states, ref):
    X1, X7, X_neg = states
    err = (X7 - X1).abs().max().item()
    assert err < 1e-8, f'multiplying the sublayer output by 7 changed the new state by up to {err:.3g}: ' \
                       f'k is the unit vector out / |out|'
    assert not torch.allclose(X_neg, X1), \
        'the negated output -out wrote the same state as out: the sign of k = out / |out| must matter'


def compute_a_zero_output_changes_nothing(M, seed):
    """out = 0 gives k ~ 0: the state stays, without NaN (eps in the norm)"""
    X, out, h, c = inputs(1, seed)
    return write(stream(M, 1, seed), X, torch.zeros_like(out), h, c)


def check_a_zero_output_changes_nothing(X1, ref):
    assert torch.isfinite(X1).all(), \
        'a zero sublayer output gave NaN or inf: normalise with k = out / sqrt(|out|^2 + eps^2), eps = self.eps_k'
    err = (X1 - inputs(1, ref.seed)[0]).abs().max().item()
    assert err < 1e-8, f'a zero sublayer output should leave the state unchanged; it moved by up to {err:.3g}'


def compute_ddl_models_are_causal_and_train(M, seed):
    """whole DDL models (dv = 1 and 4): finite loss near ln(vocab) at init, causal, gradients reach the gates"""
    out = []
    for dv in DVS:
        torch.manual_seed(seed)
        model = M.GPT(M.GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=D, residual='ddl',
                                  ddl_dv=dv))
        idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed + 1))
        logits, loss = model(idx, torch.roll(idx, 1, 1))
        idx2 = idx.clone()
        idx2[:, 5:] = (idx2[:, 5:] + 1) % 64
        logits2, _ = model(idx2, idx2)
        loss.backward()
        grads = {name: getattr(model.stream, name).grad for name in ('w_b', 'b_b', 'w_v', 'b_v')}
        out.append((loss.item(), logits[:, :5], logits2[:, :5], grads))
    return out


def check_ddl_models_are_causal_and_train(out, ref):
    for j, dv in enumerate(DVS):
        loss, logits, logits2, grads = out[j]
        assert math.isfinite(loss) and abs(loss - math.log(64)) < 0.5, \
            f'dv={dv}: the loss at init should be near ln(64) = 4.16; it is {loss:.4f}'
        assert torch.allclose(logits, logits2), \
            f'dv={dv}: changing tokens 5.. changed the logits of tokens 0..4: the write must act per token'
        for name in ('w_b', 'b_b', 'w_v', 'b_v'):
            assert grads[name] is not None and grads[name].abs().sum() > 0, f'dv={dv}: no gradient reached {name}'
