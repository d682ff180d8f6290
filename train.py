"""
Train a GPT with any residual stream of model.py on token shards written by prepare.py.
Runs on a CPU, one GPU, or several GPUs with DDP; resumes exactly; logs what it measured.

  python train.py configs/cpu_quickstart.py                                  # CPU, a few minutes
  python train.py configs/gpt2_124m.py                                       # one GPU
  python train.py configs/gpt2_124m.py --batch_size=8 --compile=False        # with overrides
  torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py configs/gpt2_124m_ddp.py # 8 GPUs of one node
  python train.py --out_dir=out-gpt2-124m --init_from=resume                 # go on where it stopped
  python train.py configs/convert_delta.py --init_from=gpt2 --out_dir=out-gpt2-delta  # OpenAI's GPT-2 into Delta

Configuration: the defaults in `Config` below, then each config file (plain `name = value` lines, read with
ast, never executed) and `--key=value` override, in the order given; the later one wins. `--help` lists them.
A resumed run starts from the config in its checkpoint instead of the defaults.
Output in out_dir: ckpt.pt (the latest checkpoint) and log.jsonl (the config, then one line per logged step).
Ctrl-C stops when the current step is done (exit status 130; a second Ctrl-C stops at once), ready to resume.
"""
import ast
import hashlib
import inspect
import json
import math
import os
import signal
import sys
import textwrap
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, fields, replace
from importlib.util import find_spec

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import fast
import gpt2_weights
import routing
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
    init_from: str = 'scratch'     # 'scratch', 'resume' (from out_dir), another run's ckpt.pt or out_dir, or GPT-2:
                                   # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a Hugging Face folder of it
    eval_interval: int = 250       # evaluate, then write the checkpoint, every this many steps
    eval_iters: int = 0            # cap on val batches per rank, for a quick look; 0 = the whole val set
    val_tokens: int = 10_485_760   # val set = the first tokens of the val shard (as the speedrun); fewer if short
    log_interval: int = 10         # steps between lines of log.jsonl
    route_impl: str = 'auto'       # attnres/delta/ddl: 'plain' (model.py), 'fused' (fast/), 'auto' (fused where faster)
    # batch: tokens per step = batch_size * block_size * grad accumulation * world size
    total_batch_size: int = 524_288  # 2**19 tokens per optimizer step, GPT-2 124M's batch in llm.c
    batch_size: int = 16           # micro-batch per rank, in sequences; lower it if memory runs out
    # AdamW and the learning-rate schedule
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    max_iters: int = 19_073        # optimizer steps: 19,073 * 524,288 = 10.0B tokens
    lr_schedule: str = 'cosine'    # 'cosine' decay after warmup, or 'wsd': warmup, stable, then linear decay
    warmup_iters: int = 700
    cooldown_frac: float = 0.2     # wsd: the last fraction of the steps, which decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0         # clip the global gradient norm at this value; 0 = off
    routing_lr_mult: float = 1.0   # LR multiplier for the variant's own parameters (queries, gates)
    # system
    device: str = 'auto'           # 'auto' = cuda if available, else mps, else cpu; or e.g. 'cuda:1'
    dtype: str = 'auto'            # 'auto' = bfloat16 on GPUs that have it, else float32; or float16
    compile: bool = True           # torch.compile on CUDA; CPU and MPS always run eager
    seed: int = 1337


MODEL_KEYS = [f.name for f in fields(GPTConfig)]  # the keys of Config that build the model
# the fields of the backbone, which every variant shares and a conversion keeps
BACKBONE_KEYS = ['n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'bias', 'gelu_approx']
DEFAULTS = asdict(Config())  # every key and its default, whose type a value given for the key must have


def parse_config(argv, base=None):
    """The Config given by base (a dict such as a checkpoint's config; None = the defaults), then by argv's
    config files and --key=value overrides in order. Raises ConfigError naming the file or argument at fault."""
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
    # values that type-check but make no sense
    checks = [('lr_schedule', c.lr_schedule in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
              ('dtype', c.dtype in cli.DTYPES, ', '.join(cli.DTYPES)),
              ('route_impl', c.route_impl in fast.IMPLS, ', '.join(fast.IMPLS)),
              ('cooldown_frac', 0 <= c.cooldown_frac <= 1, 'in [0, 1]')]
    checks += [(k, getattr(c, k) > 0, '> 0') for k in
               ('batch_size', 'total_batch_size', 'eval_interval', 'log_interval', 'val_tokens')]
    checks += [(k, getattr(c, k) >= 0, '>= 0') for k in ('max_iters', 'warmup_iters', 'eval_iters', 'grad_clip')]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f'{key}={getattr(c, key)!r}: expected {expected}')
    return c


def model_args(cfg):
    """The GPTConfig fields of cfg: what a checkpoint stores as 'model_args'."""
    return {k: getattr(cfg, k) for k in MODEL_KEYS}

# -----------------------------------------------------------------------------
# data: sequential reads of uint16 token shards

class DataLoader:
    """Batches read in order from a list of uint16 token arrays (the train shards).
    At each micro-step the ranks together take the next B*T*world tokens of the current shard (+1 for the
    last target) and rank r reads the r-th part, so ranks never see the same tokens. A shard's tail too short
    for a whole micro-step is skipped; the first shard follows the last. The position (shard, pos) is the
    same on every rank, so rank 0's is all a checkpoint needs, whatever the world size on resume."""

    def __init__(self, shards, B, T, rank=0, world=1, names=None):
        self.shards, self.B, self.T, self.rank = shards, B, T, rank
        self.span = B * T * world  # tokens that the whole world reads per micro-step
        for i, s in enumerate(shards):  # a shard shorter than one micro-step would never be read
            if len(s) < self.span + 1:
                raise ConfigError(f'{names[i] if names else f"shard {i}"} has {len(s):,} tokens, fewer than one '
                                  f'micro-step needs: batch_size * block_size * world + 1 = {self.span + 1:,}')
        self.shard, self.pos = 0, 0

    def next_batch(self):
        """This rank's next window of B*T + 1 tokens: the inputs are [:-1], the targets [1:]."""
        if self.pos + self.span + 1 > len(self.shards[self.shard]):  # the world's next window doesn't fit
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
        start = self.pos + self.rank * self.B * self.T  # rank r: the r-th B*T tokens of the world's window
        self.pos += self.span  # the same on every rank
        return self.shards[self.shard][start: start + self.B * self.T + 1]

    def state(self):
        return {'shard': self.shard, 'pos': self.pos}

    def load_state(self, state):  # the modulo: a resumed run may have fewer shards
        self.shard, self.pos = state['shard'] % len(self.shards), state['pos']


def to_batch(window, T, device):
    """A window of n*T + 1 tokens -> inputs x and next-token targets y, both (n, T) int64 on device."""
    buf = torch.from_numpy(window.astype(np.int64))  # uint16 -> int64 token ids (a copy, off the memmap)
    x, y = buf[:-1].view(-1, T), buf[1:].view(-1, T)  # y is x shifted by one: each position predicts the next
    if device.startswith('cuda'):  # from pinned memory, the copy to the GPU runs asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# learning rate, evaluation, checkpoints

def get_lr(step, cfg):
    """Learning rate of optimizer step `step` (0-based): a linear warmup, then a cosine from learning_rate to
    min_lr, or for 'wsd' a flat stretch and then a linear decay over the last cooldown_frac of the steps.
    Both reach min_lr at the last step, max_iters - 1."""
    if step < cfg.warmup_iters:  # (step + 1): the first step already learns, at learning_rate / warmup_iters
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    last = cfg.max_iters - 1
    if cfg.lr_schedule == 'cosine':
        progress = min(1.0, (step - cfg.warmup_iters) / max(1, last - cfg.warmup_iters))  # 0 -> 1
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
    # wsd: e.g. 1,000 steps with cooldown_frac 0.2 hold learning_rate until step 800, then decay linearly
    decay_start = max(cfg.warmup_iters, cfg.max_iters - round(cfg.cooldown_frac * cfg.max_iters))
    progress = min(1.0, max(0, step - decay_start) / max(1, last - decay_start))
    return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, val, n_seq, cfg, rank, world, device, ctx):
    """Mean loss per token on the fixed val set: the first n_seq sequences of block_size tokens of the val
    shard. Rank r takes the r-th contiguous share, in micro-batches of batch_size; the loss sums and token
    counts are all-reduced, so the result depends on neither batch_size nor the world size."""
    T, B = cfg.block_size, cfg.batch_size
    lo, hi = rank * n_seq // world, (rank + 1) * n_seq // world  # e.g. 10,240 sequences, 8 ranks: 1,280 each
    if cfg.eval_iters:  # a quick look: fewer batches, so the number depends on batch_size and world size
        hi = min(hi, lo + cfg.eval_iters * B)
    totals = torch.zeros(2, dtype=torch.float64)  # (sum of per-token losses, number of tokens)
    model.eval()
    for s in range(lo, hi, B):
        x, y = to_batch(val[s * T: min(s + B, hi) * T + 1], T, device)  # the last batch may be smaller
        with ctx:
            _, loss = model(x, y)
        totals += torch.tensor([loss.item() * y.numel(), y.numel()])  # loss is a mean over y's tokens
    model.train()
    if world > 1:
        totals = totals.to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


class Progress:
    """Where the run is, for the message when Ctrl-C stops it: the step reached, the step of the last checkpoint,
    and how often Ctrl-C was pressed (once: stop at the next safe point; twice: stop now)."""
    step = saved_at = None
    ctrl_c = 0


progress = Progress()


class Interrupted(Exception):
    """Ctrl-C reached the training loop's safe point: the step is done and nothing is half-written."""


def on_ctrl_c(signum, frame):
    progress.ctrl_c += 1
    if progress.ctrl_c > 1:  # the user does not want to wait for the step (or an eval) to finish
        raise KeyboardInterrupt
    tqdm.write('Ctrl-C: stopping when this step is done (Ctrl-C again to stop at once)')


def hard_stop(point, step):
    """Test-only: with RESIDUAL_GPT_KILL=point:step in the environment (e.g. save:8) the process kills itself
    with SIGKILL when it reaches that point at that step, as a power cut would; tests/test_train.py resumes
    after each and checks that nothing was lost. Points: eval, forward, backward, log (the step's log line is
    on disk), save (the new checkpoint is in its temp file), rename (it has just become ckpt.pt), log_rewrite
    (a resumed run's log is in its temp file)."""
    if os.environ.get('RESIDUAL_GPT_KILL') == f'{point}:{step}':
        os.kill(os.getpid(), signal.SIGKILL)


# A checkpoint file is torch.save's bytes followed by a trailer with their SHA-256: b'\nresidual-gpt sha256 ',
# 64 hex digits, b'\n'. torch.load reads the file as it is (it ignores bytes after the archive), and
# load_checkpoint checks the digest first, so that a flipped bit or a torn copy is found before it is used.
TRAILER = b'\nresidual-gpt sha256 '
TRAILER_LEN = len(TRAILER) + 64 + 1
KEPT = 'nothing was changed: the files of the run, and the previous good state in them, are as they were'


class SaveError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class HashingWriter:
    """A file that also feeds every byte written to it into a hash: the digest of exactly what torch.save wrote."""

    def __init__(self, f, sha):
        self.f, self.sha = f, sha

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def save_checkpoint(ckpt, path):
    """Write to a temporary file, with the SHA-256 of its contents at the end, fsync it, then rename it over path.
    The rename is atomic, so a crash at any moment leaves either the previous checkpoint or the new one, never a
    torn file. A save that fails or is stopped removes the temporary file and leaves the previous checkpoint."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            sha = hashlib.sha256()
            torch.save(ckpt, HashingWriter(f, sha))
            f.write(TRAILER + sha.hexdigest().encode() + b'\n')
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them the checkpoint
        hard_stop('save', ckpt['step'])
        os.replace(tmp, path)
    except BaseException as e:  # disk full, no permission, a failed rename, Ctrl-C: no half-written file stays
        with suppress(OSError):
            os.remove(tmp)
        if progress.ctrl_c > 1:  # a second Ctrl-C stops now; torch.save may have turned it into a RuntimeError
            raise KeyboardInterrupt from None
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            why = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())
            previous = f'the previous {path} is unchanged' if os.path.exists(path) else 'no checkpoint was written'
            raise SaveError(f'cannot write the checkpoint {path}: {why}; {tmp} removed, {previous}') from None
        raise
    hard_stop('rename', ckpt['step'])
    if hasattr(os, 'O_DIRECTORY'):  # POSIX: make the rename itself durable too
        fd = os.open(os.path.dirname(path) or '.', os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def checksums(path):
    """(the SHA-256 stored in the file's trailer: None if it has none, '' if it is incomplete; the SHA-256 of the
    bytes before it)."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        f.seek(max(0, size - TRAILER_LEN))
        tail = f.read()
        stored = None
        if len(tail) == TRAILER_LEN and tail.startswith(TRAILER) and tail.endswith(b'\n'):
            stored = tail[len(TRAILER):-1].decode('ascii', errors='replace')
        elif TRAILER.strip() in tail:  # the trailer is there but cut short: the file lost its last bytes
            stored = ''
        f.seek(0)
        sha, left = hashlib.sha256(), size - (TRAILER_LEN if stored else 0)
        while left:  # in chunks: a checkpoint of GPT-2 124M with its optimizer is 1.5 GB
            chunk = f.read(min(left, 1 << 24))
            sha.update(chunk)
            left -= len(chunk)
    return stored, sha.hexdigest()


def load_checkpoint(path):
    """A checkpoint (path: ckpt.pt or its folder), loaded on the CPU with weights_only=True: tensors and plain
    values only, so that loading a file cannot run code. Every way a file can be unusable is a ConfigError
    that names the file and what is wrong with it."""
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ConfigError(f'no checkpoint at {path}')

    def refuse(problem):
        return ConfigError(f'{path} is not a usable checkpoint: {problem}; {KEPT}')
    size = os.path.getsize(path)
    if size == 0:
        raise refuse('the file is empty (0 bytes)')
    stored, actual = checksums(path)
    if stored == '':
        raise refuse(f'it is cut short ({size:,} bytes): the checksum at its end is incomplete')
    if stored is not None and stored != actual:
        raise refuse(f'its contents do not match the SHA-256 written with them ({size:,} bytes): the file was '
                     'changed or damaged after it was saved')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch's own message would suggest weights_only=False: never the fix for a bad file
        if stored is None:
            raise refuse(f'torch cannot read it and it has no checksum ({size:,} bytes): it is cut short, or not '
                         'a file written by train.py') from None
        raise refuse(f'its checksum matches but torch {torch.__version__} cannot read it ({type(e).__name__}): '
                     'written by another version of torch?') from None
    missing = {'model', 'model_args', 'config', 'step'} - set(ckpt if isinstance(ckpt, dict) else {})  # e.g. nanoGPT's
    if missing:
        raise refuse(f'it is not a checkpoint of train.py (no {", ".join(sorted(missing))})')
    if stored is None:  # readable and complete, but from before checkpoints carried a checksum
        print(f'note: {path} has no checksum (written by an older train.py); loaded without verifying it',
              file=sys.stderr)
    return ckpt


def init_kind(init_from):
    """What init_from names, from the files alone: 'scratch', 'resume', 'checkpoint' (a checkpoint of train.py,
    or a run's out_dir holding one) or 'gpt2' (one of gpt2_weights.NAMES, or a Hugging Face folder of GPT-2).
    Anything else is a ConfigError that says what was expected."""
    if init_from in ('scratch', 'resume'):
        return init_from
    if init_from in gpt2_weights.NAMES:
        return 'gpt2'
    if os.path.isfile(init_from) or os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
        return 'checkpoint'  # a run's out_dir wins, should a folder hold both kinds
    if gpt2_weights.is_hf_folder(init_from):
        return 'gpt2'
    if os.path.isdir(init_from):
        raise ConfigError(f'init_from={init_from}: the folder holds neither a checkpoint of train.py (ckpt.pt) nor '
                          f'GPT-2 weights ({gpt2_weights.EXPECTED})')
    raise ConfigError(f"init_from={init_from}: no such file or folder; expected 'scratch', 'resume', a checkpoint of "
                      f"train.py or a run's out_dir, {', '.join(gpt2_weights.NAMES)}, or a Hugging Face GPT-2 folder")


def load_source(init_from):
    """The weights that init_from names (neither 'scratch' nor 'resume'), as a dict like a checkpoint's: 'model'
    (a state_dict), 'model_args', 'data' (the train position to go on from: None for GPT-2, whose training data
    is not ours), 'kind' (of init_kind) and 'found' (what it is, in words, for the start-up line)."""
    kind = init_kind(init_from)
    if kind == 'checkpoint':
        src = load_checkpoint(init_from)
        return {**src, 'kind': kind, 'found': f'a checkpoint of train.py (residual={src["model_args"]["residual"]}, '
                                              f'step {src["step"]}, val loss {src["val_loss"]})'}
    args, sd, found = gpt2_weights.load(init_from)
    return {'model': sd, 'model_args': args, 'data': None, 'kind': kind, 'found': found}


def log_step(line):
    """The step of a line of log.jsonl (-1 for a config line); inf for a line cut short by a crash."""
    try:
        return json.loads(line).get('step', -1)
    except json.JSONDecodeError:
        return math.inf

# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print(__doc__ + '\n' + inspect.getsource(GPTConfig) + '\n' + inspect.getsource(Config))
        return
    ddp = 'RANK' in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    progress.step = progress.saved_at = None
    progress.ctrl_c = 0
    on_sigint = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        train(argv, ddp)
    except (ConfigError, ShardError, SaveError) as e:
        raise SystemExit(f'error: {e}') from None  # a clear message and exit status 1, no traceback
    except OSError as e:  # e.g. the disk filled up while log.jsonl was written
        raise SystemExit(f'error: {e}') from None  # str(e) names the file and the reason
    except (Interrupted, KeyboardInterrupt):
        at = 'before the first step' if progress.step is None else f'at step {progress.step}'
        last = ('no checkpoint yet' if progress.saved_at is None
                else f'last checkpoint step {progress.saved_at}; resume with --init_from=resume')
        print(f'interrupted {at}; {last}', file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as the shell reports a process that Ctrl-C ended
    finally:
        signal.signal(signal.SIGINT, on_sigint)
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def train(argv, ddp):
    cfg = parse_config(argv)
    ckpt_path, log_path = os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'log.jsonl')
    ckpt = None
    if cfg.init_from == 'resume':  # the checkpoint's config is the base; files and overrides given now win
        ckpt = load_checkpoint(ckpt_path)
        cfg = parse_config(argv, base={**ckpt['config'], 'out_dir': cfg.out_dir})
    elif os.path.exists(ckpt_path):  # never overwrite a run by accident
        raise ConfigError(f'{ckpt_path} exists; continue it with --init_from=resume, or choose another out_dir')

    # device and precision. Under torchrun: one process per GPU (NCCL), or CPU processes (gloo)
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    device = cli.pick_device(cfg.device)
    if ddp and device.startswith('cuda'):
        device = f'cuda:{local_rank}'  # one GPU per process
        torch.cuda.set_device(device)
    device_type = torch.device(device).type  # cuda, mps or cpu
    if ddp:
        if device_type not in ('cuda', 'cpu'):
            raise ConfigError(f'device={device}: DDP runs on cuda (NCCL) or cpu (gloo)')
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    master, say = rank == 0, (tqdm.write if rank == 0 else lambda *a: None)  # rank 0 prints, logs and saves
    dtype, why = cli.pick_dtype(cfg.dtype, device)
    # autocast runs the matmuls in bf16/fp16 while weights and optimizer state stay fp32. fp16 also needs
    # a loss scaler against gradient underflow; disabled, the scaler does nothing
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler('cuda', enabled=(dtype == 'float16'))
    if device_type == 'cuda':  # TF32 for the fp32 matmuls that remain: ~3x fp32 speed on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; DDP copies rank 0's initial weights to all

    # the weights to start from, unless resumed: another run's checkpoint (its backbone, of any variant) or GPT-2
    src = None if ckpt or cfg.init_from == 'scratch' else load_source(cfg.init_from)
    if src and src['kind'] == 'gpt2':  # GPT-2's weights fix its backbone's fields, whatever the config said
        fixed = ', '.join(f'{k}={v!r}' for k, v in src['model_args'].items())
        changed = ', '.join(f'{k} {getattr(cfg, k)!r}' for k, v in src['model_args'].items() if getattr(cfg, k) != v)
        cfg = replace(cfg, **src['model_args'])
        say(f'init_from={cfg.init_from} sets the backbone: {fixed}'
            + (f' (the config had {changed})' if changed else ''))

    # batch: the total is fixed in tokens, and grad accumulation makes up what the ranks don't
    micro = cfg.batch_size * cfg.block_size * world  # e.g. 32 * 1,024 * 8 GPUs = 262,144 tokens
    if cfg.total_batch_size % micro:
        raise ConfigError(f'total_batch_size={cfg.total_batch_size:,} is not a multiple of batch_size * block_size '
                          f'* world size = {cfg.batch_size} * {cfg.block_size} * {world} = {micro:,}')
    accum = cfg.total_batch_size // micro  # e.g. 524,288 / 262,144 = 2 micro-steps per optimizer step

    # data: the train shards, read in order, and the fixed val set
    train_paths = list_shards(cfg.data_dir, 'train')
    loader = DataLoader([load_shard(p) for p in train_paths], cfg.batch_size, cfg.block_size, rank, world, train_paths)
    val_path = list_shards(cfg.data_dir, 'val')[0]
    val = load_shard(val_path)
    n_val = min(cfg.val_tokens, len(val) - 1) // cfg.block_size  # whole sequences; the +1 is the last target
    if n_val == 0:
        raise ConfigError(f'{val_path} has {len(val)} tokens; the val set needs block_size + 1 = {cfg.block_size + 1}')

    # model: from scratch, resumed, or the backbone of another run's checkpoint (of any variant) or of GPT-2
    model = GPT(GPTConfig(**model_args(cfg)))
    loaded = ckpt or src
    if loaded:
        # a resumed model must match in every field but dropout; a converted one in its backbone, where the
        # number of heads and the block size would not show in every weight's shape. A field that an older
        # checkpoint lacks had its default value
        keys = [k for k in MODEL_KEYS if k != 'dropout'] if ckpt else BACKBONE_KEYS
        theirs = {k: loaded['model_args'].get(k, DEFAULTS[k]) for k in keys}
        diff = '; '.join(f'{k}: checkpoint {theirs[k]!r}, config {getattr(cfg, k)!r}'
                         for k in keys if theirs[k] != getattr(cfg, k))
        try:
            if diff:
                raise ValueError(diff)
            left = model.load_state_dict(loaded['model']) if ckpt else model.load_backbone(loaded['model'])
        except (ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's missing or unexpected keys
            raise ConfigError(f'cannot load {ckpt_path if ckpt else cfg.init_from} into this model: {e}') from None
    if src:  # a conversion goes on with the train tokens that its source has not seen; GPT-2 starts at the first
        if src['data']:
            loader.load_state(src['data'])
        data = f'shard {loader.shard}, token {loader.pos:,}' if src['data'] else 'the start of the train shards'
        say(f'init_from={cfg.init_from}: {src["found"]}; backbone loaded; at init: {", ".join(left) or "nothing"}; '
            f'train data from {data}')
    model.to(device)
    # the fast paths and compilation, applied to the built model from outside. fast.apply replaces the stream's
    # parameters, so it comes before the optimizer is made. raw_model stays the module whose state_dict has
    # no '_orig_mod.' or 'module.' in its keys (compile is in place; DDP wraps it below)
    fused = fast.apply(model, cfg.route_impl)
    raw_model, compiled = model, 'off'
    if cfg.compile and device_type != 'cuda':
        compiled = f'off ({device_type} runs eager)'
    elif cfg.compile and (sys.platform == 'win32' or find_spec('triton') is None):  # compile needs triton on CUDA
        compiled = 'off (no triton: not installed, or Windows; running eager)'
    elif cfg.compile:
        model.compile()
        compiled = 'on'
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device_type, cfg.routing_lr_mult)
    step = tokens = 0
    if ckpt:  # everything else it takes to go on exactly as if never stopped
        optimizer.load_state_dict(ckpt['optimizer'])  # AdamW's moments
        if ckpt['scaler']:  # empty unless the run used float16
            scaler.load_state_dict(ckpt['scaler'])
        step, tokens = ckpt['step'], ckpt['tokens']  # tokens: total_batch_size may change on resume
        loader.load_state(ckpt['data'])  # the next batch is the one the interrupted run would have read
        if len(ckpt['rng']) == world:  # one state per rank; dropout draws from them
            torch.set_rng_state(ckpt['rng'][rank]['torch'])
            if device_type == 'cuda' and ckpt['rng'][rank]['cuda'] is not None:  # None: saved on a CPU run
                torch.cuda.set_rng_state(ckpt['rng'][rank]['cuda'], device)
        else:
            say(f'note: {len(ckpt["rng"])} RNG states for {world} ranks: dropout masks differ from an unbroken run')
    resumed_at = saved_at = step if ckpt else None
    del ckpt, src, loaded  # free the CPU copies of the weights

    eval_model = model  # eval needs no DDP wrapper: there are no gradients to synchronise
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    # what this run is, derived: printed once, before the first step
    peak = cli.peak_flops(device)  # dense bf16 FLOP/s of this GPU; None on CPU, MPS or an unknown GPU (no MFU)
    gpu = f' ({torch.cuda.get_device_name(device)})' if device_type == 'cuda' else ''
    say(f'device {device}{gpu} x {world}; dtype {dtype} ({why}); compile {compiled}; routing {fused}')
    say(f'model: residual={cfg.residual}, {raw_model.get_num_params() / 1e6:.2f}M parameters, '
        f'{raw_model.flops_per_token() / 1e6:,.1f} MFLOP/token; peak {f"{peak:.3g} FLOP/s" if peak else "unknown"}')
    say(f'batch: {cfg.total_batch_size:,} tokens/step = {cfg.batch_size} B x {cfg.block_size} T x {accum} accum x '
        f'{world} ranks; {cfg.max_iters:,} steps = {cfg.max_iters * cfg.total_batch_size:,} tokens')
    say(f'data: {len(train_paths)} train shard(s); val = {n_val * cfg.block_size:,} tokens of {val_path}'
        + (f', at most {cfg.eval_iters} batches per rank' if cfg.eval_iters else ''))
    say('config: ' + textwrap.fill(' '.join(f'--{k}={v}' for k, v in asdict(cfg).items()), 110,
                                   subsequent_indent='  ', break_on_hyphens=False))  # the run, as arguments

    # log.jsonl: the config first. A resumed run keeps the lines up to its checkpoint (the later steps are
    # redone) and appends; the new file goes through a temp file and a rename, so a kill leaves the old or new one
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lines = []
        if resumed_at is not None and os.path.exists(log_path):
            with open(log_path) as f:
                lines = [line for line in f if log_step(line) <= step]
        resumed = {'resumed_from_step': step} if resumed_at is not None else {}
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(lines + [json.dumps({'config': asdict(cfg), **resumed}) + '\n'])
            f.flush()
            os.fsync(f.fileno())
        hard_stop('log_rewrite', step)
        os.replace(log_path + '.tmp', log_path)

    # routing statistics are measured on the first val batch: the same tokens at every eval
    x_routing = to_batch(val[: min(cfg.batch_size, n_val) * cfg.block_size + 1], cfg.block_size, device)[0]
    train_loss = lr = None
    win_tokens, win_time = 0, 0.0  # training tokens and seconds since the last log line
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not master, dynamic_ncols=True)
    while True:
        progress.step, progress.saved_at = step, saved_at
        rec = {}
        # evaluate, then checkpoint: at step 0, every eval_interval steps, and at the end
        evaluating = (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != resumed_at
        if evaluating:
            hard_stop('eval', step)
            val_loss = evaluate(eval_model, val, n_val, cfg, rank, world, device, ctx)
            if not math.isfinite(val_loss):
                stop('val loss', val_loss, step, ckpt_path, saved_at)
            rec['val_loss'] = val_loss
            raw_model.eval()
            with ctx:
                w = routing.weights(raw_model, x_routing) if master else None  # None for standard and ddl
            raw_model.train()
            if w is not None:  # how sharp each routed read is: its largest weight and its entropy (nats)
                rec['routing_max'], rec['routing_entropy'] = (t.tolist() for t in routing.stats(w))

        # a line of log.jsonl at each logged step. tok/s and MFU count only training time since the last line.
        # It is on disk before this step's checkpoint is: a resumed run does not redo its checkpoint's step
        if master and (rec or (step % cfg.log_interval == 0 and train_loss is not None)):
            tok_s = win_tokens / win_time if win_time else None  # None: no timed step yet
            mfu = raw_model.estimate_mfu(tok_s / world, peak) if tok_s else None  # per GPU, against its peak
            mem = torch.cuda.max_memory_allocated(device) / 2**20 if device_type == 'cuda' else None
            rec = {'step': step, 'tokens': tokens, 'train_loss': train_loss, **rec, 'lr': lr,
                   'tok_per_s': tok_s, 'mfu': mfu, 'peak_mem_mb': mem}
            with open(log_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
                f.flush()
                os.fsync(f.fileno())
            hard_stop('log', step)
            win_tokens, win_time = 0, 0.0

        if evaluating and step > (resumed_at or 0):
            cuda_rng = torch.cuda.get_rng_state(device) if device_type == 'cuda' else None
            rngs = [{'torch': torch.get_rng_state(), 'cuda': cuda_rng}] * world
            if ddp:  # every rank's state, so that dropout continues exactly on resume
                dist.all_gather_object(rngs, rngs[0])
            if master:
                save_checkpoint({'model': raw_model.state_dict(), 'model_args': model_args(cfg),
                                 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                                 'step': step, 'tokens': tokens, 'data': loader.state(), 'rng': rngs,
                                 'config': asdict(cfg), 'val_loss': val_loss}, ckpt_path)
            saved_at = progress.saved_at = step
        if evaluating:
            say(f'step {step}: val loss {val_loss:.4f}' + (f', saved {ckpt_path}' if saved_at == step else ''))
        if step == cfg.max_iters:
            break

        # the safe point for Ctrl-C: this step's log line and checkpoint are done, the next step not begun.
        # Under DDP every rank stops at the same step, whichever of them saw the signal
        stopping = progress.ctrl_c
        if ddp:
            flag = torch.tensor(stopping, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = flag.item()
        if stopping:
            raise Interrupted

        # one optimizer step: accum micro-batches on each rank, the gradient averaged over all of them
        t0 = time.perf_counter()
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_mult']  # lr_mult is routing_lr_mult for the variant's parameters, else 1
        loss_sum = torch.zeros((), device=device)
        for i in range(accum):
            x, y = to_batch(loader.next_batch(), cfg.block_size, device)
            # DDP all-reduces the gradients in backward; only the last micro-step needs to
            with model.no_sync() if ddp and i < accum - 1 else nullcontext():
                with ctx:
                    _, loss = model(x, y)
                hard_stop('forward', step)
                loss_sum += loss.detach()
                scaler.scale(loss / accum).backward()  # / accum: a mean over micro-steps; DDP averages ranks
                hard_stop('backward', step)
        if ddp:
            dist.all_reduce(loss_sum)  # the same loss on every rank, so that all of them stop on a NaN
        train_loss = loss_sum.item() / (accum * world)  # .item() waits for the GPU, so dt below is real
        if not math.isfinite(train_loss):  # checked before the update: the weights are still good
            stop('train loss', train_loss, step + 1, ckpt_path, saved_at)
        if cfg.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + cfg.total_batch_size
        dt = time.perf_counter() - t0
        if step > (resumed_at or 0) + 1:  # a process's first step compiles: it is left out of tok/s
            win_tokens, win_time = win_tokens + cfg.total_batch_size, win_time + dt
        mfu = raw_model.estimate_mfu(cfg.total_batch_size / dt / world, peak)
        bar.set_postfix_str(f'loss {train_loss:.4f} | {cfg.total_batch_size / dt:,.0f} tok/s'
                            + (f' | MFU {mfu:.1%}' if mfu else ''), refresh=False)
        bar.update()
    bar.close()


def stop(what, value, step, ckpt_path, saved_at):
    """Exit on a NaN or inf loss, naming the step; the checkpoint on disk is left as it is."""
    kept = f'the last good checkpoint, {ckpt_path} at step {saved_at}, is kept' if saved_at else 'nothing was saved'
    raise SystemExit(f'error: {what} is {value} at step {step}; stopping ({kept}). Try a lower learning_rate '
                     f'or a longer warmup_iters, from the checkpoint with --init_from=resume')


if __name__ == '__main__':
    main()
