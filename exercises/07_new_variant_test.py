"""Exercise 7 (open-ended): a new residual variant behind the start/read/write/final interface. Graded by
`python exercises.py check 7`; pytest runs it too. The tests find the variant as the name in model.RESIDUALS
that is not one of the four built in, check the interface and a short training run, and that compare.py and a
written comparison know about it. What the comparison says is for the instructor to read."""

import ast
import math
import os
import re

import torch

import model as M

BUILT_IN = ('standard', 'ddl', 'attnres', 'delta')
VOCAB, T = 64, 16


def new_variant():
    """The one name in RESIDUALS that is not built in."""
    new = [r for r in M.RESIDUALS if r not in BUILT_IN]
    assert len(new) == 1, \
        f'model.RESIDUALS should hold the four built-in variants and exactly one of yours; it holds ' \
        f'{M.RESIDUALS}. Add your variant\'s name to RESIDUALS and build its module in GPT.__init__'
    return new[0]


def tiny(name, seed=0, n_layer=2, n_embd=32):
    torch.manual_seed(seed)
    return M.GPT(M.GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=n_embd, residual=name))


def tokens(B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=3):
    """Move the variant's own parameters away from their init, where some gradients can be zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith('stream.'):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_the_variant_is_its_own_module():
    """a new name in RESIDUALS builds its own stream module with start/read/write/final"""
    name = new_variant()
    model = tiny(name)
    built_in = tuple(c for c in (getattr(M, n, None) for n in ('Standard', 'DeepDelta', 'Routed')) if c)
    assert type(model.stream) not in built_in, \
        f'residual={name!r} builds a {type(model.stream).__name__}, one of the built-in streams: write a module ' \
        f'of your own (it may subclass one) and build it in GPT.__init__'
    missing = [m for m in ('start', 'read', 'write', 'final') if not callable(getattr(model.stream, m, None))]
    assert not missing, f'your stream module lacks {", ".join(missing)}'


def test_shapes_loss_at_init_and_generation():
    """logits (B, T, vocab), a loss near ln(vocab) at init, and generation past block_size"""
    model = tiny(new_variant()).eval()
    logits, loss = model(tokens(), tokens(seed=2))
    assert logits.shape == (2, T, VOCAB) and torch.isfinite(logits).all(), \
        f'logits should be finite, of shape {(2, T, VOCAB)}; got {tuple(logits.shape)}'
    assert abs(loss.item() - math.log(VOCAB)) < 0.5, \
        f'at init the loss should be near ln({VOCAB}) = {math.log(VOCAB):.3f} (near-uniform predictions); it is ' \
        f'{loss.item():.3f}: does the stream blow up or shrink the embedding at init?'
    out = model.generate(tokens()[:, :4], max_new_tokens=T + 2, top_k=5)
    assert out.shape == (2, T + 6), f'generate returned {tuple(out.shape)}, expected {(2, T + 6)}'


def test_the_variant_is_causal():
    """changing future tokens does not change the logits of earlier ones"""
    model = tiny(new_variant()).eval()
    perturb(model)
    idx = tokens()
    idx2 = idx.clone()
    idx2[:, 9:] = (idx2[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx, idx)[0], model(idx2, idx2)[0]
    err = (a[:, :9] - b[:, :9]).abs().max().item()
    assert err < 1e-5, f'changing tokens 9.. changed the logits of tokens 0..8 by up to {err:.3g}: the stream ' \
                       f'must not mix information across positions'


def test_gradients_reach_every_parameter():
    """after a small perturbation, backward reaches every parameter of the model"""
    model = tiny(new_variant())
    perturb(model)
    model(tokens(), tokens(seed=2))[1].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert not dead, f'no (or a non-finite) gradient reached: {", ".join(dead[:6])}'


def train(name, steps=60):
    """A short run: AdamW on one fixed batch of a simple sequence rule; returns (first loss, last loss)."""
    model = tiny(name, seed=0)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (8, 1), generator=g)
    seq = (start + 7 * torch.arange(T + 1)) % VOCAB  # token t+1 = token t + 7: learnable from one token
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_a_short_training_run_learns():
    """60 steps on a simple rule: the loss falls, and ends within 0.5 of the standard stream's"""
    name = new_variant()
    first, last = train(name)
    _, standard = train('standard')
    assert math.isfinite(last) and last < 0.5 * first, \
        f'{name}: the loss went from {first:.3f} to {last:.3f} in 60 steps; it should at least halve ' \
        f'(the standard stream reaches {standard:.3f})'
    assert last < standard + 0.5, \
        f'{name} ends at loss {last:.3f} after 60 steps, the standard stream at {standard:.3f}: more than 0.5 worse'


def config_value(path, key):
    """The value of `key = ...` in a config file, or None."""
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == key for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def test_compare_py_runs_the_variant():
    """compare.py lists the variant and configs/compare_<name>.py selects it"""
    name = new_variant()
    path = os.path.join('configs', f'compare_{name}.py')
    assert os.path.isfile(path), f'{path} not found: copy configs/compare_delta.py and set residual = {name!r}'
    assert config_value(path, 'residual') == name, f'{path} should set residual = {name!r}'
    import compare
    assert name in compare.RUNS, f'compare.RUNS should include {name!r}, so that compare.py trains it'


def test_a_written_comparison():
    """comparison.md: at least 150 words, naming the variant and giving numbers"""
    name = new_variant()
    assert os.path.isfile('comparison.md'), \
        'comparison.md not found: write your comparison with the other variants there (next to model.py)'
    text = open('comparison.md', encoding='utf-8').read()
    words = len(text.split())
    assert words >= 150, f'comparison.md has {words} words; write at least 150'
    assert name in text, f'comparison.md should name your variant ({name!r})'
    assert re.search(r'\d\.\d', text), 'comparison.md should report numbers (val losses from compare.py)'
