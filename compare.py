"""
Train a family of runs with the same data order, token budget, seed and hyperparameters, evaluate
all on the same validation tokens, and write tables and plots. The families (FAMILIES below):
  compare    every variant of cli.VARIANTS from scratch, on configs/compare.py
  finetune   the conversion experiment: one pretrained standard model fine-tuned as each of several
             variants, and one variant from scratch as the control (configs/finetune*.py; pretrain
             first, see there)

  python compare.py --data_dir=data/fineweb10B                # configs/compare*.py as they are
  python compare.py --data_dir=data/sample --gpus=0,1,2,3 \
      --max_iters=220 --eval_interval=20                      # smaller
  python compare.py --family=finetune --gpus=0,1,2,3,4,5  # every arm of the conversion experiment
  python compare.py --report_only=True --out_dir=out-compare  # redo tables and plots from the logs
  python compare.py --extra_configs=configs/corpus.py --data_dir=data/corpus \
      --ablate=True                                           # docs/experiments.md

Each run is
  python train.py configs/<family>.py [extra_configs] <the run's variant> --out_dir=... --seed=...
(the variant: --residual=... and its other fields from cli.VARIANTS, or configs/finetune_<arm>.py)
plus --data_dir if given and every key that compare.py does not know (--max_iters=...,
--batch_size=...), one process per run; with --gpus, one run per listed GPU at a time. Every run's
config is checked before the first one starts. A finished run is not trained again, so an
interrupted comparison picks up where it stopped. What needs a run's checkpoint (its loss on each
val file, its routing weights and, with --ablate, the importance of each source: routing.py) is
measured once and kept in <run>/analysis.json, so the tables can be made again from the logs alone.
Output in out_dir: results.md (each run's val losses; the routing sharpness of each routed read),
results.json, loss_curves.png, routing_<run>.png, routing_max.png, and with --ablate
importance_<run>.png (the plots need matplotlib).
"""

import json
import math
import os
import subprocess
import sys
import time

import torch

import checkpoint
import cli
import routing
import train
from cli import ConfigError
from prepare import list_shards, load_shard

RUNS = list(cli.VARIANTS)
# the conversion experiment's arms: the first five fine-tune one pretrained standard model, the
# last is the control
FINETUNE_RUNS = ['standard', 'delta_block', 'delta', 'attnres_block', 'attnres',
                 'delta_block_scratch']
# family -> (its runs, those that get a second seed to show the run-to-run noise). A fine-tune
# draws nothing at random (no dropout, the routing starts at zero, the data order is fixed), so
# another seed would repeat it
FAMILIES = {'compare': (RUNS, 'standard,delta'), 'finetune': (FINETUNE_RUNS, '')}
defaults = dict(
    family='compare',       # configs/<family>.py, then each run's variant
    out_dir='',             # '' = out-<family>
    data_dir='',            # '' = each run's own, from its config files
    runs='',                # '' = every run of the family
    seeds=1,                # seeds per run ...
    extra_seeds='auto',     # ... plus one for each time a run is named here; 'auto' = the family's
    extra_configs='',       # config files for all runs, after configs/<family>.py, before their own
    gpus='',                # '0,1,2,3': one run per GPU at a time ('0,0': two on GPU 0); '' = one
    report_only=False,
    routing_tokens=16,      # sequences of val tokens over which the routing weights are averaged
    extra_val='',           # more val shards to measure every final model on, comma-separated
    ablate=False,           # routed runs: the rise in loss when each source is removed from a read
    ablate_tokens=131_072,  # val tokens for it: one forward pass over them per (read, source) pair
)


RULES = {  # each bad value is one line and exit status 1, before any run starts
    'family': (lambda v: v in FAMILIES, f'one of {", ".join(FAMILIES)}'),
    'seeds': (lambda v: v >= 1, '>= 1'),
    'gpus': (lambda v: all(g.strip().isdigit() for g in v.split(',')) if v else True,
             "GPU numbers separated by commas, e.g. '0,1,2,3' ('0,0': two runs on GPU 0), "
             "or '' for one run at a time"),
    'routing_tokens': (lambda v: v >= 1, '>= 1 sequences'),
    'ablate_tokens': (lambda v: v >= 1, '>= 1'),
    'extra_val': (lambda v: all(os.path.isfile(f) for f in v.split(',') if f),
                  'val shards that exist, comma-separated'),
}


def parse(argv):
    """(options, the arguments of keys that compare.py does not know: train.py's, handed on to every
    run). The family's defaults fill in runs, extra_seeds and out_dir where they were not given."""
    cfg, passthrough = cli.parse(argv, defaults, __doc__, RULES, passthrough=True)
    runs, extra_seeds = FAMILIES[cfg['family']]
    cfg['runs'] = cfg['runs'] or ','.join(runs)
    cfg['extra_seeds'] = extra_seeds if cfg['extra_seeds'] == 'auto' else cfg['extra_seeds']
    cfg['out_dir'] = cfg['out_dir'] or f'out-{cfg["family"]}'
    unknown = [r for r in cfg['runs'].split(',') + cfg['extra_seeds'].split(',')
               if r and r not in runs]
    if unknown:
        raise SystemExit(f'error: --runs/--extra_seeds: unknown run {unknown[0]!r}; the '
                         f'{cfg["family"]} family has {", ".join(runs)}')
    return cfg, passthrough


def run_list(cfg):
    """[(variant, seed)]: seeds 1337, 1338, ... so that seed 1337 is common to all variants."""
    # 'standard,standard,delta': two more seeds of standard, one of delta
    extra = cfg['extra_seeds'].split(',')
    seeds = {name: cfg['seeds'] + extra.count(name) for name in cfg['runs'].split(',')}
    return [(name, 1337 + k) for name in seeds for k in range(seeds[name])]


def run_dir(cfg, name, seed):
    return os.path.join(cfg['out_dir'], f'{name}_s{seed}')


def train_args(cfg, name, seed, passthrough):
    """train.py's arguments for one run: the family's config, the extra ones, the run's own (the
    variant's fields of cli.VARIANTS, or the arm's config file of the conversion experiment), then
    overrides."""
    extra = [path for path in cfg['extra_configs'].split(',') if path]
    data = [f'--data_dir={cfg["data_dir"]}'] if cfg['data_dir'] else []
    own = ([f'--{k}={v}' for k, v in cli.VARIANTS[name].items()] if cfg['family'] == 'compare'
           else [f'configs/{cfg["family"]}_{name}.py'])
    return [f'configs/{cfg["family"]}.py', *extra, *own,
            f'--out_dir={run_dir(cfg, name, seed)}', *data, f'--seed={seed}', *passthrough]


def launch(cfg, passthrough):
    """Train the runs that have not finished, keeping each listed GPU busy with one run."""
    gpus = cfg['gpus'].split(',') if cfg['gpus'] else [None]
    # GPUs that are not there: else the runs would go to the CPU, full size
    if cfg['gpus'] and torch.cuda.device_count() <= max(map(int, gpus)):
        raise SystemExit(f'error: --gpus={cfg["gpus"]}: this machine has '
                         f'{torch.cuda.device_count()} CUDA GPU(s); '
                         'leave --gpus out to run one run at a time on the default device')
    # an unfinished run starts again
    todo = [r for r in run_list(cfg) if not finished(run_dir(cfg, *r))]
    # every run's config first: a typo, or a pretrained model not there yet, stops here rather than
    # in each run
    for name, seed in todo:
        try:
            checkpoint.init_kind(
                train.parse_config(train_args(cfg, name, seed, passthrough)).init_from)
        except ConfigError as e:
            raise SystemExit(f'error: run {name} (seed {seed}): {e}') from None
    running, failed = {}, []  # slot -> (process, run); a GPU listed twice runs two at a time
    while todo or running:
        for slot, gpu in enumerate(gpus):
            if slot not in running and todo:
                name, seed = todo.pop(0)
                d = run_dir(cfg, name, seed)
                os.makedirs(d, exist_ok=True)
                cmd = [sys.executable, 'train.py', *train_args(cfg, name, seed, passthrough)]
                # each run sees one GPU as cuda:0, so train.py needs no device argument
                env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': gpu} if gpu is not None else {}))
                print(f'[gpu {gpu}] {" ".join(cmd)}', flush=True)
                with open(os.path.join(d, 'stdout.txt'), 'w') as out:
                    running[slot] = (subprocess.Popen(cmd, env=env, stdout=out,
                                                      stderr=subprocess.STDOUT), (name, seed))
        for slot, (proc, run) in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
                print(f'[gpu {gpus[slot]}] {run[0]} seed {run[1]}: exit {proc.returncode}',
                      flush=True)
                if proc.returncode != 0:
                    failed.append(f'{run[0]} seed {run[1]}')
                    with open(os.path.join(run_dir(cfg, *run), 'stdout.txt')) as f:
                        print(f.read()[-2000:])
        time.sleep(1)  # poll: runs take minutes, a second of latency costs nothing
    return failed


def read_log(d):
    """The config and the step lines of a run's log.jsonl (empty if there is none)."""
    path = os.path.join(d, 'log.jsonl')
    if not os.path.exists(path):
        return None, []
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    return lines[0].get('config'), [line for line in lines[1:] if 'step' in line]


def finished(d):
    cfg, steps = read_log(d)
    return (bool(steps) and steps[-1]['step'] >= cfg['max_iters']
            and steps[-1].get('val_loss') is not None)


def val_batches(val, n_tokens, T, B, device):
    """The first n_tokens of val tokens (whole sequences of T) as [(x, y)] batches of B sequences
    on device."""
    return list(train.batches(val, 0, min(n_tokens, len(val) - 1) // T, B, T, device))


def analyse(cfg, d, run_cfg, device):
    """What a finished run's checkpoint tells, measured once and kept in <run>/analysis.json: the
    loss on each val file, and for routed runs the mean weights (R, S), each read's largest weight
    and entropy, and with --ablate the importance of each source to each read
    (routing.importance)."""
    path = os.path.join(d, 'analysis.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if not os.path.exists(os.path.join(d, 'ckpt.pt')):
        return {}  # the logs alone: nothing more to say about this run
    model, _ = checkpoint.load_model(os.path.join(d, 'ckpt.pt'), device)
    T, B = run_cfg['block_size'], run_cfg['batch_size']
    # the run's own val set first, then the others; each loaded once, its token ids checked
    files = [list_shards(run_cfg['data_dir'], 'val')[0]] + [f for f in cfg['extra_val'].split(',')
                                                          if f]
    vals = [load_shard(f, model.config.vocab_size) for f in files]
    out = dict(val={}, params=model.get_num_params(non_embedding=False))
    with cli.autocast(device, cli.pick_dtype('auto', device)[0]):  # as train.py chooses it
        for f, val in zip(files, vals):
            out['val'][os.path.basename(f)] = routing.mean_loss(
                model, val_batches(val, run_cfg['val_tokens'], T, B, device))
        first = val_batches(vals[0], cfg['routing_tokens'] * T, T, cfg['routing_tokens'],
                            device)[0][0]
        w = routing.weights(model, first)
        if w is not None:
            mx, ent = routing.stats(w)
            dests, srcs = routing.labels(model)
            out['routing'] = dict(weights=w.mean((2, 3)).tolist(), max_weight=mx.tolist(),
                                  entropy=ent.tolist(), dests=dests, sources=srcs)
            if cfg['ablate']:
                imp = routing.importance(
                    model, val_batches(vals[0], cfg['ablate_tokens'], T, B, device))
                out['importance'] = dict(loss=imp['loss'], drop=imp['drop'].tolist(),
                                         term=None if imp['term'] is None else imp['term'].tolist())
    with open(path, 'w') as f:
        json.dump(out, f, indent=1)
    return out


def read_order(label):
    """Where a read's label of routing.labels() stands in the model: 'L3.mlp' -> 7, 'final' last."""
    if label == 'final':
        return math.inf
    layer, sublayer = label[1:].split('.')  # 'L3.mlp' -> '3', 'mlp'
    return 2 * int(layer) + (sublayer == 'mlp')


def report(cfg):
    rows, curves, routes, analyses = [], {}, {}, {}
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    for name, seed in run_list(cfg):
        d = run_dir(cfg, name, seed)
        run_cfg, steps = read_log(d)
        evals = [s for s in steps if s.get('val_loss') is not None]
        if not evals:
            continue
        # tok/s over the last three quarters of the log lines: after warm-up and compilation
        timed = [s['tok_per_s'] for s in steps[len(steps) // 4:] if s.get('tok_per_s')]
        a = analyses[(name, seed)] = analyse(cfg, d, run_cfg, device)
        mem = [s['peak_mem_mb'] for s in steps if s.get('peak_mem_mb')]
        rows.append(dict(run=name, seed=seed, val_loss=evals[-1]['val_loss'],
                         tokens=evals[-1]['tokens'],
                         # step 0: the model as it was loaded or initialised
                         start_val_loss=evals[0]['val_loss'],
                         tok_per_s=sum(timed) / max(len(timed), 1), params=a.get('params'),
                         peak_mem_mb=max(mem) if mem else None, val=a.get('val', {})))
        curves[(name, seed)] = [(s['tokens'], s['val_loss']) for s in evals]
        # one routing picture per variant, on the same first val tokens
        if seed == 1337 and 'routing' in a:
            routes[name] = a['routing']
    if not rows:
        return False
    importance = {f'{k[0]}_s{k[1]}': dict(a['importance'], dests=a['routing']['dests'],
                                           sources=a['routing']['sources'],
                                           weights=a['routing']['weights'])
                  for k, a in analyses.items() if 'importance' in a}
    table = '\n'.join(loss_table(rows) + routing_table(routes, cfg['routing_tokens'])
                      + importance_table(importance))
    print(table)
    os.makedirs(cfg['out_dir'], exist_ok=True)
    with open(os.path.join(cfg['out_dir'], 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(cfg['out_dir'], 'results.json'), 'w') as f:
        json.dump(dict(rows=rows, curves={f'{k[0]}_s{k[1]}': v for k, v in curves.items()},
                       routing=routes, importance=importance), f, indent=1)
    plots(cfg['out_dir'], curves, routes, importance)
    return True


def mean_std(xs):
    """The mean and the sample standard deviation (0 for a single value)."""
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def loss_table(rows):
    """One line per run: its val losses, the difference to the mean of standard's seeds and to
    standard of the same seed (the runs of one seed share their backbone's initial weights, so that
    difference is paired), speed and memory; then one line per variant with its mean over seeds."""
    # the val files measured besides the run's own val loss
    vals = sorted({f for r in rows for f in r['val']})
    std = {r['seed']: r['val_loss'] for r in rows if r['run'] == 'standard'}
    base, spread = mean_std(list(std.values())) if std else (None, None)
    lines = ['| run | seed | val loss at step 0 | val loss | ' + ''.join(f'{f} | ' for f in vals)
             + 'vs standard | vs standard, same seed | tok/s | peak memory | params |',
             '|---' * (9 + len(vals)) + '|']
    for r in rows:
        diff = f'{r["val_loss"] - base:+.4f}' if base is not None else '-'
        paired = f'{r["val_loss"] - std[r["seed"]]:+.4f}' if r['seed'] in std else '-'
        mem = f'{r["peak_mem_mb"] / 1024:.1f} GiB' if r.get('peak_mem_mb') else '-'
        params = f'{r["params"] / 1e6:.2f}M' if r.get('params') else '-'
        lines.append(f'| {r["run"]} | {r["seed"]} | {r["start_val_loss"]:.4f} | '
                     f'{r["val_loss"]:.4f} | '
                     + ''.join(f'{r["val"][f]:.4f} | ' if f in r['val'] else '- | ' for f in vals)
                     + f'{diff} | {paired} | {r["tok_per_s"]:,.0f} | {mem} | {params} |')
    if base is not None:
        lines += ['', f'Per variant, the mean over its seeds; standard\'s seeds spread by '
                      f'{spread:.4f} (sample std):',
                  '', '| run | seeds | val loss | vs standard | spread of its seeds |',
                  '|---|---|---|---|---|']
        for name in dict.fromkeys(r['run'] for r in rows):
            m, sd = mean_std([r['val_loss'] for r in rows if r['run'] == name])
            n = sum(r['run'] == name for r in rows)
            lines.append(f'| {name} | {n} | {m:.4f} | {m - base:+.4f} | '
                         f'{f"{sd:.4f}" if n > 1 else "-"} |')
    return lines


def ranks(xs):
    """The ranks 0..n-1 of xs (ties in the order given)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    return [order.index(i) for i in range(len(xs))]


def weight_vs_importance(imp):
    """Where a model's routing weights and its measured importance agree, over the reads that see at
    least two sources: how often the heaviest source is also the one whose removal costs most
    (top-1), the mean rank correlation of weight and loss rise per read (Spearman, reads with >= 3
    sources), and the count of (read, source) pairs with weight >= 0.5 but a rise < 0.001 nats
    (weight without importance), and with weight < 0.1 but a rise >= 0.01 (importance without
    weight)."""
    top1, rho, heavy_idle, light_vital = [], [], 0, 0
    for w, d in zip(imp['weights'], imp['drop']):
        seen = [j for j, v in enumerate(d) if v is not None and v == v]  # NaN: not visible or alone
        if len(seen) < 2:
            continue
        ws, ds = [w[j] for j in seen], [d[j] for j in seen]
        top1.append(max(range(len(seen)), key=ws.__getitem__)
                    == max(range(len(seen)), key=ds.__getitem__))
        if len(seen) >= 3:
            rw, rd, n = ranks(ws), ranks(ds), len(seen)
            rho.append(1 - 6 * sum((a - b) ** 2 for a, b in zip(rw, rd)) / (n * (n * n - 1)))
        heavy_idle += sum(a >= 0.5 and b < 1e-3 for a, b in zip(ws, ds))
        light_vital += sum(a < 0.1 and b >= 1e-2 for a, b in zip(ws, ds))
    return dict(reads=len(top1), top1=sum(top1) / max(len(top1), 1),
                spearman=sum(rho) / max(len(rho), 1), heavy_idle=heavy_idle,
                light_vital=light_vital)


def importance_table(importance):
    """One line per ablated run: how far its weights say what its ablation measures."""
    if not importance:
        return []
    lines = ['', 'Routing weights against importance (the rise in val loss when a source is '
                 'removed from a read; routing.importance):', '',
             '| run | reads | heaviest = most important | rank correlation '
             '| weight >= 0.5, rise < 0.001 | weight < 0.1, rise >= 0.01 '
             '| largest rise without the routed term |', '|---' * 7 + '|']
    for run, imp in importance.items():
        a = weight_vs_importance(imp)
        term = f'{max(imp["term"]):.4f}' if imp.get('term') else '-'
        lines.append(f'| {run} | {a["reads"]} | {a["top1"]:.0%} | {a["spearman"]:.2f} '
                     f'| {a["heavy_idle"]} | {a["light_vital"]} | {term} |')
    return lines


def routing_table(routes, n_seq):
    """The routing sharpness of the final models: one row per routed read in model order, one
    column per run with the largest weight and the entropy (nats), both per token, then averaged."""
    stats = {name: {d: (m, e) for d, m, e in zip(v['dests'], v['max_weight'], v.get('entropy', []))}
             for name, v in routes.items()}
    if not stats:
        return []
    reads = sorted({read for m in stats.values() for read in m}, key=read_order)
    lines = ['', f'Largest routing weight / entropy (nats) per token, mean over the first {n_seq} '
                 'val sequences, after training ("-": the run has no such read):', '',
             '| read | ' + ' | '.join(stats) + ' |', '|---|' + '---|' * len(stats)]
    return lines + [f'| {read} | '
                    + ' | '.join(f'{m[read][0]:.3f} / {m[read][1]:.2f}' if read in m else '-'
                                 for m in stats.values()) + ' |' for read in reads]


def plots(out_dir, curves, routes, importance):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print('plots skipped: pip install matplotlib')
        return
    from sample import save_heatmap_png, save_importance_png
    fig = Figure(figsize=(13, 5))
    whole, end = fig.subplots(1, 2)
    for ax in (whole, end):
        for (name, seed), pts in curves.items():
            ax.plot([t / 1e6 for t, _ in pts], [v for _, v in pts], label=f'{name} (seed {seed})',
                    linestyle='-' if seed == 1337 else '--', marker='.')
        ax.set(xlabel='training tokens (M)', ylabel='val loss')
        ax.grid(alpha=0.3)
    whole.set_title('validation loss from step 0')
    last = [pts[-1][1] for pts in curves.values()]
    end.set_ylim(min(last) - 0.05, max(last) + 0.6)  # the end of training: the variants differ
    end.set_title('the same, near the final losses')
    end.legend(fontsize=8)
    fig.savefig(os.path.join(out_dir, 'loss_curves.png'), dpi=120, bbox_inches='tight')
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    # one x position per read of the model, so that a read sits at the same place in every
    # variant's line
    reads = sorted({d for v in routes.values() for d in v['dests']}, key=read_order)
    for name, v in routes.items():
        save_heatmap_png(v['weights'], v['dests'], v['sources'],
                         os.path.join(out_dir, f'routing_{name}.png'),
                         title=f'{name}: mean weights')
        ax.plot([reads.index(d) for d in v['dests']], v['max_weight'], marker='o', label=name)
    ax.set_xticks(range(len(reads)), reads, rotation=90)
    ax.set(xlabel='routed read (destination sublayer)', ylabel='max weight per token (mean)',
           title='routing sharpness')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(out_dir, 'routing_max.png'), dpi=120, bbox_inches='tight')
    for run, imp in importance.items():
        save_importance_png(imp, os.path.join(out_dir, f'importance_{run}.png'), title=run)


def main(argv=None):
    cfg, passthrough = parse(sys.argv[1:] if argv is None else argv)
    failed = [] if cfg['report_only'] else launch(cfg, passthrough)
    reported = report(cfg)
    if failed:  # the table holds the runs that finished; the exit status says that some did not
        raise SystemExit(f'error: {len(failed)} run(s) failed: {", ".join(failed)}; '
                         'see their stdout.txt')
    if not reported:
        raise SystemExit(f'error: no finished run in {cfg["out_dir"]} to report on '
                         f'(runs: {cfg["runs"]})')


if __name__ == '__main__':
    main()
