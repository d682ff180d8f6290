"""
Train a family of runs with the same data order, token budget, seed and hyperparameters, evaluate all on the
same validation tokens, and write tables and plots. The families (FAMILIES below):
  compare    every residual variant from scratch (configs/compare*.py)
  finetune   the conversion experiment: one pretrained standard model fine-tuned as each of several variants,
             and one variant from scratch as the control (configs/finetune*.py; pretrain first, see there)

  python compare.py --data_dir=data/fineweb10B                         # configs/compare*.py as they are
  python compare.py --data_dir=data/sample --gpus=0,1,2,3 --max_iters=220 --eval_interval=20   # smaller
  python compare.py --family=finetune --gpus=0,1,2,3,4,5               # every arm of the conversion experiment
  python compare.py --report_only=True --out_dir=out-compare           # redo tables and plots from the logs

Each run is `python train.py configs/<family>.py [extra_configs] configs/<family>_<run>.py --out_dir=...
--seed=...` plus --data_dir if given and every key that compare.py does not know (--max_iters=...,
--batch_size=...), one process per run; with --gpus, one run per listed GPU at a time. Every run's config is
checked before the first one starts. A finished run is not trained again, so an interrupted comparison picks
up where it stopped. Output in out_dir: results.md (each run's val loss at step 0 and at the end; the routing
sharpness of each routed read), results.json, loss_curves.png, routing_<run>.png, routing_max.png (the plots
need matplotlib).
"""

import json
import math
import os
import subprocess
import sys
import time

import torch

import cli
import train
from cli import ConfigError
from model import routing_stats
from prepare import list_shards, load_shard
from sample import load_model

RUNS = ['standard', 'ddl', 'ddl_dv4', 'attnres', 'attnres_block', 'delta', 'delta_block']
# the conversion experiment's arms: the first five fine-tune one pretrained standard model, the last is the control
FINETUNE_RUNS = ['standard', 'delta_block', 'delta', 'attnres_block', 'attnres', 'delta_block_scratch']
# family -> (its runs, those that get a second seed to show the run-to-run noise). A fine-tune draws nothing at
# random (no dropout, the routing starts at zero, the data order is fixed), so another seed would repeat it
FAMILIES = {'compare': (RUNS, 'standard,delta'), 'finetune': (FINETUNE_RUNS, '')}
defaults = dict(
    family='compare',               # configs/<family>.py, then configs/<family>_<run>.py for each run
    out_dir='',                     # '' = out-<family>
    data_dir='',                    # '' = each run's own, from its config files
    runs='',                        # '' = every run of the family
    seeds=1,                        # seeds per run ...
    extra_seeds='auto',             # ... and these runs get a second seed; 'auto' = the family's
    extra_configs='',               # config files for every run, read after configs/<family>.py, before its own
    gpus='',                        # e.g. '0,1,2,3': one run per GPU at a time ('0,0': two on GPU 0); '' = one
    report_only=False,
    routing_tokens=16,              # sequences of val tokens over which the routing weights are averaged
)


def parse(argv):
    """(options, the arguments of keys that compare.py does not know: train.py's, handed on to every run).
    The family's defaults fill in runs, extra_seeds and out_dir where they were not given."""
    cfg, passthrough = cli.parse(argv, defaults, __doc__, passthrough=True)
    if cfg['family'] not in FAMILIES:
        raise SystemExit(f'error: --family={cfg["family"]}: expected one of {", ".join(FAMILIES)}')
    runs, extra_seeds = FAMILIES[cfg['family']]
    cfg['runs'] = cfg['runs'] or ','.join(runs)
    cfg['extra_seeds'] = extra_seeds if cfg['extra_seeds'] == 'auto' else cfg['extra_seeds']
    cfg['out_dir'] = cfg['out_dir'] or f'out-{cfg["family"]}'
    return cfg, passthrough


def run_list(cfg):
    """[(variant, seed)]: seeds 1337, 1338, ... so that seed 1337 is common to all variants."""
    seeds = {name: cfg['seeds'] + (name in cfg['extra_seeds'].split(',')) for name in cfg['runs'].split(',')}
    return [(name, 1337 + k) for name in seeds for k in range(seeds[name])]


def run_dir(cfg, name, seed):
    return os.path.join(cfg['out_dir'], f'{name}_s{seed}')


def train_args(cfg, name, seed, passthrough):
    """train.py's arguments for one run: the family's config, the extra ones, the run's own, then overrides."""
    extra = [path for path in cfg['extra_configs'].split(',') if path]
    data = [f'--data_dir={cfg["data_dir"]}'] if cfg['data_dir'] else []
    return [f'configs/{cfg["family"]}.py', *extra, f'configs/{cfg["family"]}_{name}.py',
            f'--out_dir={run_dir(cfg, name, seed)}', *data, f'--seed={seed}', *passthrough]


def launch(cfg, passthrough):
    """Train the runs that have not finished, keeping each listed GPU busy with one run."""
    gpus = cfg['gpus'].split(',') if cfg['gpus'] else [None]
    todo = [r for r in run_list(cfg) if not finished(run_dir(cfg, *r))]  # an unfinished run starts again
    # every run's config first: a typo, or a pretrained model not there yet, stops here rather than in each run
    for name, seed in todo:
        try:
            train.init_kind(train.parse_config(train_args(cfg, name, seed, passthrough)).init_from)
        except ConfigError as e:
            raise SystemExit(f'error: run {name} (seed {seed}): {e}') from None
    running = {}  # slot -> (process, run); a GPU listed twice runs two at a time
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
                    running[slot] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), (name, seed)
        for slot, (proc, run) in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
                print(f'[gpu {gpus[slot]}] {run[0]} seed {run[1]}: exit {proc.returncode}', flush=True)
                if proc.returncode != 0:
                    print(open(os.path.join(run_dir(cfg, *run), 'stdout.txt')).read()[-2000:])
        time.sleep(1)  # poll: runs take minutes, a second of latency costs nothing


def read_log(d):
    """The config and the step lines of a run's log.jsonl (empty if there is none)."""
    path = os.path.join(d, 'log.jsonl')
    if not os.path.exists(path):
        return None, []
    lines = [json.loads(line) for line in open(path)]
    return lines[0].get('config'), [line for line in lines[1:] if 'step' in line]


def finished(d):
    cfg, steps = read_log(d)
    return bool(steps) and steps[-1]['step'] >= cfg['max_iters'] and steps[-1].get('val_loss') is not None


@torch.no_grad()
def mean_routing(model, val, n_seq):
    """A final model on the first n_seq val sequences: the routing weights averaged over tokens (R, S), the
    per-token largest weight averaged over tokens (R,), and the labels of reads and sources."""
    T = model.config.block_size
    idx = torch.from_numpy(val[:n_seq * T].astype('int64')).view(n_seq, T).to(next(model.parameters()).device)
    w = model.routing_weights(idx)
    return None if w is None else (w.mean((2, 3)).cpu(), routing_stats(w)[0].cpu(), *model.routing_labels())


def read_order(label):
    """Where a routed read's label of routing_labels() stands in the model: 'L3.mlp' -> 7, 'final' last."""
    if label == 'final':
        return math.inf
    layer, sublayer = label[1:].split('.')  # 'L3.mlp' -> '3', 'mlp'
    return 2 * int(layer) + (sublayer == 'mlp')


def report(cfg):
    rows, curves, routing = [], {}, {}
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    for name, seed in run_list(cfg):
        d = run_dir(cfg, name, seed)
        run_cfg, steps = read_log(d)
        evals = [s for s in steps if s.get('val_loss') is not None]
        if not evals:
            continue
        # tok/s over the last three quarters of the log lines: after warm-up and compilation
        timed = [s['tok_per_s'] for s in steps[len(steps) // 4:] if s.get('tok_per_s')]
        model, _ = load_model(os.path.join(d, 'ckpt.pt'), device)
        rows.append(dict(run=name, seed=seed, val_loss=evals[-1]['val_loss'], tokens=evals[-1]['tokens'],
                         start_val_loss=evals[0]['val_loss'],  # step 0: the model as it was loaded or initialised
                         tok_per_s=sum(timed) / max(len(timed), 1), params=model.get_num_params(non_embedding=False)))
        curves[(name, seed)] = [(s['tokens'], s['val_loss']) for s in evals]
        if seed == 1337:  # one routing picture per variant, on the first val tokens of its data: the same for all
            val = load_shard(list_shards(run_cfg['data_dir'], 'val')[0])
            routing[name] = mean_routing(model, val, cfg['routing_tokens'])
    base = [r['val_loss'] for r in rows if r['run'] == 'standard']  # differences are against the mean of its seeds
    base = sum(base) / len(base) if base else None
    lines = ['| run | seed | val loss at step 0 | val loss | perplexity | vs standard (mean) | tok/s | params |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        diff = f'{r["val_loss"] - base:+.4f}' if base is not None else '-'
        lines.append(f'| {r["run"]} | {r["seed"]} | {r["start_val_loss"]:.4f} | {r["val_loss"]:.4f} '
                     f'| {math.exp(r["val_loss"]):.2f} | {diff} | {r["tok_per_s"]:,.0f} | {r["params"] / 1e6:.2f}M |')
    # the routing sharpness of the final models: one row per routed read in model order, one column per run
    routed = {name: dict(zip(v[2], v[1].tolist())) for name, v in routing.items() if v is not None}
    if routed:
        reads = sorted({read for maxw in routed.values() for read in maxw}, key=read_order)
        lines += ['', f'Largest routing weight per token, mean over the first {cfg["routing_tokens"]} val sequences, '
                      'after training ("-": the run has no such read):', '',
                  '| read | ' + ' | '.join(routed) + ' |', '|---|' + '---|' * len(routed)]
        lines += [f'| {read} | ' + ' | '.join(f'{maxw[read]:.3f}' if read in maxw else '-' for maxw in routed.values())
                  + ' |' for read in reads]
    table = '\n'.join(lines)
    print(table)
    os.makedirs(cfg['out_dir'], exist_ok=True)
    with open(os.path.join(cfg['out_dir'], 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(cfg['out_dir'], 'results.json'), 'w') as f:
        json.dump(dict(rows=rows, curves={f'{k[0]}_s{k[1]}': v for k, v in curves.items()},
                       routing={k: dict(weights=v[0].tolist(), max_weight=v[1].tolist(), dests=v[2], sources=v[3])
                                for k, v in routing.items() if v is not None}), f, indent=1)
    plots(cfg['out_dir'], curves, routing)


def plots(out_dir, curves, routing):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print('plots skipped: pip install matplotlib')
        return
    from sample import save_heatmap_png
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
    end.set_ylim(min(last) - 0.05, max(last) + 0.6)  # the end of training, where the variants differ
    end.set_title('the same, near the final losses')
    end.legend(fontsize=8)
    fig.savefig(os.path.join(out_dir, 'loss_curves.png'), dpi=120, bbox_inches='tight')
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    # one x position per read of the model, so that a read sits at the same place in every variant's line
    reads = sorted({d for v in routing.values() if v is not None for d in v[2]}, key=read_order)
    for name, v in routing.items():
        if v is None:
            continue
        w, maxw, dests, srcs = v
        save_heatmap_png(w, dests, srcs, os.path.join(out_dir, f'routing_{name}.png'), title=f'{name}: mean weights')
        ax.plot([reads.index(d) for d in dests], maxw.tolist(), marker='o', label=name)
    ax.set_xticks(range(len(reads)), reads, rotation=90)
    ax.set(xlabel='routed read (destination sublayer)', ylabel='max weight per token (mean)', title='routing sharpness')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(out_dir, 'routing_max.png'), dpi=120, bbox_inches='tight')


def main(argv=None):
    cfg, passthrough = parse(sys.argv[1:] if argv is None else argv)
    if not cfg['report_only']:
        launch(cfg, passthrough)
    report(cfg)


if __name__ == '__main__':
    main()
