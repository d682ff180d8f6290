"""
Train a GPT with any residual stream of model.py on token shards written by prepare.py.
Runs on a CPU, one GPU, or several GPUs with DDP; resumes exactly; logs what it measured.

  python train.py configs/cpu_quickstart.py                         # CPU, a few minutes
  python train.py configs/gpt2_124m.py                              # one GPU
  python train.py configs/gpt2_124m.py --batch_size=8 --compile=False        # with overrides
  torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py configs/gpt2_124m_ddp.py
  python train.py --out_dir=out-gpt2-124m --init_from=resume        # go on where it stopped
  python train.py configs/convert_delta.py --init_from=gpt2 --out_dir=out-gpt2-delta  # into Delta

Configuration: the defaults of `Config` below, then each config file (plain `name = value` lines,
read with ast, never executed) and `--key=value` override, in the order given; the later one wins.
`--help` lists them. A resumed run starts from its checkpoint's config instead of the defaults.
Output in out_dir: ckpt.pt (the latest checkpoint), log.jsonl (the config, then a line per logged
step). Ctrl-C stops when the current step is done (exit 130; twice stops at once), ready to resume.
"""
import inspect
import math
import os
import signal
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import cli
import routing
from checkpoint import Interrupted, SaveError, hard_stop, progress, save_checkpoint
from cli import ConfigError
from model import GPT, GPTConfig
from prepare import ShardError, list_shards, load_shard

# -----------------------------------------------------------------------------
# default config values: GPT-2 124M on FineWeb 10B, one GPU

@dataclass
class Config(GPTConfig):  # the model's fields (model.py) come first, then these
    # I/O
    out_dir: str = 'out'
    data_dir: str = 'data/fineweb10B'  # *_train_*.bin and *_val_*.bin shards from prepare.py
    init_from: str = 'scratch'  # 'scratch', 'resume' (from out_dir), another run's ckpt.pt or
                                # out_dir, or GPT-2: 'gpt2', 'gpt2-medium', -large, -xl, a HF folder
    eval_interval: int = 250    # evaluate, then write the checkpoint, every this many steps
    eval_iters: int = 0         # cap on val batches per rank (a quick look); 0 = the whole val set
    val_tokens: int = 10_485_760  # the val set: the first tokens of the val shard (as the speedrun)
    log_interval: int = 10      # steps between lines of log.jsonl
    route_impl: str = 'auto'    # attnres/delta/ddl: 'plain' (model.py), 'fused' (fast/), 'auto'
    # batch: tokens per step = batch_size * block_size * grad accumulation * world size
    total_batch_size: int = 524_288  # 2**19 tokens per optimizer step, GPT-2 124M's batch in llm.c
    batch_size: int = 16        # micro-batch per rank, in sequences; lower it if memory runs out
    # AdamW and the learning-rate schedule
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    max_iters: int = 19_073     # optimizer steps: 19,073 * 524,288 = 10.0B tokens
    lr_schedule: str = 'cosine'  # 'cosine' decay after warmup; 'wsd': warmup, stable, linear decay
    warmup_iters: int = 700
    cooldown_frac: float = 0.2  # wsd: the last fraction of the steps, decaying linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0      # clip the global gradient norm at this value; 0 = off
    routing_lr_mult: float = 1.0  # LR multiplier for the variant's own parameters (queries, gates)
    # system
    device: str = 'auto'        # 'auto' = cuda if available, else mps, else cpu; or e.g. 'cuda:1'
    dtype: str = 'auto'         # 'auto' = bfloat16 on GPUs that have it, else float32; or float16
    compile: bool = True        # torch.compile on CUDA; CPU and MPS always run eager
    seed: int = 1337


# what each value must be beyond its type, checked before anything runs (GPTConfig checks the
# model's fields; cli.pick_device checks the device against the machine when the run starts)
RULES = {
    'out_dir': (lambda v: v.strip() != '', 'a folder for ckpt.pt and log.jsonl, not empty'),
    'data_dir': (lambda v: v.strip() != '', 'a folder of token shards, not empty'),
    **{k: (lambda v: v >= 0, '>= 0') for k in ('learning_rate', 'weight_decay', 'routing_lr_mult',
                                                'max_iters', 'warmup_iters')},
    'min_lr': (lambda v, c: 0 <= v <= c.learning_rate, '>= 0 and <= learning_rate'),
    **{k: (lambda v: 0 <= v < 1, 'in [0, 1)') for k in ('beta1', 'beta2')},
    'grad_clip': (lambda v: v >= 0, '>= 0 (0 = off)'),
    'lr_schedule': (lambda v: v in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
    'cooldown_frac': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'eval_iters': (lambda v: v >= 0, '>= 0 (0 = the whole val set)'),
    'dtype': (lambda v: v in cli.DTYPES, ', '.join(cli.DTYPES)),
    'route_impl': (lambda v: v in cli.ROUTE_IMPLS, ', '.join(cli.ROUTE_IMPLS)),
    **{k: (lambda v: v > 0, '> 0') for k in ('batch_size', 'total_batch_size', 'eval_interval',
                                              'val_tokens', 'log_interval')},
}
MODEL_KEYS = [f.name for f in fields(GPTConfig)]  # the keys of Config that build the model
DEFAULTS = asdict(Config())  # every key and its default, whose type a value given for it must have


def parse_config(argv, base=None):
    """The Config of base (a dict, e.g. a checkpoint's config; None = the defaults), then of argv's
    config files and --key=value overrides in order. A ConfigError names the file or argument."""
    cfg = {**DEFAULTS, **{k: v for k, v in (base or {}).items() if k in DEFAULTS}}
    for arg in argv:
        if arg.startswith('--'):  # the shared --key=value rules of cli.py
            key, value = cli.override(arg, DEFAULTS)
            cfg[key] = value
            continue
        for key, value, where in cli.read_config_file(arg):
            cfg[key] = cli.check(key, value, DEFAULTS, where)
    try:
        c = Config(**cfg)  # GPTConfig checks the model's fields: e.g. residual='resnet'
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cli.check_rules(c, RULES)
    return c


def model_args(cfg):
    """The GPTConfig fields of cfg: what a checkpoint stores as 'model_args'."""
    return {k: getattr(cfg, k) for k in MODEL_KEYS}

# -----------------------------------------------------------------------------
# data: sequential reads of uint16 token shards

class DataLoader:
    """Batches read in order from a list of uint16 token arrays (the train shards). At each
    micro-step the ranks together take the next B*T*world tokens of the current shard (+1 for the
    last target); rank r reads the r-th part, so ranks never see the same tokens. A shard's tail too
    short for a whole micro-step is skipped; the first shard follows the last. The position (shard,
    pos) is the same on every rank: rank 0's is all a checkpoint needs, whatever the world size."""

    def __init__(self, shards, B, T, rank=0, world=1, names=None):
        self.shards, self.B, self.T, self.rank = shards, B, T, rank
        self.span = B * T * world  # tokens that the whole world reads per micro-step
        for i, s in enumerate(shards):  # a shard shorter than one micro-step would never be read
            if len(s) < self.span + 1:
                raise ConfigError(f'{names[i] if names else f"shard {i}"} has {len(s):,} tokens, '
                                  f'fewer than one micro-step needs: batch_size * block_size '
                                  f'* world + 1 = {self.span + 1:,}')
        self.shard, self.pos = 0, 0

    def next_batch(self):
        """This rank's next window of B*T + 1 tokens: the inputs are [:-1], the targets [1:]."""
        if self.pos + self.span + 1 > len(self.shards[self.shard]):  # the next window doesn't fit
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
        start = self.pos + self.rank * self.B * self.T  # rank r: the r-th B*T tokens of the window
        self.pos += self.span  # the same on every rank
        return self.shards[self.shard][start: start + self.B * self.T + 1]

    def state(self):
        return {'shard': self.shard, 'pos': self.pos}

    def load_state(self, state):  # the modulo: a resumed run may have fewer shards
        self.shard, self.pos = state['shard'] % len(self.shards), state['pos']


def to_batch(window, T, device):
    """A window of n*T + 1 tokens -> inputs x, next-token targets y: both (n, T) int64 on device."""
    buf = torch.from_numpy(window.astype(np.int64))  # uint16 -> int64 ids (a copy, off the memmap)
    x, y = buf[:-1].view(-1, T), buf[1:].view(-1, T)  # y: x shifted by one, predict the next token
    if device.startswith('cuda'):  # from pinned memory, the copy to the GPU runs asynchronously
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)

def batches(tokens, lo, hi, B, T, device):
    """Sequences lo..hi-1 of T tokens of a token array as (x, y) batches of B sequences (the last
    may be shorter): the val set of evaluate, compare.py and sample.py --ablate."""
    for s in range(lo, hi, B):
        yield to_batch(tokens[s * T: min(s + B, hi) * T + 1], T, device)

# -----------------------------------------------------------------------------
# learning rate and evaluation

def get_lr(step, cfg):
    """Learning rate of optimizer step `step` (0-based): a linear warmup, then a cosine from
    learning_rate to min_lr, or for 'wsd' a flat stretch and then a linear decay over the last
    cooldown_frac of the steps. Both reach min_lr at the last step, max_iters - 1."""
    if step < cfg.warmup_iters:  # (step + 1): the first step already learns, at lr / warmup_iters
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    last = cfg.max_iters - 1
    if cfg.lr_schedule == 'cosine':
        progress = min(1.0, (step - cfg.warmup_iters) / max(1, last - cfg.warmup_iters))  # 0 -> 1
        return cfg.min_lr + (0.5 * (1 + math.cos(math.pi * progress))
                             * (cfg.learning_rate - cfg.min_lr))
    # wsd: e.g. 1,000 steps with cooldown_frac 0.2 hold learning_rate until step 800, then decay
    decay_start = max(cfg.warmup_iters, cfg.max_iters - round(cfg.cooldown_frac * cfg.max_iters))
    progress = min(1.0, max(0, step - decay_start) / max(1, last - decay_start))
    return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)


def read_loss(pending, n, ckpt_path, saved_at):
    """A step's mean loss from its pending copy (the loss summed over n micro-steps and ranks, on
    its way to the CPU; the CUDA event after the copy; the step). NaN or inf stops the run."""
    loss_sum, done, step = pending
    if done:
        done.synchronize()
    loss = loss_sum.item() / n
    if not math.isfinite(loss):  # the weights it made are never saved: stop writes nothing
        checkpoint.stop('train loss', loss, step, ckpt_path, saved_at)
    return loss


@torch.no_grad()
def evaluate(model, val, n_seq, cfg, env):
    """Mean loss per token on the fixed val set: the first n_seq sequences of block_size tokens of
    the val shard. Rank r takes the r-th contiguous share in micro-batches of batch_size; loss sums
    and token counts are all-reduced, so the result depends on neither batch_size nor world size."""
    T, B, world = cfg.block_size, cfg.batch_size, env.world
    lo, hi = env.rank * n_seq // world, (env.rank + 1) * n_seq // world  # 8 ranks: 1,280 of 10,240
    if cfg.eval_iters:  # a quick look: fewer batches, so the number depends on batch_size and world
        hi = min(hi, lo + cfg.eval_iters * B)
    totals = torch.zeros(2, dtype=torch.float64)  # (sum of per-token losses, number of tokens)
    model.eval()
    for x, y in batches(val, lo, hi, B, T, env.device):
        with env.ctx:
            _, loss = model(x, y)
        totals += torch.tensor([loss.item() * y.numel(), y.numel()])  # loss: a mean over y's tokens
    model.train()
    if world > 1:
        totals = totals.to(env.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def sharpness(model, x, env):
    """How sharp each routed read is on the tokens x: its largest weight and its entropy, measured
    on rank 0 ({} for standard and ddl, which do not route, and on the other ranks)."""
    model.eval()
    with env.ctx:
        w = routing.weights(model, x) if env.master else None
    model.train()
    if w is None:
        return {}
    mx, ent = routing.stats(w)
    return {'routing_max': mx.tolist(), 'routing_entropy': ent.tolist()}

# -----------------------------------------------------------------------------
# the run: setup, data, model, then the loop

def load_data(cfg, env):
    """The train shards, read in order, and the fixed val set: the first val_tokens of the first val
    shard. Every token id is checked against vocab_size here, not where it would crash mid-run."""
    paths = list_shards(cfg.data_dir, 'train')
    shards = [load_shard(p, cfg.vocab_size) for p in paths]
    loader = DataLoader(shards, cfg.batch_size, cfg.block_size, env.rank, env.world, paths)
    val_path = list_shards(cfg.data_dir, 'val')[0]
    val = load_shard(val_path, cfg.vocab_size)
    n_val = min(cfg.val_tokens, len(val) - 1) // cfg.block_size  # whole sequences (+1: last target)
    if n_val == 0:
        raise ConfigError(f'{val_path} has {len(val)} tokens; the val set needs block_size + 1 = '
                          f'{cfg.block_size + 1}')
    env.say(f'data: {len(paths)} train shard(s); val = {n_val * cfg.block_size:,} tokens of '
            f'{val_path}'
            + (f', at most {cfg.eval_iters} batches per rank' if cfg.eval_iters else ''))
    return loader, val, n_val


def build_model(cfg, ckpt, src, loader, env):
    """The model, from scratch, resumed, or with the backbone of another run (of any variant) or of
    GPT-2, on its device with the fast paths and compilation applied; and its optimizer."""
    model = GPT(GPTConfig(**model_args(cfg)))
    if ckpt or src:
        where = os.path.join(cfg.out_dir, 'ckpt.pt') if ckpt else cfg.init_from
        left = checkpoint.load_weights(model, ckpt or src, bool(ckpt), cfg, where)
    if src:  # a conversion goes on with the tokens its source has not seen; GPT-2 from the first
        if src['data']:
            loader.load_state(src['data'])
        data = (f'shard {loader.shard}, token {loader.pos:,}' if src['data']
                else 'the start of the train shards')
        env.say(f'init_from={cfg.init_from}: {src["found"]}; backbone loaded; at init: '
                f'{", ".join(left) or "nothing"}; train data from {data}')
    model.to(env.device)
    # fast paths and compilation, applied from outside. fast.apply replaces the stream's parameters,
    # so it comes before the optimizer. Compiling in place keeps the keys free of '_orig_mod.'
    fused = cli.fast_paths(model, cfg.route_impl)
    compiled = cli.compile_model(model, cfg.compile, env.kind)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), env.kind, cfg.routing_lr_mult)
    gpu = f' ({torch.cuda.get_device_name(env.device)})' if env.kind == 'cuda' else ''
    env.say(f'device {env.device}{gpu} x {env.world}; dtype {env.dtype} ({env.why}); '
            f'compile {compiled}; routing {fused}')
    return model, optimizer


def grad_accum(cfg, world):
    """Micro-steps per optimizer step: the batch is fixed in tokens, and grad accumulation makes up
    what the ranks don't."""
    micro = cfg.batch_size * cfg.block_size * world  # e.g. 32 * 1,024 * 8 GPUs = 262,144 tokens
    if cfg.total_batch_size % micro:
        raise ConfigError(f'total_batch_size={cfg.total_batch_size:,} is not a multiple of '
                          f'batch_size * block_size * world size = {cfg.batch_size} * '
                          f'{cfg.block_size} * {world} = {micro:,}')
    return cfg.total_batch_size // micro  # e.g. 524,288 / 262,144 = 2 micro-steps per step


def describe(cfg, model, accum, world, peak, say):
    """What this run is, derived, printed once before the first step."""
    say(f'model: residual={cfg.residual}, {model.get_num_params() / 1e6:.2f}M parameters, '
        f'{model.flops_per_token() / 1e6:,.1f} MFLOP/token; '
        f'peak {f"{peak:.3g} FLOP/s" if peak else "unknown"}')
    say(f'batch: {cfg.total_batch_size:,} tokens/step = {cfg.batch_size} B x {cfg.block_size} T x '
        f'{accum} accum x {world} ranks; {cfg.max_iters:,} steps = '
        f'{cfg.max_iters * cfg.total_batch_size:,} tokens')
    say('config: ' + textwrap.fill(' '.join(f'--{k}={v}' for k, v in asdict(cfg).items()), 100,
                                   subsequent_indent='  ', break_on_hyphens=False))  # as arguments


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print(__doc__ + '\n' + inspect.getsource(GPTConfig) + '\n' + inspect.getsource(Config))
        return
    ddp = 'RANK' in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    progress.step, progress.saved_at, progress.sent, progress.ctrl_c = None, None, None, 0
    on_sigint = signal.signal(signal.SIGINT, checkpoint.on_ctrl_c)
    try:
        train(argv, ddp)
    except (ConfigError, ShardError, SaveError) as e:
        raise SystemExit(f'error: {e}') from None  # a clear message and exit status 1, no traceback
    except OSError as e:  # e.g. the disk filled up while log.jsonl was written
        raise SystemExit(f'error: {checkpoint.os_error(e)}') from None
    except (Interrupted, KeyboardInterrupt):
        at = 'before the first step' if progress.step is None else f'at step {progress.step}'
        last = ('no checkpoint yet' if progress.saved_at is None
                else f'last checkpoint step {progress.saved_at}; resume with --init_from=resume')
        print(f'interrupted {at}; {last}', file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as the shell reports a Ctrl-C
    finally:
        signal.signal(signal.SIGINT, on_sigint)
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def train(argv, ddp):
    cfg = parse_config(argv)
    ckpt_path, log_path = (os.path.join(cfg.out_dir, f) for f in ('ckpt.pt', 'log.jsonl'))
    ckpt = None
    if cfg.init_from == 'resume':  # the checkpoint's config is the base; files and overrides win
        ckpt = checkpoint.load_checkpoint(ckpt_path)
        cfg = parse_config(argv, base={**ckpt['config'], 'out_dir': cfg.out_dir})
    elif os.path.exists(ckpt_path):  # never overwrite a run by accident
        raise ConfigError(f'{ckpt_path} exists; continue it with --init_from=resume, or choose '
                          'another out_dir')
    env = cli.runtime(cfg.device, cfg.dtype, cfg.seed, ddp)
    device, ctx, scaler, world, say = env.device, env.ctx, env.scaler, env.world, env.say
    # the weights to start from, unless resumed: another run's checkpoint (its backbone) or GPT-2's,
    # whose weights fix the backbone's fields, whatever the config said
    src = None if ckpt or cfg.init_from == 'scratch' else checkpoint.load_source(cfg.init_from)
    if src and src['kind'] == 'gpt2':
        fixed = ', '.join(f'{k}={v!r}' for k, v in src['model_args'].items())
        changed = ', '.join(f'{k} {getattr(cfg, k)!r}' for k, v in src['model_args'].items()
                            if getattr(cfg, k) != v)
        say(f'init_from={cfg.init_from} sets the backbone: {fixed}'
            + (f' (the config had {changed})' if changed else ''))
        cfg = replace(cfg, **src['model_args'])
    accum = grad_accum(cfg, world)
    loader, val, n_val = load_data(cfg, env)
    model, optimizer = build_model(cfg, ckpt, src, loader, env)
    # all else it takes to go on exactly as if never stopped: moments, data position, RNG
    step, tokens = checkpoint.restore(ckpt, optimizer, scaler, loader, env) if ckpt else (0, 0)
    resumed_at = saved_at = step if ckpt else None
    del ckpt, src  # free the CPU copies of the weights
    raw_model = model  # what is saved, evaluated, probed: no DDP wrapper, no 'module.' in its keys
    if ddp:
        model = DDP(model, device_ids=[env.local_rank] if env.kind == 'cuda' else None)
    peak = cli.peak_flops(device)  # dense bf16 FLOP/s of this GPU; None on CPU, MPS, an unknown GPU
    describe(cfg, raw_model, accum, world, peak, say)
    if env.master:  # the config first; a resumed run keeps the lines up to its checkpoint's step
        checkpoint.start_log(log_path, asdict(cfg), resumed_at)

    # routing statistics are measured on the first val batch: the same tokens at every eval
    x_routing = to_batch(val[: min(cfg.batch_size, n_val) * cfg.block_size + 1], cfg.block_size,
                         device)[0]
    train_loss = lr = pending = None  # pending: the last step's loss, on its way to the CPU
    win_tokens, win_time = 0, 0.0  # training tokens and seconds since the last log line
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not env.master, dynamic_ncols=True)
    while True:
        progress.step, progress.saved_at = step, saved_at
        rec = {}
        # evaluate, then checkpoint: at step 0, every eval_interval steps, and at the end
        evaluating = (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != resumed_at
        if pending and (evaluating or step % cfg.log_interval == 0):  # wanted now: wait for it
            t0 = time.perf_counter()
            train_loss, pending = read_loss(pending, accum * world, ckpt_path, saved_at), None
            if step > (resumed_at or 0) + 1:  # the GPU finishing a timed step: training time
                win_time += time.perf_counter() - t0
        if evaluating:
            val_loss = evaluate(raw_model, val, n_val, cfg, env)
            if not math.isfinite(val_loss):
                checkpoint.stop('val loss', val_loss, step, ckpt_path, saved_at)
            rec = {'val_loss': val_loss, **sharpness(raw_model, x_routing, env)}

        # a line of log.jsonl at each logged step; tok/s and MFU count only training time since the
        # last line. It is on disk before the step's checkpoint: a resume does not redo the step
        if env.master and (rec or (step % cfg.log_interval == 0 and train_loss is not None)):
            tok_s = win_tokens / win_time if win_time else None  # None: no timed step yet
            mfu = raw_model.estimate_mfu(tok_s / world, peak) if tok_s else None  # per GPU
            mem = torch.cuda.max_memory_allocated(device) / 2**20 if env.kind == 'cuda' else None
            checkpoint.append_log(log_path, {'step': step, 'tokens': tokens,
                                             'train_loss': train_loss, **rec, 'lr': lr,
                                             'tok_per_s': tok_s, 'mfu': mfu, 'peak_mem_mb': mem})
            hard_stop('log', step)
            win_tokens, win_time = 0, 0.0

        if evaluating and step > (resumed_at or 0):
            rngs = checkpoint.rng_states(env, ddp)  # every rank's: dropout resumes exactly
            if env.master:
                save_checkpoint({'model': raw_model.state_dict(), 'model_args': model_args(cfg),
                                 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                                 'step': step, 'tokens': tokens, 'data': loader.state(),
                                 'rng': rngs, 'config': asdict(cfg), 'val_loss': val_loss},
                                ckpt_path)
            saved_at = progress.saved_at = step
        if evaluating:
            say(f'step {step}: val loss {val_loss:.4f}'
                + (f', saved {ckpt_path}' if saved_at == step else ''))
        if step == cfg.max_iters:
            break
        if checkpoint.ctrl_c_seen(ddp, device):  # the safe point for Ctrl-C, between two steps
            raise Interrupted

        # one optimizer step: accum micro-batches on each rank, the gradient averaged over all
        t0 = time.perf_counter()
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_mult']  # lr_mult: routing_lr_mult for the variant's params, else 1
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            x, y = to_batch(loader.next_batch(), cfg.block_size, device)
            # DDP all-reduces the gradients in backward; only the last micro-step needs to
            with model.no_sync() if ddp and i < accum - 1 else nullcontext():
                with ctx:
                    _, loss = model(x, y)
                loss_sum += loss.detach()
                scaler.scale(loss / accum).backward()  # / accum: a mean over micro-steps
            hard_stop('step', step)  # in the middle of a step: nothing of it is on disk
        if ddp:
            dist.all_reduce(loss_sum)  # the same loss on every rank, so all of them stop on a NaN
        # the loss goes to the CPU behind the queued work, and is read a step later (or at the next
        # log line): waiting for it now would leave the GPU idle while the CPU queues the next step.
        # The last step's is here by now; a NaN in it stops the run before any checkpoint of the
        # weights it made
        if pending:
            train_loss, pending = read_loss(pending, accum * world, ckpt_path, saved_at), None
        done = torch.cuda.Event() if env.kind == 'cuda' else None
        pending = (loss_sum.to('cpu', non_blocking=done is not None), done, step + 1)
        if done:
            done.record()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + cfg.total_batch_size
        dt = time.perf_counter() - t0
        if step > (resumed_at or 0) + 1:  # a process's first step compiles: left out of tok/s
            win_tokens, win_time = win_tokens + cfg.total_batch_size, win_time + dt
        mfu = raw_model.estimate_mfu(cfg.total_batch_size / dt / world, peak)
        # the bar's loss is a step behind (None before the first is read)
        bar.set_postfix_str((f'loss {train_loss:.4f} | ' if train_loss is not None else '')
                            + f'{cfg.total_batch_size / dt:,.0f} tok/s'
                            + (f' | MFU {mfu:.1%}' if mfu else ''), refresh=False)
        bar.update()
    bar.close()
    if ddp:  # the ranks leave together: a rank that tore its gloo group down while rank 0 was still
        dist.barrier()  # saving the last checkpoint was aborted (SIGABRT) in 3 of 60 CPU test runs


if __name__ == '__main__':
    main()
