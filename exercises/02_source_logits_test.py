"""Exercise 2: source_logits, the logits of one source against every read's pseudo-query. Graded by
`python exercises.py check 2`. Each test is a pair: compute_X(M, seed) runs the student's model.py (M) on inputs
made from the seed, in a child process, and returns the outputs; check_X(out, ref) runs in the grader, makes the
same inputs from ref.seed and checks the outputs. Reference values are loops over reads and tokens in float64."""

import math

import torch

B, T, D, R = 2, 3, 8, 5


def inputs(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    v[1, 2] *= 1e-4  # a nearly-zero source, where eps matters
    W = torch.randn(R, D, generator=g, dtype=torch.float64)
    return v.to(dtype), W.to(dtype)


def logits_loop(v, W, eps=1e-6):
    """logit[b, t, r] = sum_d W[r, d] v[b, t, d] / sqrt(mean_d v[b, t, d]^2 + eps)."""
    out = torch.zeros(B, T, R, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            x = [float(z) for z in v[b, t]]
            rms = math.sqrt(sum(z * z for z in x) / len(x) + eps)
            for r in range(R):
                out[b, t, r] = sum(float(w) * z for w, z in zip(W[r], x)) / rms
    return out


def worst(got, want):
    err = (got.double() - want.double()).abs()
    return tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape))


def compute_one_logit_per_token_and_read(M, seed):
    """returns (B, T, R): every read's logit for every token, from one call"""
    return M.source_logits(*inputs(seed))


def check_one_logit_per_token_and_read(lg, ref):
    assert tuple(lg.shape) == (B, T, R), \
        f'for a source (B, T, d) = {(B, T, D)} and R = {R} reads the logits should be (B, T, R) = {(B, T, R)}; ' \
        f'they are {tuple(lg.shape)}'


def compute_logits_are_the_query_against_the_rms_normalised_key(M, seed):
    """logit = (q * g) . v / sqrt(mean(v^2) + eps), no 1/sqrt(d), no temperature"""
    return M.source_logits(*inputs(seed))


def check_logits_are_the_query_against_the_rms_normalised_key(got, ref):
    want = logits_loop(*inputs(ref.seed))
    if torch.allclose(got.double(), want, rtol=1e-7, atol=1e-9):
        return
    i = worst(got, want)
    ratio = (got[i] / want[i]).item()
    hint = ''
    if abs(ratio - 1 / math.sqrt(D)) < 1e-3:
        hint = f' Yours are the reference times 1/sqrt(d) = {ratio:.4f}: the paper scales by nothing.'
    elif abs(ratio - math.sqrt(D)) < 1e-3:
        hint = f' Yours are the reference times sqrt(d) = {ratio:.4f}: normalise by the RMS (a mean over d), ' \
               f'not the norm.'
    raise AssertionError(f'the logit of token (b, t) = {i[:2]} for read {i[2]} should be {want[i]:.6f}; read '
                         f'{got[i]:.6f}.{hint}')


def compute_scaling_a_source_does_not_change_its_logits(M, seed):
    """the keys are RMS-normalised: 5 v has the logits of v"""
    v, W = inputs(seed)
    v[1, 2] = torch.randn(D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)  # not ~0
    return M.source_logits(v, W), M.source_logits(5 * v, W)


def check_scaling_a_source_does_not_change_its_logits(result, ref):
    a, b = result
    i = worst(a, b)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), \
        f'multiplying a source by 5 changed its logit at {i} from {a[i]:.5f} to {b[i]:.5f}: the key must be ' \
        f'the source divided by its RMS over d'


def compute_a_zero_source_gives_zero_logits(M, seed):
    """a zero source gives logits 0, not NaN (eps goes inside the square root)"""
    v, W = inputs(seed)
    return M.source_logits(torch.zeros_like(v), W)


def check_a_zero_source_gives_zero_logits(lg, ref):
    assert torch.isfinite(lg).all() and (lg == 0).all(), \
        f'a zero source should give logits 0; read {lg.flatten()[:3].tolist()}. Add eps to the mean square ' \
        f'before the square root'


def compute_float32_under_bfloat16_autocast(M, seed):
    """in float32 even under bfloat16 autocast, and for bfloat16 sources"""
    v, W = inputs(seed, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lg = M.source_logits(v, W)
    return lg, M.source_logits(v.bfloat16(), W)


def check_float32_under_bfloat16_autocast(result, ref):
    lg, lg16 = result
    v, W = inputs(ref.seed, dtype=torch.float32)
    want = logits_loop(v.double(), W.double())
    assert lg.dtype == torch.float32, \
        f'under bfloat16 autocast the logits came back as {lg.dtype}: autocast runs matmuls in bfloat16. ' \
        f'Turn it off inside the function (with torch.autocast(device_type=v.device.type, enabled=False))'
    err = (lg.double() - want).abs().max().item()
    assert err < 1e-4, \
        f'under bfloat16 autocast the logits are off by up to {err:.3g}: they should be computed in float32'
    assert lg16.dtype == torch.float32, \
        f'a bfloat16 source should give float32 logits (use wide(v), defined in model.py); got {lg16.dtype}'


def compute_gradients_reach_the_source_and_the_queries(M, seed):
    """gradients flow back to the source and to W"""
    v, W = inputs(seed)
    v.requires_grad_(True)
    W.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    (M.source_logits(v, W) * torch.randn(B, T, R, generator=g, dtype=torch.float64)).sum().backward()
    return v.grad, W.grad


def check_gradients_reach_the_source_and_the_queries(grads, ref):
    gv, gW = grads
    assert gv is not None and gv.abs().sum() > 0, 'no gradient reached the source v'
    assert gW is not None and gW.abs().sum() > 0, 'no gradient reached the queries W'


ROUTED = (('Full AttnRes', dict(residual='attnres')), ('Delta Block', dict(residual='delta', res_block=2)))


def routed_model(M, seed, kw):
    """A routed model in float64 with random queries and gains; and its tokens."""
    torch.manual_seed(seed)
    model = M.GPT(M.GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **kw)).double().eval()
    with torch.no_grad():
        model.stream.query.normal_(0, 2.0)
        model.stream.key_gain.uniform_(0.5, 1.5)
    return model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed + 1))


def same_weights(weights, model):
    """The student's model, built from the same seed, has the weights of the grader's, which the loop uses."""
    for name, p in model.state_dict().items():
        w = weights.get(name)
        assert torch.is_tensor(w) and w.shape == p.shape and torch.equal(w, p), \
            f'{name} is not what model.py makes from the same seed: the tests need GPT.__init__ and the ' \
            f'init of every module as they were handed out'


def compute_routed_models_match_a_loop_with_explicit_keys(M, seed):
    """Delta Block and Full AttnRes models, with random queries and gains, match loops that build every key"""
    out = {}
    for label, kw in ROUTED:
        model, idx = routed_model(M, seed, kw)
        with torch.no_grad():
            out[label] = model.state_dict(), model(idx, idx)[0]
    return out


def check_routed_models_match_a_loop_with_explicit_keys(out, ref):
    for label, kw in ROUTED:
        weights, got = out[label]
        model, idx = routed_model(ref.model, ref.seed, kw)
        same_weights(weights, model)
        st = model.stream

        def route(srcs, r):
            V = torch.stack(srcs)
            K = V / torch.sqrt((V ** 2).mean(-1, keepdim=True) + 1e-6) * st.key_gain[r]
            a = torch.softmax(torch.einsum('d,nbtd->nbt', st.query[r], K), dim=0)
            return torch.einsum('nbt,nbtd->btd', a, V)

        with torch.no_grad():
            e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8))
            x, outs = e, []
            for s, (norm, f) in enumerate(model.sublayers()):
                if kw['residual'] == 'attnres':
                    h = route([e] + outs, s)
                else:  # blocks of 2 sublayers: e, the finished block sums, the partial block
                    blocks = [e] + [outs[j] + outs[j + 1] for j in range(0, s - 1, 2)] + ([outs[-1]] if s % 2 else [])
                    h = x if s == 0 else x + route(blocks, s - 1)
                outs.append(f(norm(h)))
                x = x + outs[-1]
            final = route([e] + outs, len(outs)) if kw['residual'] == 'attnres' else x
            want = model.lm_head(model.transformer.ln_f(final))
        err = (got - want).abs().max().item()
        assert err < 1e-9, \
            f'the {label} model\'s logits differ from a loop with explicit RMS-normalised keys by up to {err:.3g}'
