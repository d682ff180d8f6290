"""Exercise 7 (open-ended): a new residual variant behind the start/read/write/final interface. Graded by
`python exercises.py check 7`. Each test is a pair: compute_X(M, seed) runs the student's model.py (M) in a child
process and returns the outputs; check_X(out, ref) runs in the grader and checks them. The tests find the variant
as the name in model.RESIDUALS that is not one of the four built in, check the interface and a short training
run, and that compare.py and a written comparison know about it. What the comparison says is for the instructor
to read.

A new variant has no reference to hold its outputs to, so most of what the child sends here is its word: a
child that lies can claim the interface, causality, gradients, its training run and compare.RUNS. What the
grader checks by itself: the loss at init (from the logits), the standard stream's loss after the same training
run (trained here), that model.py names the variant, its config file, and comparison.md."""

import ast
import math
import os
import re

import torch
from torch.nn import functional as F

BUILT_IN = ('standard', 'ddl', 'attnres', 'delta')
VOCAB, T = 64, 16


def new_variant(M):
    """The one name in RESIDUALS that is not built in."""
    new = [r for r in M.RESIDUALS if r not in BUILT_IN]
    assert len(new) == 1, \
        f'model.RESIDUALS should hold the four built-in variants and exactly one of yours; it holds ' \
        f'{M.RESIDUALS}. Add your variant\'s name to RESIDUALS and build its module in GPT.__init__'
    return new[0]


def named_in_model_py(name, ref):
    """In the grader: the child's name for the variant, which must be written in the submission's model.py (and
    names files there, so it may hold letters, digits and _ only)."""
    assert isinstance(name, str) and re.fullmatch(r'\w+', name), f'{name!r} is not a variant name'
    with open(os.path.join(ref.dir, 'model.py'), encoding='utf-8', errors='replace') as f:
        text = f.read()
    assert f"'{name}'" in text or f'"{name}"' in text, f'model.py does not name the variant {name!r}'
    return name


def tiny(M, name, seed, n_layer=2, n_embd=32):
    torch.manual_seed(seed)
    return M.GPT(M.GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=n_embd,
                             residual=name))


def tokens(seed, B=2):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed):
    """Move the variant's own parameters away from their init, where some gradients can be zero."""
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith('stream.'):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def compute_the_variant_is_its_own_module(M, seed):
    """a new name in RESIDUALS builds its own stream module with start/read/write/final"""
    name = new_variant(M)
    stream = tiny(M, name, seed).stream
    built_in = tuple(c for c in (getattr(M, n, None) for n in ('Standard', 'DeepDelta', 'Routed')) if c)
    missing = [m for m in ('start', 'read', 'write', 'final') if not callable(getattr(stream, m, None))]
    return name, type(stream).__name__, type(stream) in built_in, missing


def check_the_variant_is_its_own_module(out, ref):
    name, kind, built_in, missing = out
    named_in_model_py(name, ref)
    assert not built_in, \
        f'residual={name!r} builds a {kind}, one of the built-in streams: write a module of your own (it may ' \
        f'subclass one) and build it in GPT.__init__'
    assert not missing, f'your stream module lacks {", ".join(missing)}'


def compute_shapes_loss_at_init_and_generation(M, seed):
    """logits (B, T, vocab), a loss near ln(vocab) at init, and generation past block_size"""
    model = tiny(M, new_variant(M), seed).eval()
    with torch.no_grad():
        logits, _ = model(tokens(seed + 1), tokens(seed + 2))
    return logits, model.generate(tokens(seed + 1)[:, :4], max_new_tokens=T + 2, top_k=5)


def check_shapes_loss_at_init_and_generation(out, ref):
    logits, generated = out
    assert logits.shape == (2, T, VOCAB) and torch.isfinite(logits).all(), \
        f'logits should be finite, of shape {(2, T, VOCAB)}; got {tuple(logits.shape)}'
    loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens(ref.seed + 2).view(-1)).item()
    assert abs(loss - math.log(VOCAB)) < 0.5, \
        f'at init the loss should be near ln({VOCAB}) = {math.log(VOCAB):.3f} (near-uniform predictions); it is ' \
        f'{loss:.3f}: does the stream blow up or shrink the embedding at init?'
    assert generated.shape == (2, T + 6), f'generate returned {tuple(generated.shape)}, expected {(2, T + 6)}'


def compute_the_variant_is_causal(M, seed):
    """changing future tokens does not change the logits of earlier ones"""
    model = tiny(M, new_variant(M), seed).eval()
    perturb(model, seed)
    idx = tokens(seed + 1)
    idx2 = idx.clone()
    idx2[:, 9:] = (idx2[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        return model(idx, idx)[0][:, :9], model(idx2, idx2)[0][:, :9]


def check_the_variant_is_causal(out, ref):
    a, b = out
    err = (a - b).abs().max().item()
    assert err < 1e-5, f'changing tokens 9.. changed the logits of tokens 0..8 by up to {err:.3g}: the stream ' \
                       f'must not mix information across positions'


def compute_gradients_reach_every_parameter(M, seed):
    """after a small perturbation, backward reaches every parameter of the model"""
    model = tiny(M, new_variant(M), seed)
    perturb(model, seed)
    model(tokens(seed + 1), tokens(seed + 2))[1].backward()
    return [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]


def check_gradients_reach_every_parameter(dead, ref):
    assert not dead, f'no (or a non-finite) gradient reached: {", ".join(dead[:6])}'


def train(M, name, seed, steps=60):
    """A short run: AdamW on one fixed batch of a simple sequence rule; returns (first loss, last loss)."""
    model = tiny(M, name, seed)
    g = torch.Generator().manual_seed(seed)
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


def compute_a_short_training_run_learns(M, seed):
    """60 steps on a simple rule: the loss falls, and ends within 0.5 of the standard stream's"""
    name = new_variant(M)
    return name, *train(M, name, seed)


def check_a_short_training_run_learns(out, ref):
    name, first, last = out
    _, standard = train(ref.model, 'standard', ref.seed)  # the reference run, here: it is not the child's word
    assert math.isfinite(last) and last < 0.5 * first, \
        f'{name}: the loss went from {first:.3f} to {last:.3f} in 60 steps; it should at least halve ' \
        f'(the standard stream reaches {standard:.3f})'
    assert last < standard + 0.5, \
        f'{name} ends at loss {last:.3f} after 60 steps, the standard stream at {standard:.3f}: more than 0.5 worse'


def variant_entry(path, name):
    """The fields of VARIANTS[name] in cli.py, read by the grader with ast (never run): {} if there is none."""
    with open(path, encoding='utf-8', errors='replace') as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'VARIANTS' for t in node.targets) \
                    and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and k.value == name and isinstance(v, ast.Call):
                        return {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords}
    return {}


def compute_compare_py_runs_the_variant(M, seed):
    """cli.VARIANTS names the variant, so that compare.py and bench.py run it"""
    name = new_variant(M)
    import cli
    import compare
    return name, list(compare.RUNS), dict(cli.VARIANTS.get(name) or {})


def check_compare_py_runs_the_variant(out, ref):
    name, runs, _ = out
    name = named_in_model_py(name, ref)
    fields = variant_entry(os.path.join(ref.dir, 'cli.py'), name)  # the grader's own reading of the file
    assert fields.get('residual') == name, \
        f"cli.VARIANTS should have the entry '{name}': dict(residual='{name}'), got {fields or 'none'}"
    assert name in runs, f'compare.RUNS should include {name!r}, so that compare.py trains it'


def compute_a_written_comparison(M, seed):
    """comparison.md: at least 150 words, naming the variant and giving numbers"""
    return new_variant(M)


def check_a_written_comparison(name, ref):
    name = named_in_model_py(name, ref)
    path = os.path.join(ref.dir, 'comparison.md')
    assert os.path.isfile(path), \
        'comparison.md not found: write your comparison with the other variants there (next to model.py)'
    with open(path, encoding='utf-8', errors='replace') as f:
        text = f.read()
    words = len(text.split())
    assert words >= 150, f'comparison.md has {words} words; write at least 150'
    assert name in text, f'comparison.md should name your variant ({name!r})'
    assert re.search(r'\d\.\d', text), 'comparison.md should report numbers (val losses from compare.py)'
