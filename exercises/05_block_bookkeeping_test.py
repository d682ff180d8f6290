"""Exercise 5: Routed.write, the block bookkeeping of Block AttnRes and Delta Block. Graded by
`python exercises.py check 5`. Each test is a pair: compute_X(M, seed) runs the student's model.py (M) on inputs
made from the seed, in a child process, and returns the outputs; check_X(out, ref) runs in the grader, makes the
same inputs from ref.seed and checks the outputs. The expected sources are written out here from the papers: the
embedding, the sum of every finished block of S sublayers, and the partial sum of the current block."""

import torch

L, D = 3, 8  # 3 layers = 6 sublayers


def tiny(M, seed, **kw):
    """A tiny routed model in float64, with random queries so that the weights of different sources differ."""
    torch.manual_seed(seed)
    model = M.GPT(M.GPTConfig(block_size=4, vocab_size=32, n_layer=L, n_head=2, n_embd=D, **kw)).double().eval()
    with torch.no_grad():
        model.stream.query.normal_(0, 1.0)
    return model


def tensors(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def snapshots(stream, e, outs, keys=('blocks', 'partial')):
    """start(e), then write each output in turn; after each write, a copy of the state's entries keys, and
    whether the first source is still e itself (an identity that the grader cannot see in a copy)."""
    st, seen = stream.start(e), []
    for s, out in enumerate(outs):
        stream.write(st, s, out, None, None)
        seen.append({k: clone(st.get(k)) for k in keys} | {'first_is_e': st['blocks'][0] is e})
    return seen


def clone(x):
    """x as it is now: a later write may change a tensor of the state in place."""
    return [clone(v) for v in x] if isinstance(x, list) else x.clone() if torch.is_tensor(x) else x


def expected(e, outs, S):
    """The sources after the outputs outs: [e, finished block sums...] and the partial sum (None if empty)."""
    n = len(outs) // S * S
    blocks = [e] + [sum(outs[j:j + S]) for j in range(0, n, S)]
    return blocks, (sum(outs[n:]) if len(outs) > n else None)


def compare_sources(st, e, outs, S, what):
    blocks, partial = expected(e, outs, S)
    s = len(outs) - 1
    got_partial = st['partial']
    want_partial = 'no partial block' if partial is None else f'a partial block of {len(outs) % S} output(s)'
    found = 'no partial block' if got_partial is None else 'a partial block'
    assert len(st['blocks']) == len(blocks) and (got_partial is None) == (partial is None), \
        f'{what}: after writing sublayer {s} the finished sources should be e and {len(blocks) - 1} block ' \
        f'sum(s) of {S} outputs ({len(blocks)} in st["blocks"]), with {want_partial}; found ' \
        f'{len(st["blocks"])} in st["blocks"] and {found}'
    assert st['first_is_e'], f'{what}: the first source must stay the embedding e itself'
    for i, (got, want) in enumerate(zip(st['blocks'], blocks)):
        err = (got - want).abs().max().item()
        assert err < 1e-12, f'{what}: after writing sublayer {s}, source {i} should be the sum of outputs ' \
                            f'{(i - 1) * S}..{i * S - 1}; it is off by up to {err:.3g}'
    if partial is not None:
        err = (got_partial - partial).abs().max().item()
        assert err < 1e-12, f'{what}: after writing sublayer {s} the partial block should be the sum of outputs ' \
                            f'{len(outs) // S * S}..{s}; it is off by up to {err:.3g}'


def compare_all(seen, seed, S, what):
    """The sources after each of the 6 writes."""
    e, *outs = tensors(7, seed)
    for s in range(6):
        compare_sources(seen[s], e, outs[:s + 1], S, what)


def compute_full_form_makes_every_output_a_source(M, seed):
    """res_block=0 (S = 1): every output becomes a source of its own at once"""
    e, *outs = tensors(7, seed)
    return snapshots(tiny(M, seed, residual='attnres').stream, e, outs[:6])


def check_full_form_makes_every_output_a_source(seen, ref):
    compare_all(seen, ref.seed, 1, 'Full AttnRes')


def compute_blocks_of_two_and_of_four(M, seed):
    """res_block=S: finished blocks are sums of S outputs, the rest is the partial block"""
    e, *outs = tensors(7, seed)
    return [snapshots(tiny(M, seed, residual='attnres', res_block=S).stream, e, outs[:6]) for S in (2, 4)]


def check_blocks_of_two_and_of_four(seen, ref):
    for i, S in enumerate((2, 4)):
        compare_all(seen[i], ref.seed, S, f'res_block={S}')


def logits_of(v, W, eps=1e-6):
    """A source's logits against every read, (B, T, R): its RMS-normalised key against each query in W."""
    return (v @ W.t()) / torch.sqrt((v ** 2).mean(-1, keepdim=True) + eps)


def compute_every_source_has_its_logits(M, seed):
    """each source's logits (and the partial block's) are source_logits(source, st['W']), computed when it appears"""
    e, *outs = tensors(7, seed)
    stream = tiny(M, seed, residual='attnres', res_block=2).stream
    return snapshots(stream, e, outs[:5], keys=('blocks', 'logits', 'partial', 'partial_logits'))


def check_every_source_has_its_logits(seen, ref):
    stream = tiny(ref.model, ref.seed, residual='attnres', res_block=2).stream
    W = (stream.query * stream.key_gain).detach()  # what start puts in st['W']
    for s in range(5):
        st = seen[s]
        assert len(st['logits']) == len(st['blocks']), \
            f'after writing sublayer {s}: {len(st["blocks"])} sources but {len(st["logits"])} entries in ' \
            f'st["logits"]; every finished source needs its logits'
        for i, (v, lg) in enumerate(zip(st['blocks'], st['logits'])):
            err = (lg - logits_of(v, W)).abs().max().item()
            assert err < 1e-9, f'after writing sublayer {s}, st["logits"][{i}] should be ' \
                               f'source_logits(st["blocks"][{i}], st["W"]); it is off by up to {err:.3g}'
        if st['partial'] is not None:
            err = (st['partial_logits'] - logits_of(st['partial'], W)).abs().max().item()
            assert err < 1e-9, f'after writing sublayer {s}, st["partial_logits"] should be ' \
                               f'source_logits(st["partial"], st["W"]); it is off by up to {err:.3g}'


def compute_delta_keeps_the_standard_stream(M, seed):
    """Delta: x = e + sum of outputs, and the sources telescope to x (the embedding is never in a block)"""
    e, *outs = tensors(7, seed)
    stream = tiny(M, seed, residual='delta', res_block=2).stream
    return snapshots(stream, e, outs[:6], keys=('x', 'blocks', 'partial'))


def check_delta_keeps_the_standard_stream(seen, ref):
    e, *outs = tensors(7, ref.seed)
    for s in range(6):
        st = seen[s]
        err = (st['x'] - (e + sum(outs[:s + 1]))).abs().max().item()
        assert err < 1e-12, f'Delta: after writing sublayer {s}, x should be e + out_0 + ... + out_{s}; it is off ' \
                            f'by up to {err:.3g} (Delta keeps the standard stream x <- x + out)'
        total = sum(st['blocks']) + (st['partial'] if st['partial'] is not None else 0)
        err = (total - st['x']).abs().max().item()
        assert err < 1e-12, f'Delta: after writing sublayer {s} the sources should sum to x; off by up to {err:.3g}'


def compute_block_sums_are_kept_in_float32(M, seed):
    """bfloat16 outputs are summed into a float32 partial block"""
    e, *outs = tensors(4, seed, dtype=torch.bfloat16)
    return snapshots(tiny(M, seed, residual='attnres', res_block=4).stream, e.float(), outs[:3])


def check_block_sums_are_kept_in_float32(seen, ref):
    e, *outs = tensors(4, ref.seed, dtype=torch.bfloat16)
    for s in (1, 2):
        partial = seen[s]['partial']
        assert partial.dtype == torch.float32, \
            f'after {s + 1} bfloat16 outputs the partial block should be float32 (wide(partial) + out), ' \
            f'so it does not round at every step; it is {partial.dtype}'
        err = (partial - sum(o.float() for o in outs[:s + 1])).abs().max().item()
        assert err < 1e-6, f'the float32 partial block is off by {err:.3g} from the float32 sum of the outputs'


BLOCK_MODELS = (('Block AttnRes (res_block=2)', dict(residual='attnres', res_block=2)),
                ('Delta Block (res_block=4)', dict(residual='delta', res_block=4)))


def tokens(seed):
    return torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(seed + 1))


def same_weights(weights, model):
    """The student's model, built from the same seed, has the weights of the grader's, which the loop uses."""
    for name, p in model.state_dict().items():
        w = weights.get(name)
        assert torch.is_tensor(w) and w.shape == p.shape and torch.equal(w, p), \
            f'{name} is not what model.py makes from the same seed: the tests need GPT.__init__ and the ' \
            f'init of every module as they were handed out'


def compute_block_models_match_loops_over_sublayers(M, seed):
    """Block AttnRes and Delta Block models match loops written from the papers; res_block=1 is Full AttnRes"""
    idx, out = tokens(seed), {}
    with torch.no_grad():
        for label, kw in BLOCK_MODELS:
            model = tiny(M, seed, **kw)
            out[label] = model.state_dict(), model(idx, idx)[0]
        full, one = tiny(M, seed, residual='attnres'), tiny(M, seed, residual='attnres', res_block=1)
        out['full'], out['one'] = full(idx, idx)[0], one(idx, idx)[0]
    return out


def check_block_models_match_loops_over_sublayers(out, ref):
    idx = tokens(ref.seed)
    for label, kw in BLOCK_MODELS:
        weights, got = out[label]
        model = tiny(ref.model, ref.seed, **kw)
        same_weights(weights, model)
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
        err = (got - want).abs().max().item()
        assert err < 1e-9, f'the {label} model\'s logits differ from the paper\'s loop by up to {err:.3g}'
    err = (out['full'] - out['one']).abs().max().item()
    assert err == 0, f'res_block=1 (every block one sublayer) should be exactly Full AttnRes; differs by {err:.3g}'
