"""Exercise 5: Routed.write, the block bookkeeping of Block AttnRes and Delta Block. Graded by
`python exercises.py check 5`; pytest runs it too. The expected sources are written out here from the papers:
the embedding, the sum of every finished block of S sublayers, and the partial sum of the current block."""

import torch

from model import GPT, GPTConfig, source_logits

L, D = 3, 8  # 3 layers = 6 sublayers


def tiny(**kw):
    """A tiny routed model in float64, with random queries so that the weights of different sources differ."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D, **kw)).double().eval()
    with torch.no_grad():
        model.stream.query.normal_(0, 1.0)
    return model


def stream(**kw):
    return tiny(**kw).stream


def tensors(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def writes(st_module, e, outs):
    """start(e), then write each output in turn; yields (s, state) after each write."""
    st = st_module.start(e)
    for s, out in enumerate(outs):
        st_module.write(st, s, out, None, None)
        yield s, st


def expected(e, outs, S):
    """The sources after the outputs outs: [e, finished block sums...] and the partial sum (None if empty)."""
    n = len(outs) // S * S
    blocks = [e] + [sum(outs[j:j + S]) for j in range(0, n, S)]
    return blocks, (sum(outs[n:]) if len(outs) > n else None)


def compare_sources(st, e, outs, S, what):
    blocks, partial = expected(e, outs, S)
    s = len(outs) - 1
    got_partial = st.get('partial')
    want_partial = 'no partial block' if partial is None else f'a partial block of {len(outs) % S} output(s)'
    found = 'no partial block' if got_partial is None else 'a partial block'
    assert len(st['blocks']) == len(blocks) and (got_partial is None) == (partial is None), \
        f'{what}: after writing sublayer {s} the finished sources should be e and {len(blocks) - 1} block ' \
        f'sum(s) of {S} outputs ({len(blocks)} in st["blocks"]), with {want_partial}; found ' \
        f'{len(st["blocks"])} in st["blocks"] and {found}'
    assert st['blocks'][0] is e, f'{what}: the first source must stay the embedding e itself'
    for i, (got, want) in enumerate(zip(st['blocks'], blocks)):
        err = (got - want).abs().max().item()
        assert err < 1e-12, f'{what}: after writing sublayer {s}, source {i} should be the sum of outputs ' \
                            f'{(i - 1) * S}..{i * S - 1}; it is off by up to {err:.3g}'
    if partial is not None:
        err = (got_partial - partial).abs().max().item()
        assert err < 1e-12, f'{what}: after writing sublayer {s} the partial block should be the sum of outputs ' \
                            f'{len(outs) // S * S}..{s}; it is off by up to {err:.3g}'


def test_full_form_makes_every_output_a_source():
    """res_block=0 (S = 1): every output becomes a source of its own at once"""
    st_module = stream(residual='attnres')
    e, *outs = tensors(7)
    for s, st in writes(st_module, e, outs[:6]):
        compare_sources(st, e, outs[:s + 1], 1, 'Full AttnRes')


def test_blocks_of_two_and_of_four():
    """res_block=S: finished blocks are sums of S outputs, the rest is the partial block"""
    for S in (2, 4):
        st_module = stream(residual='attnres', res_block=S)
        e, *outs = tensors(7)
        for s, st in writes(st_module, e, outs[:6]):
            compare_sources(st, e, outs[:s + 1], S, f'res_block={S}')


def test_every_source_has_its_logits():
    """each source's logits (and the partial block's) are source_logits(source, st['W']), computed when it appears"""
    st_module = stream(residual='attnres', res_block=2)
    e, *outs = tensors(7)
    for s, st in writes(st_module, e, outs[:5]):
        assert len(st['logits']) == len(st['blocks']), \
            f'after writing sublayer {s}: {len(st["blocks"])} sources but {len(st["logits"])} entries in ' \
            f'st["logits"]; every finished source needs its logits'
        for i, (v, lg) in enumerate(zip(st['blocks'], st['logits'])):
            err = (lg - source_logits(v, st['W'])).abs().max().item()
            assert err < 1e-9, f'after writing sublayer {s}, st["logits"][{i}] should be ' \
                               f'source_logits(st["blocks"][{i}], st["W"]); it is off by up to {err:.3g}'
        if st.get('partial') is not None:
            err = (st['partial_logits'] - source_logits(st['partial'], st['W'])).abs().max().item()
            assert err < 1e-9, f'after writing sublayer {s}, st["partial_logits"] should be ' \
                               f'source_logits(st["partial"], st["W"]); it is off by up to {err:.3g}'


def test_delta_keeps_the_standard_stream():
    """Delta: x = e + sum of outputs, and the sources telescope to x (the embedding is never in a block)"""
    st_module = stream(residual='delta', res_block=2)
    e, *outs = tensors(7)
    for s, st in writes(st_module, e, outs[:6]):
        err = (st['x'] - (e + sum(outs[:s + 1]))).abs().max().item()
        assert err < 1e-12, f'Delta: after writing sublayer {s}, x should be e + out_0 + ... + out_{s}; it is off ' \
                            f'by up to {err:.3g} (Delta keeps the standard stream x <- x + out)'
        total = sum(st['blocks']) + (st['partial'] if st.get('partial') is not None else 0)
        err = (total - st['x']).abs().max().item()
        assert err < 1e-12, f'Delta: after writing sublayer {s} the sources should sum to x; off by up to {err:.3g}'


def test_block_sums_are_kept_in_float32():
    """bfloat16 outputs are summed into a float32 partial block"""
    st_module = stream(residual='attnres', res_block=4)
    e, *outs = tensors(4, dtype=torch.bfloat16)
    for s, st in writes(st_module, e.float(), outs[:3]):
        if s >= 1:
            want = sum(o.float() for o in outs[:s + 1])
            assert st['partial'].dtype == torch.float32, \
                f'after {s + 1} bfloat16 outputs the partial block should be float32 (wide(partial) + out), ' \
                f'so it does not round at every step; it is {st["partial"].dtype}'
            err = (st['partial'] - want).abs().max().item()
            assert err < 1e-6, f'the float32 partial block is off by {err:.3g} from the float32 sum of the outputs'


def test_block_models_match_loops_over_sublayers():
    """Block AttnRes and Delta Block models match loops written from the papers; res_block=1 is Full AttnRes"""
    idx = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(1))
    for label, kw in (('Block AttnRes (res_block=2)', dict(residual='attnres', res_block=2)),
                      ('Delta Block (res_block=4)', dict(residual='delta', res_block=4))):
        model = tiny(**kw)
        S = kw['res_block']

        def route(srcs, r):
            V = torch.stack(srcs)
            K = V / torch.sqrt((V ** 2).mean(-1, keepdim=True) + 1e-6) * model.stream.key_gain[r]
            a = torch.softmax(torch.einsum('d,nbtd->nbt', model.stream.query[r], K), dim=0)
            return torch.einsum('nbt,nbtd->btd', a, V)

        with torch.no_grad():
            e = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(4))
            x, outs = e, []
            for s, (norm, f) in enumerate(model.sublayers()):
                blocks, partial = expected(e, outs, S)
                srcs = blocks + ([partial] if partial is not None else [])
                if kw['residual'] == 'attnres':
                    h = route(srcs, s)
                else:
                    h = x if s == 0 else x + route(srcs, s - 1)
                outs.append(f(norm(h)))
                x = x + outs[-1]
            if kw['residual'] == 'attnres':
                blocks, partial = expected(e, outs, S)
                x = route(blocks + ([partial] if partial is not None else []), 2 * L)
            want = model.lm_head(model.transformer.ln_f(x))
            got, _ = model(idx, idx)
        err = (got - want).abs().max().item()
        assert err < 1e-9, f'the {label} model\'s logits differ from the paper\'s loop by up to {err:.3g}'
    full, one = tiny(residual='attnres'), tiny(residual='attnres', res_block=1)
    with torch.no_grad():
        err = (full(idx, idx)[0] - one(idx, idx)[0]).abs().max().item()
    assert err == 0, f'res_block=1 (every block one sublayer) should be exactly Full AttnRes; differs by {err:.3g}'

