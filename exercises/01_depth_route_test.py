"""Exercise 1: depth_route, the softmax over depth. Graded by `python exercises.py check 1`.
Each test is a pair: compute_X(M, seed) runs the student's model.py (M) on inputs made from the seed, in a child
process, and returns the outputs; check_X(out, ref) runs in the grader, makes the same inputs from ref.seed and
checks the outputs. Every reference value is computed here by a plain loop in float64."""

import math

import torch


def sources(seed, n=4, B=2, T=3, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(B, T, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]
    logits = [2 * torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(n)]
    return srcs, logits


def softmax_loop(logits):
    """a[i][b][t] = exp(l_i - max) / sum_j exp(l_j - max), one token at a time."""
    n, (B, T) = len(logits), logits[0].shape
    a = torch.zeros(n, B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            m = max(float(lg[b, t]) for lg in logits)
            z = sum(math.exp(float(lg[b, t]) - m) for lg in logits)
            for i in range(n):
                a[i, b, t] = math.exp(float(logits[i][b, t]) - m) / z
    return a


def worst(got, want):
    """The index where got is furthest from want, as a tuple."""
    err = (got.double() - want.double()).abs()
    return tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape))


def compute_returns_the_mixture_and_the_weights(M, seed):
    """returns (mix, a): the mixture (B, T, d) and the weights (n, B, T)"""
    return M.depth_route(*sources(seed))


def check_returns_the_mixture_and_the_weights(result, ref):
    assert isinstance(result, tuple) and len(result) == 2, \
        f'depth_route should return a pair (mix, a); it returned {type(result).__name__}'
    mix, a = result
    assert tuple(mix.shape) == (2, 3, 8), \
        f'mix should have the shape of one source, (B, T, d) = (2, 3, 8); it has {tuple(mix.shape)}'
    assert tuple(a.shape) == (4, 2, 3), \
        f'the weights a should be (n, B, T) = (4, 2, 3), one per source and token; they are {tuple(a.shape)}'


def compute_weights_sum_to_one_over_depth(M, seed):
    """for every token the weights over the sources are positive and sum to 1"""
    return M.depth_route(*sources(seed))[1]


def check_weights_sum_to_one_over_depth(a, ref):
    sums = a.double().sum(0)
    i = worst(sums, torch.ones_like(sums))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-9), \
        f'the weights of one token should sum to 1 over the 4 sources; token (b, t) = {i} sums to {sums[i]:.4f}. ' \
        f'Is the softmax taken over the sources (dim 0 of the stacked logits)?'
    assert (a > 0).all(), f'softmax weights are positive; the smallest is {a.min():.4g}'


def compute_weights_are_the_softmax_of_the_logits(M, seed):
    """the weights are softmax_i(logit_i), computed per token"""
    return M.depth_route(*sources(seed))[1]


def check_weights_are_the_softmax_of_the_logits(a, ref):
    _, logits = sources(ref.seed)
    want = softmax_loop(logits)
    i = worst(a, want)
    assert torch.allclose(a.double(), want, atol=1e-9), \
        f'weight of source {i[0]} at token (b, t) = {i[1:]} should be {want[i]:.6f} = softmax of the logits ' \
        f'{[round(float(lg[i[1:]]), 3) for lg in logits]}; read {a[i]:.6f}'


def compute_mixture_is_the_weighted_sum_of_the_sources(M, seed):
    """mix = sum_i a_i v_i, with the raw sources as the values"""
    return M.depth_route(*sources(seed))[0]


def check_mixture_is_the_weighted_sum_of_the_sources(mix, ref):
    srcs, logits = sources(ref.seed)
    a = softmax_loop(logits)
    want = torch.zeros_like(srcs[0])
    for i, v in enumerate(srcs):
        want += a[i].unsqueeze(-1) * v
    i = worst(mix, want)
    assert torch.allclose(mix.double(), want, atol=1e-9), \
        f'mix at (b, t, channel) = {i} should be sum_i a_i v_i = {want[i]:.6f}; read {mix[i]:.6f}'


def compute_equal_logits_give_the_mean(M, seed):
    """equal logits (a zero query) give the plain mean of the sources"""
    srcs, _ = sources(seed, n=3)
    return M.depth_route(srcs, [torch.zeros(2, 3, dtype=torch.float64)] * 3)


def check_equal_logits_give_the_mean(result, ref):
    mix, a = result
    srcs, _ = sources(ref.seed, n=3)
    want = sum(srcs) / 3
    assert torch.allclose(a.double(), torch.full_like(a.double(), 1 / 3)), \
        f'with all logits equal every weight should be 1/3; read {a.flatten()[:3].tolist()}'
    i = worst(mix, want)
    assert torch.allclose(mix.double(), want, atol=1e-9), \
        f'with all logits equal mix should be the mean of the 3 sources; at {i}: expected {want[i]:.6f}, ' \
        f'read {mix[i]:.6f}'


def compute_large_logits_stay_finite(M, seed):
    """logits near 1000 give finite weights (exp(1000) overflows: subtract the max, or use softmax)"""
    srcs, logits = sources(seed, n=3)
    mix, a = M.depth_route(srcs, [lg + 1000 for lg in logits])
    return mix, a, M.depth_route(srcs, logits)[1]


def check_large_logits_stay_finite(result, ref):
    mix, a, a0 = result
    assert torch.isfinite(a).all() and torch.isfinite(mix).all(), \
        f'logits near 1000 gave non-finite weights ({a.flatten()[0]:.4g}, ...): exp(1000) overflows. ' \
        f'Use softmax, or subtract the largest logit before exp'
    assert torch.allclose(a.double(), a0.double(), atol=1e-9), \
        'adding the same constant (1000) to every logit should not change the weights'


def compute_half_precision_sources_give_an_fp32_mixture(M, seed):
    """bfloat16 sources are mixed in float32 (the docstring: 'in fp32'), float64 stays float64"""
    srcs, logits = sources(seed, dtype=torch.bfloat16)
    mix, _ = M.depth_route(srcs, [lg.float() for lg in logits])
    return mix, M.depth_route(*sources(seed))[0]


def check_half_precision_sources_give_an_fp32_mixture(result, ref):
    mix, mix64 = result
    assert mix.dtype == torch.float32, \
        f'for bfloat16 sources the mixture should come back in float32; it is {mix.dtype}. Convert each source ' \
        f'with wide(v) (defined in model.py) before multiplying'
    assert mix64.dtype == torch.float64, f'float64 sources should give a float64 mixture; got {mix64.dtype}'


def compute_gradients_reach_the_sources_and_the_logits(M, seed):
    """gradients flow back to every source and every logit"""
    srcs, logits = sources(seed, n=3)
    for t in srcs + logits:
        t.requires_grad_(True)
    mix, _ = M.depth_route(srcs, logits)
    (mix * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
    return [t.grad for t in srcs], [t.grad for t in logits]


def check_gradients_reach_the_sources_and_the_logits(grads, ref):
    srcs, logits = grads
    for name, group in (('source', srcs), ('logit', logits)):
        for i in range(3):  # the test's count, not the output's: every one of them must have come back
            g = group[i]
            assert g is not None and g.abs().sum() > 0, \
                f'no gradient reached {name} {i}: is something detached, or computed outside autograd?'


def route_loop(srcs, q, g, eps=1e-6):
    """One AttnRes read written out: softmax over depth of q . RMSNorm(v_i) * g, then sum_i a_i v_i."""
    V = torch.stack(srcs)
    K = V / torch.sqrt((V ** 2).mean(-1, keepdim=True) + eps) * g
    a = torch.softmax(torch.einsum('d,nbtd->nbt', q, K), dim=0)
    return torch.einsum('nbt,nbtd->btd', a, V)


def attnres_model(M, seed):
    """A Full AttnRes model in float64, with random queries; and its tokens."""
    torch.manual_seed(seed)
    model = M.GPT(M.GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16, residual='attnres'))
    model = model.double().eval()
    with torch.no_grad():
        model.stream.query.normal_(0, 2.0)
    return model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed + 1))


def same_weights(weights, model):
    """The student's model, built from the same seed, has the weights of the grader's, which the loop uses."""
    for name, p in model.state_dict().items():
        w = weights.get(name)
        assert torch.is_tensor(w) and w.shape == p.shape and torch.equal(w, p), \
            f'{name} is not what model.py makes from the same seed: the tests need GPT.__init__ and the ' \
            f'init of every module as they were handed out'


def compute_attnres_model_matches_a_loop_over_depth(M, seed):
    """a whole Full AttnRes model, with random queries, matches a loop written from the paper"""
    model, idx = attnres_model(M, seed)
    with torch.no_grad():
        return model.state_dict(), model(idx, idx)[0]


def check_attnres_model_matches_a_loop_over_depth(result, ref):
    weights, got = result
    model, idx = attnres_model(ref.model, ref.seed)
    same_weights(weights, model)
    q, g = model.stream.query, model.stream.key_gain
    with torch.no_grad():
        e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8))
        srcs = [e]
        for s, (norm, f) in enumerate(model.sublayers()):
            srcs.append(f(norm(route_loop(srcs, q[s], g[s]))))
        want = model.lm_head(model.transformer.ln_f(route_loop(srcs, q[-1], g[-1])))
    err = (got - want).abs().max().item()
    assert err < 1e-9, f'the AttnRes model\'s logits differ from the paper\'s loop by up to {err:.3g}'
