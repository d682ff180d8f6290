"""
Sample from a trained model, and show how a routed variant mixes its residual stream for a prompt.

  python sample.py --out_dir=out --start="Once upon a time" --num_samples=3 --max_new_tokens=200
  python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0.7 --top_k=50 --seed=42
  python sample.py --ckpt=runs/delta/ckpt.pt --num_samples=0 \
      --routing_png=routing.png                     # only the routing
  python sample.py --init_from=gpt2 \
      --start="The meaning of life is"              # OpenAI's GPT-2 (or gpt2-medium, a folder)
  python sample.py --out_dir=out --num_samples=0 --ablate=data/x/x_val_000000.bin \
      --routing_png=imp.png

For 'attnres' and 'delta' models the routing weights of the prompt are printed as a heatmap: one row
per routed read (the sublayer it feeds, or 'final'), one column per source it can attend to (the
embedding, earlier sublayer outputs or blocks), each weight averaged over the prompt's tokens, so
every row sums to 1. With --ablate=SHARD a second table shows what each source is worth to each
read: the rise in loss on the first ablate_tokens of that shard when the source is removed from the
read (routing.importance), weights beside it.
"""

import os
import sys
from types import SimpleNamespace

import tiktoken
import torch

import cli
import gpt2_weights
import routing
import train
from checkpoint import load_model
from cli import ConfigError
from model import GPT, GPTConfig
from prepare import ShardError, load_shard

DEFAULTS = dict(
    out_dir='out',        # the run to sample from: <out_dir>/ckpt.pt as written by train.py
    ckpt='',              # a checkpoint path, overriding out_dir
    init_from='',         # GPT-2 instead of a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl,
                          # a Hugging Face folder
    start='\n',           # the prompt: text (may be '<|endoftext|>'), or FILE:path to read it from
    num_samples=3,        # samples drawn, each max_new_tokens long (0: only the routing heatmap)
    max_new_tokens=200,
    temperature=0.8,      # 1.0 samples the model's distribution; lower is more conservative,
                          # higher more random
    top_k=200,            # sample only among the top_k most likely tokens; 0 = all of them
    seed=1337,
    device='auto',        # 'auto' = cuda if available, else mps, else cpu; or 'cpu', 'cuda',
                          # 'cuda:1', 'mps'
    dtype='auto',         # 'auto' = bfloat16 on GPUs that have it, else float32; or float32,
                          # bfloat16, float16
    routing=True,         # print the prompt's routing weights (attnres and delta; others have none)
    routing_png='',       # also save the heatmap to this PNG file (needs matplotlib)
    ablate='',            # a val shard: measure each source's importance to each read on it
                          # (slow: a pass a pair)
    ablate_tokens=65_536,  # the tokens of that shard it uses
)
# values that parse but make no sense: each is one line and exit status 1, before anything loads
RULES = {
    'num_samples': (lambda v: v >= 0, '>= 0 (0: only the routing heatmap)'),
    'max_new_tokens': (lambda v: v >= 1, '>= 1'),
    'temperature': (lambda v: v > 0, '> 0'),
    'top_k': (lambda v: v >= 0, '>= 0 (0 = all tokens)'),
    'dtype': (lambda v: v in cli.DTYPES, ', '.join(cli.DTYPES)),
    'ablate': (lambda v: v == '' or os.path.isfile(v),
               'a token shard that exists (a val shard of prepare.py)'),
    'ablate_tokens': (lambda v: v > 0, '> 0'),
    'out_dir': (lambda v, c: v.strip() != '' or c['ckpt'] or c['init_from'],
                'a run folder, or --ckpt or --init_from'),
}
SHADES = ' .:-=+*#%@'  # 10 levels; ' ' only for a weight of exactly 0: a source the read cannot see


def load_gpt2(init_from, device):
    """OpenAI's GPT-2 (standard residual stream) from a model name or a Hugging Face folder, in
    eval mode."""
    try:
        args, sd, found = gpt2_weights.load(init_from)
        model = GPT(GPTConfig(**args))
        # every weight, checked by name and shape; a standard model has nothing else
        model.load_backbone(sd)
    except (ConfigError, ValueError) as e:  # ValueError: load_backbone names the misfit weights
        raise SystemExit(f'error: cannot load {init_from}: {e}') from None
    return model.to(device).eval(), found


def decode(enc, ids):
    """Text of token ids. The model's vocabulary is GPT-2's 50257 tokens padded to 50304; the
    padding ids never occur in the data, but an undertrained model can still sample them: they are
    shown as U+FFFD."""
    pieces = (enc.decode_single_token_bytes(t) if t < enc.n_vocab else '\ufffd'.encode()
              for t in ids)
    # bytes first: a character may span tokens
    return b''.join(pieces).decode('utf-8', errors='replace')


def format_heatmap(matrix, row_labels, col_labels, stats=None, vmax=None):
    """A (R, S) matrix of weights as a terminal heatmap: a row per label, a 2-character cell per
    column shaded with SHADES from ' ' (0) to '@' (vmax, default the largest weight); column labels
    run downwards above their cells. stats = (max_w, entropy) from routing.stats adds those two
    numbers to each row."""
    m = [[float(v) for v in row] for row in matrix]
    vmax = vmax or max(max(row) for row in m) or 1.0
    rw, ch = max(map(len, row_labels)), max(map(len, col_labels))
    cols = [c.rjust(ch) for c in col_labels]
    # line i: the i-th characters of the column labels
    lines = [' ' * (rw + 1) + ''.join(c[i] + ' ' for c in cols) for i in range(ch)]
    if stats:
        lines[-1] += '   max   ent'
    for r, (label, row) in enumerate(zip(row_labels, m)):
        # the nearest of the 10 levels, but at least '.' above 0: ' ' marks exactly the sources a
        # read cannot see
        cells = ''.join(SHADES[min(9, max(round(v / vmax * 9), 1 if v > 0 else 0))] * 2
                        for v in row)
        numbers = f'  {float(stats[0][r]):.2f}  {float(stats[1][r]):.2f}' if stats else ''
        lines.append(f'{label:>{rw}} {cells}{numbers}')
    lines.append(f"shades {SHADES!r}: 0 .. {vmax:.2f}")
    if stats:
        lines.append('max: mean largest weight per token; '
                     'ent: mean entropy in nats (uniform over n sources: ln n)')
    return '\n'.join(line.rstrip() for line in lines)


def save_heatmap_png(matrix, row_labels, col_labels, path, title='', vmax=None):
    """The same heatmap as a PNG. matplotlib is optional: it is imported here, and only its Figure
    (no pyplot, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('a PNG heatmap needs matplotlib: pip install matplotlib') from None
    m = [[float(v) for v in row] for row in matrix]
    fig = Figure(figsize=(2 + 0.3 * len(col_labels), 1.5 + 0.3 * len(row_labels)))
    ax = fig.subplots()
    im = ax.imshow(m, cmap='viridis', vmin=0.0, vmax=vmax or max(max(row) for row in m),
                   aspect='auto')
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set(xlabel='source', ylabel='destination (routed read)', title=title)
    fig.colorbar(im, ax=ax, label='weight')
    fig.savefig(path, dpi=150, bbox_inches='tight')


def save_importance_png(imp, path, title=''):
    """Weights and importance side by side: imp has 'weights' and 'drop' (R, S), 'dests', 'sources',
    and for Delta 'term' (R,), the rise in loss without a read's whole routed term. The rises span
    four orders of magnitude (one source can be worth nats, most are worth thousandths), so they are
    shown as log10 of the rise, from 1e-4 nats (and below, a rise <= 0: the read does as well
    without it)."""
    import math
    from matplotlib.figure import Figure
    log = lambda v: float('nan') if v is None or v != v else math.log10(max(v, 1e-4))
    panels = [('mean weight', imp['weights'], 0, None),
              ('log10 loss rise without the source', [[log(v) for v in r] for r in imp['drop']],
               -4, None)]
    if imp.get('term'):
        panels.append(('... without the term', [[log(t)] for t in imp['term']], -4, None))
    fig = Figure(figsize=(4 + 0.35 * len(imp['sources']) * 2, 1.5 + 0.3 * len(imp['dests'])))
    axes = fig.subplots(1, len(panels), width_ratios=[len(p[1][0]) + 2 for p in panels])
    for ax, (name, m, vmin, vmax) in zip(axes, panels):
        im = ax.imshow([[float('nan') if v is None else v for v in r] for r in m], cmap='viridis',
                       aspect='auto', vmin=vmin, vmax=vmax)
        cols = ['term'] if len(m[0]) == 1 else imp['sources']
        ax.set_xticks(range(len(cols)), cols, rotation=90)
        ax.set_yticks(range(len(imp['dests'])), imp['dests'] if ax is axes[0] else [])
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=130, bbox_inches='tight')


def main(argv=None):
    c = SimpleNamespace(**cli.parse(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__,
                                    RULES))
    try:  # the device this machine has, and its precision: as train.py chooses them
        c.device = cli.pick_device(c.device)
        c.dtype = cli.pick_dtype(c.dtype, c.device)[0]
    except ConfigError as e:
        raise SystemExit(f'error: {e}') from None
    if c.init_from:
        model, found = load_gpt2(c.init_from, c.device)
        mc = model.config
        print(f'{c.init_from}: {found}, {model.get_num_params() / 1e6:.2f}M parameters')
    else:
        path = c.ckpt or os.path.join(c.out_dir, 'ckpt.pt')
        try:
            model, ckpt = load_model(path, c.device)
        except ConfigError as e:  # no file, a damaged one, or weights that do not fit model_args
            raise SystemExit(f'error: {e}') from None
        mc, vl = model.config, ckpt.get('val_loss')
        print(f'{path}: {mc.residual}, {model.get_num_params() / 1e6:.2f}M parameters, '
              f'step {ckpt.get("step")}'
              + (f', val loss {vl:.4f}' if isinstance(vl, float) else ''))
    try:
        # GPT-2's BPE, the ids the training data was written with
        enc = tiktoken.get_encoding('r50k_base')
    except Exception as e:
        raise SystemExit("cannot load GPT-2's BPE (tiktoken 'r50k_base', downloaded on first use): "
                         f'{e}') from None
    if c.start.startswith('FILE:'):
        try:
            with open(c.start[5:], encoding='utf-8') as f:
                c.start = f.read()
        except OSError as e:
            raise SystemExit(f'cannot read the prompt file {c.start[5:]}: {e.strerror}') from None
    ids = enc.encode(c.start, allowed_special={'<|endoftext|>'})
    if not ids or max(ids) >= mc.vocab_size:
        raise SystemExit('the prompt must be non-empty text with token ids < '
                         f'vocab_size={mc.vocab_size}')
    x = torch.tensor(ids, dtype=torch.long, device=c.device)[None, ...]  # (1, T)

    torch.manual_seed(c.seed)  # seeds the CPU and every GPU
    ctx = cli.autocast(c.device, c.dtype)
    with torch.no_grad(), ctx:
        for _ in range(c.num_samples):
            y = model.generate(x, c.max_new_tokens, temperature=c.temperature,
                               top_k=c.top_k or None)
            print(decode(enc, y[0].tolist()))
            print('---------------')
        # the prompt's last block_size tokens: a longer prompt averages the weights over more tokens
        show = c.routing or bool(c.routing_png)
        w = routing.weights(model, x[:, -mc.block_size:]) if show else None
    if not show:
        return
    if w is None:  # 'standard' and 'ddl' have a single stream: nothing is routed
        print(f"routing: the '{mc.residual}' variant has no routing weights "
              "(only attnres and delta route)")
        return
    m = w.mean((2, 3)).cpu()  # (R, S, B, T) -> (R, S): weights averaged over the prompt's tokens
    rows, cols = routing.labels(model)
    T = w.size(3)
    title = (f'{mc.residual} routing (res_block={mc.res_block}), mean over {T} prompt token'
             + 's' * (T > 1))
    print(f'{title}; rows: destination, columns: source')
    print(format_heatmap(m, rows, cols, stats=routing.stats(w)))
    imp = ablate(model, c, ctx) if c.ablate else None
    if c.routing_png:
        try:
            if imp:
                save_importance_png(dict(imp, weights=m.tolist()), c.routing_png, title)
            else:
                save_heatmap_png(m, rows, cols, c.routing_png, title)
        except (ImportError, OSError) as e:
            raise SystemExit(f'cannot save {c.routing_png}: {e}') from None
        print(f'saved {c.routing_png}')


def ablate(model, c, ctx):
    """Print, per read, the rise in loss (in thousandths of a nat) when each source is removed from
    it, measured on the first ablate_tokens of the shard c.ablate; return it as lists for
    save_importance_png."""
    T = model.config.block_size
    try:
        val = load_shard(c.ablate, model.config.vocab_size)
    except ShardError as e:
        raise SystemExit(f'error: --ablate: {e}') from None
    n = min(c.ablate_tokens, len(val) - 1) // T
    if n == 0:
        raise SystemExit(f'error: --ablate: {c.ablate} has {len(val):,} tokens, fewer than '
                         f'block_size + 1 = {T + 1}')
    batches = list(train.batches(val, 0, n, 8, T, c.device))
    with ctx:
        imp = routing.importance(model, batches)
    rows, cols = routing.labels(model)
    print(f'importance on {n * T:,} tokens of {c.ablate} (loss {imp["loss"]:.4f}): the rise in '
          'loss, x1000, when a source is removed from a read'
          + (' (term: the whole routed term)' if imp['term'] is not None else ''))
    print(' ' * 9 + ''.join(f'{col:>9}' for col in cols)
          + ('     term' if imp['term'] is not None else ''))
    for r, row in enumerate(imp['drop'].tolist()):
        # v != v: NaN, not visible
        cells = ''.join('        .' if v != v else f'{1000 * v:9.2f}' for v in row)
        print(f'{rows[r]:>9}{cells}'
              + (f'{1000 * imp["term"][r].item():9.2f}' if imp['term'] is not None else ''))
    return dict(drop=imp['drop'].tolist(),
                term=None if imp['term'] is None else imp['term'].tolist(),
                dests=rows, sources=cols)


if __name__ == '__main__':
    main()
