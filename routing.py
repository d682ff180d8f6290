"""
What the routing of AttnRes and Delta AttnRes does, measured on a model: the softmax weights of
every routed read, and the importance of each source to each read, measured by removing it.

  weights(model, idx)          (R, S, B, T): R reads, S sources; zero where a source is not visible
  labels(model)                the names of the reads (rows) and the sources (columns)
  stats(w)                     per read: the mean largest weight and the mean entropy
  importance(model, batches)   per (read, source): the rise in loss when the source is removed

A weight is not an importance: a source can carry a large weight and little information the read
needs (or a small weight on a large vector), so the two can disagree (arXiv:2606.13168).
importance() removes a source from one read by setting its logit to -inf, which zeroes its weight
and renormalises the others exactly, and measures the loss on the same tokens; for Delta it also
removes a read's whole routed term (h = x). Everything here runs the plain code of model.py through
Routed.probe, eagerly (`sample.py --ablate=True`).
"""
import torch

from model import Routed


def routed(model):
    """The model's Routed stream, or None for the variants that do not route (standard, ddl)."""
    return model.stream if isinstance(model.stream, Routed) else None


def labels(model):
    """Names of the reads (rows) and the sources (columns) of weights(), for tables and pictures."""
    stream = routed(model)
    L2, S, additive = 2 * model.config.n_layer, stream.S, stream.additive
    name = lambda s: f'L{s // 2}.{"attn" if s % 2 == 0 else "mlp"}'
    dests = ([name(s) for s in range(1, L2)] if additive
             else [name(s) for s in range(L2)] + ['final'])
    nb = (L2 - 1 if additive else L2) // S  # blocks finished before the last read
    srcs = ([name(s) for s in range(nb)] if S == 1
            else [f'blk{b + 1}' for b in range(nb)] + ['partial'])
    return dests, ['emb'] + srcs


def column(k, nb, n_cols):
    """The column of weights() for entry k of a read's logits, when nb sources are finished: the
    finished ones in order, the partial block (entry nb, block forms only) in the last column."""
    return k if k < nb else n_cols - 1


class probing:
    """A context in which fn(r, logits, nb) sees (and may replace) every read's logits
    (Routed.probe)."""

    def __init__(self, model, fn):
        self.stream, self.fn = routed(model), fn

    def __enter__(self):
        self.stream.probe = self.fn

    def __exit__(self, *exc):
        self.stream.probe = None


@torch.no_grad()
def weights(model, idx):
    """The softmax weights of every routed read for the tokens idx (B, T), from the same forward
    code, as a (R, S, B, T) tensor on the CPU, zero where a source is not visible to a read. None if
    nothing is routed."""
    if routed(model) is None:
        return None
    record = []

    def keep(r, logits, nb):
        # (n, B, T), as depth_route does
        record.append((torch.stack(logits).float().softmax(0).cpu(), nb))
        return logits
    with probing(model, keep):
        model.forward(idx)  # forward, not __call__: eager even after model.compile()
    n_cols = len(labels(model)[1])
    w = torch.zeros(len(record), n_cols, *idx.shape)
    for r, (a, nb) in enumerate(record):
        for k in range(a.size(0)):
            w[r, column(k, nb, n_cols)] = a[k]
    return w


def stats(w):
    """Per read: the mean over tokens of the largest routing weight and of the entropy (nats).
    w: (R, S, B, T) from weights(). Returns two (R,) tensors."""
    ent = -(w * torch.log(w.clamp_min(1e-12))).sum(1)  # (R, B, T); zero-padded sources contribute 0
    return w.max(1).values.mean((1, 2)), ent.mean((1, 2))


@torch.no_grad()
def mean_loss(model, batches):
    """The mean next-token loss over batches [(x, y)], weighted by tokens."""
    total = count = 0
    for x, y in batches:
        total += model(x, y)[1].item() * y.numel()  # the model's loss is the mean over y's tokens
        count += y.numel()
    return total / count


@torch.no_grad()
def importance(model, batches):
    """How much each source matters to each read: dict(loss=the loss as it is, drop=(R, S) the rise
    in loss when the source is removed from the read (NaN where it is not visible, or is the read's
    only source), term=(R,) the rise when a Delta read's whole routed term is removed, None for
    AttnRes). One forward pass over batches per (read, source) pair: 325 at 12 layers, full form."""
    stream, n_cols = routed(model), len(labels(model)[1])
    base = mean_loss(model, batches)
    visible = []  # the columns that each read sees, in the order of its logits

    def see(r, logits, nb):
        visible.append([column(k, nb, n_cols) for k in range(len(logits))])
        return logits
    with probing(model, see):
        model(batches[0][0][:1, :1])
    drop = torch.full((len(visible), n_cols), float('nan'))
    for r, cols in enumerate(visible):
        for j in cols if len(cols) > 1 else []:

            def remove(read, logits, nb):
                if read == r:  # weight 0 for source j, and the softmax renormalises the others
                    k = cols.index(j)
                    logits = (logits[:k] + [torch.full_like(logits[k], -float('inf'))]
                              + logits[k + 1:])
                return logits
            with probing(model, remove):
                drop[r, j] = mean_loss(model, batches) - base
    term = None
    # Delta: h = x + mix; without the term, read r + 1 (sublayer r + 1) reads x alone
    if stream.additive:
        term = torch.zeros(len(visible))
        read = stream.read
        for r in range(len(visible)):
            stream.read = lambda st, s: st['x'] if s == r + 1 else read(st, s)
            try:
                term[r] = mean_loss(model, batches) - base
            finally:
                del stream.read  # back to the class's method
    return dict(loss=base, drop=drop, term=term)
