"""Exercise 3: the standard residual stream as a start/read/write/final module. Graded by
`python exercises.py check 3`. Each test is a pair: compute_X(M, seed) runs the student's model.py (M) on inputs
made from the seed, in a child process, and returns the outputs; check_X(out, ref) runs in the grader, makes the
same inputs from ref.seed and checks the outputs."""

import torch


def tensors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, generator=g, dtype=torch.float64) for _ in range(n)]


def drive(stream, e, outs):
    """start, then read/write per sublayer; returns what each sublayer read and the final value."""
    st, reads = stream.start(e), []
    for s, out in enumerate(outs):
        reads.append(stream.read(st, s))
        stream.write(st, s, out, reads[-1], None)
    return reads, stream.final(st)


def compute_start_returns_the_state_as_a_dict(M, seed):
    """start(e) returns the state as a dict, like every variant"""
    return M.Standard().start(tensors(1, seed)[0])


def check_start_returns_the_state_as_a_dict(st, ref):
    assert isinstance(st, dict), \
        f'start(e) should return the state as a dict (the model passes it to read/write/final); it returned ' \
        f'{type(st).__name__}'


def compute_the_first_sublayer_reads_the_embedding(M, seed):
    """sublayer 0 reads e"""
    stream = M.Standard()
    return stream.read(stream.start(tensors(1, seed)[0]), 0)


def check_the_first_sublayer_reads_the_embedding(h, ref):
    e = tensors(1, ref.seed)[0]
    assert torch.is_tensor(h) and h.shape == e.shape and torch.equal(h, e), \
        'read(start(e), 0) should be e itself: before any sublayer has written, the stream is the embedding'


def compute_each_sublayer_reads_the_running_sum(M, seed):
    """sublayer s reads e + out_0 + ... + out_{s-1}"""
    e, *outs = tensors(5, seed)
    return drive(M.Standard(), e, outs)[0]


def check_each_sublayer_reads_the_running_sum(reads, ref):
    e, *outs = tensors(5, ref.seed)
    for s in range(len(outs)):
        h, want = reads[s], e + sum(outs[:s])
        err = (h - want).abs().max().item()
        assert err < 1e-12, f'sublayer {s} should read e plus the first {s} output(s), the running sum; it is ' \
                            f'off by up to {err:.3g}'


def compute_final_is_the_embedding_plus_every_output(M, seed):
    """final(st) = e + sum of all outputs (what goes into ln_f)"""
    e, *outs = tensors(5, seed)
    return drive(M.Standard(), e, outs)[1]


def check_final_is_the_embedding_plus_every_output(final, ref):
    e, *outs = tensors(5, ref.seed)
    err = (final - (e + sum(outs))).abs().max().item()
    assert err < 1e-12, f'final should be e + out_0 + ... + out_3; it is off by up to {err:.3g}'


def compute_write_does_not_change_its_inputs_in_place(M, seed):
    """write builds a new tensor: e and the outputs are not modified (autograd needs them)"""
    e, *outs = tensors(3, seed)
    drive(M.Standard(), e, outs)
    return [e] + outs


def check_write_does_not_change_its_inputs_in_place(after, ref):
    for i, (name, k) in enumerate(zip(['e', 'out_0', 'out_1'], tensors(3, ref.seed))):
        assert torch.equal(after[i], k), f'{name} was changed in place: write st["x"] = st["x"] + out, not +='


def standard_model(M, seed):
    """A standard GPT in float64; and its tokens."""
    torch.manual_seed(seed)
    model = M.GPT(M.GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).double()
    return model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed + 1))


def same_weights(weights, model):
    """The student's model, built from the same seed, has the weights of the grader's, which the loop uses."""
    for name, p in model.state_dict().items():
        w = weights.get(name)
        assert torch.is_tensor(w) and w.shape == p.shape and torch.equal(w, p), \
            f'{name} is not what model.py makes from the same seed: the tests need GPT.__init__ and the ' \
            f'init of every module as they were handed out'


def compute_gpt2_model_matches_a_plain_loop(M, seed):
    """a whole standard GPT matches x = x + F(ln(x)), written as a loop, and trains"""
    model, idx = standard_model(M, seed)
    with torch.no_grad():
        weights, logits = model.state_dict(), model(idx, idx)[0]
    model(idx, idx)[1].backward()
    return weights, logits, [n for n, p in model.named_parameters() if p.grad is None]


def check_gpt2_model_matches_a_plain_loop(result, ref):
    weights, got, no_grad = result
    model, idx = standard_model(ref.model, ref.seed)
    same_weights(weights, model)
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8))
        for norm, f in model.sublayers():
            x = x + f(norm(x))
        want = model.lm_head(model.transformer.ln_f(x))
    err = (got - want).abs().max().item()
    assert err < 1e-10, f'the standard model\'s logits differ from the GPT-2 loop by up to {err:.3g}'
    assert not no_grad, f'backward did not reach every parameter: {", ".join(no_grad[:6])}'
