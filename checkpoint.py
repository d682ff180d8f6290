"""
What makes a run safe to stop and to resume, for train.py: checkpoints that carry their own checksum
and are replaced atomically, the loading of a checkpoint (or of another run's weights, or GPT-2's)
with a clear message for every way a file can be unusable, log.jsonl's lines, and Ctrl-C.

A checkpoint file is torch.save's bytes followed by a trailer with their SHA-256:
b'\nresidual-gpt sha256 ', 64 hex digits, b'\n'. torch.load reads the file as it is (it ignores
bytes after the archive), and load_checkpoint checks the digest first, so that a flipped bit or a
torn copy is found before it is used.
"""
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import sys
from contextlib import suppress

import torch
from tqdm import tqdm

import gpt2_weights
from cli import ConfigError
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Ctrl-C and the kill points of the tests

class Progress:
    """Where the run is, for the message when Ctrl-C stops it: the step reached, the last
    checkpoint's step, and how often Ctrl-C was pressed (once: stop at the next safe point; twice:
    stop now). Under DDP, sent: the counts all-reduced at the last safe point (ctrl_c_seen)."""
    step = saved_at = sent = None
    ctrl_c = 0


progress = Progress()


class Interrupted(Exception):
    """Ctrl-C reached the training loop's safe point: the step is done, nothing is half-written."""


def on_ctrl_c(signum, frame):
    progress.ctrl_c += 1
    if progress.ctrl_c > 1:  # the user does not want to wait for the step (or an eval) to finish
        raise KeyboardInterrupt
    tqdm.write('Ctrl-C: stopping when this step is done (Ctrl-C again to stop at once)')


def hard_stop(point, step):
    """Test-only: with RESIDUAL_GPT_KILL=point:step in the environment (e.g. save:8) the process
    kills itself with SIGKILL when it reaches that point at that step, as a power cut would;
    tests/test_train.py resumes after each and checks that nothing was lost. Points: step (a
    micro-step's backward is done, nothing of the step is on disk), log (the step's log line is),
    save (the new checkpoint is in its temp file), rename (it has just become ckpt.pt), log_rewrite
    (a resumed run's log is in its temp file)."""
    if os.environ.get('RESIDUAL_GPT_KILL') == f'{point}:{step}':
        os.kill(os.getpid(), signal.SIGKILL)


# -----------------------------------------------------------------------------
# checkpoints

TRAILER = b'\nresidual-gpt sha256 '
TRAILER_LEN = len(TRAILER) + 64 + 1
KEPT = ('nothing was changed: the files of the run, and the previous good state in them, '
        'are as they were')


class SaveError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class HashingWriter:
    """A file that also feeds every byte written to it into a hash: the digest of exactly what
    torch.save wrote."""

    def __init__(self, f, sha):
        self.f, self.sha = f, sha

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def free_mb(path):
    """Free space, in MiB, on the file system that holds path (a file that may not exist yet)."""
    with suppress(OSError):
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free // 2**20
    return math.inf


def save_checkpoint(ckpt, path):
    """Write to a temporary file, with the SHA-256 of its contents at the end, fsync it, then rename
    it over path. The rename is atomic, so a crash at any moment leaves either the previous
    checkpoint or the new one, never a torn file. A save that fails or is stopped removes the
    temporary file and leaves the previous checkpoint."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            sha = hashlib.sha256()
            torch.save(ckpt, HashingWriter(f, sha))
            f.write(TRAILER + sha.hexdigest().encode() + b'\n')
            f.flush()
            # the bytes reach the disk before the rename makes them the checkpoint
            os.fsync(f.fileno())
        hard_stop('save', ckpt['step'])
        os.replace(tmp, path)
    # disk full, no permission, a failed rename, Ctrl-C: no half-written file stays
    except BaseException as e:
        # torch's zip writer reports a full disk in words of its own: the free space tells, before
        # the temporary file is removed (which frees what it took)
        full = isinstance(e, RuntimeError) and free_mb(tmp) < 64
        with suppress(OSError):
            os.remove(tmp)
        # a second Ctrl-C stops now; torch.save may have turned it into a RuntimeError
        if progress.ctrl_c > 1:
            raise KeyboardInterrupt from None
        # torch.save reports a failed write as a RuntimeError
        if isinstance(e, (OSError, RuntimeError)):
            why = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())
            why = f'no space left on device (torch: {why})' if full else why
            previous = (f'the previous {path} is unchanged' if os.path.exists(path)
                        else 'no checkpoint was written')
            raise SaveError(f'cannot write the checkpoint {path}: {why}; {tmp} removed, '
                            f'{previous}') from None
        raise
    hard_stop('rename', ckpt['step'])
    if hasattr(os, 'O_DIRECTORY'):  # POSIX: make the rename itself durable too
        fd = os.open(os.path.dirname(path) or '.', os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def checksums(path):
    """(the SHA-256 stored in the file's trailer: None if it has none, '' if it is incomplete; the
    SHA-256 of the bytes before it)."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        f.seek(max(0, size - TRAILER_LEN))
        tail = f.read()
        stored = None
        if len(tail) == TRAILER_LEN and tail.startswith(TRAILER) and tail.endswith(b'\n'):
            stored = tail[len(TRAILER):-1].decode('ascii', errors='replace')
        # the trailer is there but cut short: the file lost its last bytes
        elif TRAILER.strip() in tail:
            stored = ''
        f.seek(0)
        sha, left = hashlib.sha256(), size - (TRAILER_LEN if stored else 0)
        while left:  # in chunks: a checkpoint of GPT-2 124M with its optimizer is 1.5 GB
            chunk = f.read(min(left, 1 << 24))
            sha.update(chunk)
            left -= len(chunk)
    return stored, sha.hexdigest()


def load_checkpoint(path):
    """A checkpoint (path: ckpt.pt or its folder), loaded on the CPU with weights_only=True: tensors
    and plain values only, so that loading a file cannot run code. Every way a file can be unusable
    is a ConfigError that names the file and what is wrong with it."""
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
        raise refuse(f'its contents do not match the SHA-256 written with them ({size:,} bytes): '
                     'the file was changed or damaged after it was saved')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    # torch's own message would suggest weights_only=False: never the fix for a bad file
    except Exception as e:
        if stored is None:
            raise refuse(f'torch cannot read it and it has no checksum ({size:,} bytes): '
                         'it is cut short, or not a file written by train.py') from None
        raise refuse(f'its checksum matches but torch {torch.__version__} cannot read it '
                     f'({type(e).__name__}): written by another version of torch?') from None
    missing = ({'model', 'model_args', 'config', 'step'}
               - set(ckpt if isinstance(ckpt, dict) else {}))  # e.g. nanoGPT's
    if missing:
        raise refuse(f'it is not a checkpoint of train.py (no {", ".join(sorted(missing))})')
    if stored is None:  # readable and complete, but from before checkpoints carried a checksum
        print(f'note: {path} has no checksum (written by an older train.py); '
              f'loaded without verifying it', file=sys.stderr)
    return ckpt


# the fields of the backbone, which every variant shares and a conversion keeps
BACKBONE_KEYS = ['n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'bias', 'gelu_approx']


def load_weights(model, loaded, resumed, cfg, where):
    """Load a checkpoint's weights into model: all of them for a resumed run, whose model must match
    in every field but dropout; only the backbone for a conversion (another run of any variant, or
    GPT-2), which must match in the backbone's fields: the number of heads and the block size would
    not show in every weight's shape. A field that an older checkpoint lacks had its default value.
    Returns the names left at init."""
    defaults = GPTConfig()
    keys = ([k for k in GPTConfig.__dataclass_fields__ if k != 'dropout'] if resumed
            else BACKBONE_KEYS)
    theirs = {k: loaded['model_args'].get(k, getattr(defaults, k)) for k in keys}
    diff = '; '.join(f'{k}: checkpoint {theirs[k]!r}, config {getattr(cfg, k)!r}'
                     for k in keys if theirs[k] != getattr(cfg, k))
    try:
        if diff:
            raise ValueError(diff)
        return (model.load_state_dict(loaded['model']) if resumed
                else model.load_backbone(loaded['model']))
    # RuntimeError: load_state_dict's missing or unexpected keys
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f'cannot load {where} into this model: {e}') from None


def restore(ckpt, optimizer, scaler, loader, env):
    """Everything a resumed run needs besides the weights to go on exactly as if never stopped:
    AdamW's moments, the loss scaler, the data position and every rank's RNG state.
    Returns (step, tokens)."""
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scaler']:  # empty unless the run used float16
        scaler.load_state_dict(ckpt['scaler'])
    loader.load_state(ckpt['data'])  # the next batch is the one the interrupted run would have read
    if len(ckpt['rng']) == env.world:  # one state per rank; dropout draws from them
        torch.set_rng_state(ckpt['rng'][env.rank]['torch'])
        # None: saved on a CPU run
        if env.kind == 'cuda' and ckpt['rng'][env.rank]['cuda'] is not None:
            torch.cuda.set_rng_state(ckpt['rng'][env.rank]['cuda'], env.device)
    else:
        env.say(f'note: {len(ckpt["rng"])} RNG states for {env.world} ranks: '
                f'dropout masks differ from an unbroken run')
    return ckpt['step'], ckpt['tokens']  # tokens: total_batch_size may change on resume


def rng_states(env, ddp):
    """The RNG states of every rank, for the checkpoint (all ranks must call this under DDP)."""
    cuda_rng = torch.cuda.get_rng_state(env.device) if env.kind == 'cuda' else None
    rngs = [{'torch': torch.get_rng_state(), 'cuda': cuda_rng}] * env.world
    if ddp:
        torch.distributed.all_gather_object(rngs, rngs[0])
    return rngs


def load_model(path, device):
    """The model of a train.py checkpoint, in eval mode on device, and the checkpoint dict
    (sample.py, compare.py). GPTConfig's fields only: a checkpoint of an older train.py also stored
    route_impl among them."""
    # verified, on the CPU: its optimizer and RNG states need not go to a GPU
    ckpt = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**{k: v for k, v in ckpt['model_args'].items()
                                 if k in GPTConfig.__dataclass_fields__}))
        # the variant it was trained as: every key must fit
        model.load_state_dict(ckpt['model'], strict=True)
    except Exception as e:  # weights that do not fit their model_args
        # torch's messages span lines and can list hundreds of keys
        why = ' '.join(str(e).split())[:800]
        raise ConfigError(f'cannot load checkpoint {path}: {type(e).__name__}: {why}') from None
    return model.to(device).eval(), ckpt

# -----------------------------------------------------------------------------
# init_from: where a run's first weights come from

def init_kind(init_from):
    """What init_from names, from the files alone: 'scratch', 'resume', 'checkpoint' (a checkpoint
    of train.py, or a run's out_dir holding one) or 'gpt2' (one of gpt2_weights.NAMES, or a Hugging
    Face folder of GPT-2). Anything else is a ConfigError that says what was expected."""
    if init_from in ('scratch', 'resume'):
        return init_from
    if init_from in gpt2_weights.NAMES:
        return 'gpt2'
    if os.path.isfile(init_from) or os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
        return 'checkpoint'  # a run's out_dir wins, should a folder hold both kinds
    if gpt2_weights.is_hf_folder(init_from):
        return 'gpt2'
    if os.path.isdir(init_from):
        raise ConfigError(f'init_from={init_from}: the folder holds neither a checkpoint of '
                          f'train.py (ckpt.pt) nor GPT-2 weights ({gpt2_weights.EXPECTED})')
    raise ConfigError(f"init_from={init_from}: no such file or folder; expected 'scratch', "
                      f"'resume', a checkpoint of train.py or a run's out_dir, "
                      f"{', '.join(gpt2_weights.NAMES)}, or a Hugging Face GPT-2 folder")


def load_source(init_from):
    """The weights that init_from names (neither 'scratch' nor 'resume'), as a dict like a
    checkpoint's: 'model' (a state_dict), 'model_args', 'data' (the train position to go on from:
    None for GPT-2, whose training data is not ours), 'kind' (of init_kind) and 'found' (what it is,
    in words, for the start-up line)."""
    kind = init_kind(init_from)
    if kind == 'checkpoint':
        src = load_checkpoint(init_from)
        return {**src, 'kind': kind,
                'found': f'a checkpoint of train.py (residual={src["model_args"]["residual"]}, '
                         f'step {src["step"]}, val loss {src["val_loss"]})'}
    args, sd, found = gpt2_weights.load(init_from)
    return {'model': sd, 'model_args': args, 'data': None, 'kind': kind, 'found': found}


# -----------------------------------------------------------------------------
# log.jsonl: the config first, then one line per logged step, each on disk (fsync) before the
# step's checkpoint

def start_log(path, config, resumed_step):
    """Begin log.jsonl. A resumed run keeps the lines up to its checkpoint's step (the later steps
    are redone) and appends; the new file goes through a temp file and a rename, so a kill leaves
    the old or the new one."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    lines = []
    if resumed_step is not None and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if log_step(line) <= resumed_step]
    resumed = {'resumed_from_step': resumed_step} if resumed_step is not None else {}
    with open(path + '.tmp', 'w') as f:
        f.writelines(lines + [json.dumps({'config': config, **resumed}) + '\n'])
        f.flush()
        os.fsync(f.fileno())
    hard_stop('log_rewrite', resumed_step)
    os.replace(path + '.tmp', path)


def append_log(path, rec):
    with open(path, 'a') as f:
        f.write(json.dumps(rec) + '\n')
        f.flush()
        os.fsync(f.fileno())


def os_error(e):
    """An OSError in one line that names the file: 'no space left on device', not errno's number."""
    if e.errno == errno.ENOSPC:
        return f'{e.filename or "a file"}: no space left on device'
    return str(e)


def log_step(line):
    """The step of a log.jsonl line (-1 for a config line); inf for a line cut short by a crash."""
    try:
        return json.loads(line).get('step', -1)
    except json.JSONDecodeError:
        return math.inf


def ctrl_c_seen(ddp, device):
    """Ctrl-C seen, asked at the safe point: this step's log line and checkpoint are done, the next
    step not begun. Under DDP every rank stops at the same step, whichever rank saw the signal:
    each sends its count at every safe point (an all-reduce, MAX) and acts on the counts sent at
    the safe point before, so a DDP run stops one step later than a single process. Reading this
    point's own would make the CPU wait for the GPU to finish the step it has just queued, before it
    could queue the next: a GPU idle at every step (train.py reads its loss a step late likewise)."""
    if not ddp:
        return progress.ctrl_c
    seen = 0
    if progress.sent is not None:
        flag, wait = progress.sent
        wait()  # CUDA: the copy of the last point's counts, long done on the GPU by now
        seen = int(flag)
    if not seen:  # every rank has the same counts: all of them send again, or all stop
        # a fill kernel, not torch.tensor: a copy from the CPU's memory would wait for the GPU too
        flag = torch.full((), progress.ctrl_c, device=device)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        wait = work.wait
        if flag.is_cuda:  # the stream (not the CPU) waits for the all-reduce, then copies
            work.wait()
            flag, done = flag.to('cpu', non_blocking=True), torch.cuda.Event()
            done.record()
            wait = done.synchronize
        progress.sent = (flag, wait)
    return seen


def stop(what, value, step, ckpt_path, saved_at):
    """Exit on a NaN or inf loss, naming the step; the checkpoint on disk is left as it is."""
    kept = (f'the last good checkpoint, {ckpt_path} at step {saved_at}, is kept' if saved_at
            else 'nothing was saved')
    raise SystemExit(f'error: {what} is {value} at step {step}; stopping ({kept}). Try a lower '
                     'learning_rate or a longer warmup_iters, from the checkpoint with '
                     '--init_from=resume')
