"""Exercise 3: the standard residual stream as a start/read/write/final module. Graded by
`python exercises.py check 3`; pytest runs it too."""

import torch

from model import GPT, GPTConfig, Standard


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, generator=g, dtype=torch.float64) for _ in range(n)]


def drive(stream, e, outs):
    """start, then read/write per sublayer; returns what each sublayer read and the final value."""
    st, reads = stream.start(e), []
    for s, out in enumerate(outs):
        reads.append(stream.read(st, s))
        stream.write(st, s, out, reads[-1], None)
    return reads, stream.final(st)


def test_start_returns_the_state_as_a_dict():
    """start(e) returns the state as a dict, like every variant"""
    st = Standard().start(tensors(1)[0])
    assert isinstance(st, dict), \
        f'start(e) should return the state as a dict (the model passes it to read/write/final); it returned ' \
        f'{type(st).__name__}'


def test_the_first_sublayer_reads_the_embedding():
    """sublayer 0 reads e"""
    e = tensors(1)[0]
    stream = Standard()
    h = stream.read(stream.start(e), 0)
    assert torch.is_tensor(h) and h.shape == e.shape and torch.equal(h, e), \
        'read(start(e), 0) should be e itself: before any sublayer has written, the stream is the embedding'


def test_each_sublayer_reads_the_running_sum():
    """sublayer s reads e + out_0 + ... + out_{s-1}"""
    e, *outs = tensors(5)
    reads, _ = drive(Standard(), e, outs)
    for s, h in enumerate(reads):
        want = e + sum(outs[:s])
        err = (h - want).abs().max().item()
        assert err < 1e-12, f'sublayer {s} should read e plus the first {s} output(s), the running sum; it is ' \
                            f'off by up to {err:.3g}'


def test_final_is_the_embedding_plus_every_output():
    """final(st) = e + sum of all outputs (what goes into ln_f)"""
    e, *outs = tensors(5)
    _, final = drive(Standard(), e, outs)
    err = (final - (e + sum(outs))).abs().max().item()
    assert err < 1e-12, f'final should be e + out_0 + ... + out_3; it is off by up to {err:.3g}'


def test_write_does_not_change_its_inputs_in_place():
    """write builds a new tensor: e and the outputs are not modified (autograd needs them)"""
    e, *outs = tensors(3)
    kept = [t.clone() for t in [e] + outs]
    drive(Standard(), e, outs)
    for name, t, k in zip(['e', 'out_0', 'out_1'], [e] + outs, kept):
        assert torch.equal(t, k), f'{name} was changed in place: write st["x"] = st["x"] + out, not +='


def test_gpt2_model_matches_a_plain_loop():
    """a whole standard GPT matches x = x + F(ln(x)), written as a loop, and trains"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).double()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8))
        for norm, f in model.sublayers():
            x = x + f(norm(x))
        want = model.lm_head(model.transformer.ln_f(x))
        got, _ = model(idx, idx)
    err = (got - want).abs().max().item()
    assert err < 1e-10, f'the standard model\'s logits differ from the GPT-2 loop by up to {err:.3g}'
    model(idx, idx)[1].backward()
    assert all(p.grad is not None for p in model.parameters()), 'backward did not reach every parameter'
