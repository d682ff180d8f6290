"""Exercise 2: source_logits, the logits of one source against every read's pseudo-query. Graded by
`python exercises.py check 2`; pytest runs it too. Reference values are loops over reads and tokens in float64."""

import math

import torch

from model import GPT, GPTConfig, source_logits

B, T, D, R = 2, 3, 8, 5


def inputs(seed=0, dtype=torch.float64):
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


def test_one_logit_per_token_and_read():
    """returns (B, T, R): every read's logit for every token, from one call"""
    v, W = inputs()
    lg = source_logits(v, W)
    assert tuple(lg.shape) == (B, T, R), \
        f'for a source (B, T, d) = {(B, T, D)} and R = {R} reads the logits should be (B, T, R) = {(B, T, R)}; ' \
        f'they are {tuple(lg.shape)}'


def test_logits_are_the_query_against_the_rms_normalised_key():
    """logit = (q * g) . v / sqrt(mean(v^2) + eps), no 1/sqrt(d), no temperature"""
    v, W = inputs()
    got, want = source_logits(v, W), logits_loop(v, W)
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


def test_scaling_a_source_does_not_change_its_logits():
    """the keys are RMS-normalised: 5 v has the logits of v"""
    v, W = inputs()
    v[1, 2] = torch.randn(D, dtype=torch.float64)  # away from the eps regime
    a, b = source_logits(v, W), source_logits(5 * v, W)
    i = worst(a, b)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), \
        f'multiplying a source by 5 changed its logit at {i} from {a[i]:.5f} to {b[i]:.5f}: the key must be ' \
        f'the source divided by its RMS over d'


def test_a_zero_source_gives_zero_logits():
    """a zero source gives logits 0, not NaN (eps goes inside the square root)"""
    v, W = inputs()
    lg = source_logits(torch.zeros_like(v), W)
    assert torch.isfinite(lg).all() and (lg == 0).all(), \
        f'a zero source should give logits 0; read {lg.flatten()[:3].tolist()}. Add eps to the mean square ' \
        f'before the square root'


def test_float32_under_bfloat16_autocast():
    """in float32 even under bfloat16 autocast, and for bfloat16 sources"""
    v, W = inputs(dtype=torch.float32)
    want = logits_loop(v.double(), W.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lg = source_logits(v, W)
    assert lg.dtype == torch.float32, \
        f'under bfloat16 autocast the logits came back as {lg.dtype}: autocast runs matmuls in bfloat16. ' \
        f'Turn it off inside the function (with torch.autocast(device_type=v.device.type, enabled=False))'
    err = (lg.double() - want).abs().max().item()
    assert err < 1e-4, \
        f'under bfloat16 autocast the logits are off by up to {err:.3g}: they should be computed in float32'
    lg16 = source_logits(v.bfloat16(), W)
    assert lg16.dtype == torch.float32, \
        f'a bfloat16 source should give float32 logits (use wide(v), defined in model.py); got {lg16.dtype}'


def test_gradients_reach_the_source_and_the_queries():
    """gradients flow back to the source and to W"""
    v, W = inputs()
    v.requires_grad_(True)
    W.requires_grad_(True)
    (source_logits(v, W) * torch.randn(B, T, R, dtype=torch.float64)).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0, 'no gradient reached the source v'
    assert W.grad is not None and W.grad.abs().sum() > 0, 'no gradient reached the queries W'


def test_routed_models_match_a_loop_with_explicit_keys():
    """Delta Block and Full AttnRes models, with random queries and gains, match loops that build every key"""
    for label, kw in (('Full AttnRes', dict(residual='attnres')), ('Delta Block', dict(residual='delta', res_block=2))):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **kw)).double().eval()
        st = model.stream
        with torch.no_grad():
            st.query.normal_(0, 2.0)
            st.key_gain.uniform_(0.5, 1.5)
        idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))

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
            got, _ = model(idx, idx)
        err = (got - want).abs().max().item()
        assert err < 1e-9, \
            f'the {label} model\'s logits differ from a loop with explicit RMS-normalised keys by up to {err:.3g}'
