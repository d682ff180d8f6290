"""
The configuration of every script (train.py, sample.py, prepare.py, bench.py, compare.py):
`--key=value` arguments over a dict of defaults, each value read as the type of its default.

  --out_dir=out/run1            a string, as written (it may contain '=')
  --learning_rate=3e-4          a number; arithmetic is fine: --total_batch_size=16*1024*32
  --compile=false               a bool: 1, true, yes or 0, false, no, in any case

train.py also reads config files of `name = value` lines with the same rules (read_config_file:
parsed with ast, never executed). Below them, the choices every script makes the same way: the named
variants, the device and its precision, and a GPU's peak FLOP/s for MFU.
"""
import ast
import difflib
import operator
import warnings

# arithmetic that a number may use, so that a value can show how it is made:
# total_batch_size = 32 * 1024 * 16
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
       ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
       ast.USub: operator.neg, ast.UAdd: operator.pos}
BOOLS = {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}


class ConfigError(ValueError):
    """A bad argument, config file or checkpoint; the message names it and what was expected."""


def literal(node, where):
    """The value of an ast node that is a number, string, True/False, or arithmetic on numbers."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool):
        return node.value
    if type(getattr(node, 'op', None)) in OPS:  # -x, or x op y
        operands = [node.operand] if isinstance(node, ast.UnaryOp) else [node.left, node.right]
        args = [literal(a, where) for a in operands]
        if all(type(a) in (int, float) for a in args):  # no 'a' * 3, no True + 1
            return OPS[type(node.op)](*args)
    raise ConfigError(f'{where}: expected a number, string, True/False or arithmetic on numbers, '
                      f'got `{ast.unparse(node)}`')


def check(key, value, defaults, where):
    """value, if key is in defaults and value has its default's type; an int is fine for a float."""
    # most unknown keys are typos: the nearest names first, then all of them
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        raise ConfigError(f'{where}: unknown key {key!r}; '
                          + (f'did you mean {" or ".join(close)}? ' if close else '')
                          + f'known keys: {", ".join(defaults)}')
    kind = type(defaults[key])
    if kind is float and type(value) is int:  # learning_rate=1 means 1.0
        value = float(value)
    if type(value) is not kind:  # exact: True is not an int here, and 1.5 is not an int
        raise ConfigError(f'{where}: {key} expects {kind.__name__} '
                          f'(like its default {defaults[key]!r}), '
                          f'got {value!r} ({type(value).__name__})')
    return value


def override(arg, defaults):
    """(key, value) of one `--key=value` argument, the value read as the type of defaults[key]."""
    # at the first '=': a value may hold more of them
    key, eq, raw = arg.removeprefix('--').partition('=')
    where = f'argument {arg}'
    if not arg.startswith('--') or not eq:
        raise ConfigError(f'{where}: expected --key=value')
    kind = type(defaults.get(key, ''))  # an unknown key is reported by check
    if kind is str:
        value = raw  # strings need no quotes: --out_dir=out/run1
    elif kind is bool:
        if raw.lower() not in BOOLS:
            raise ConfigError(f'{where}: {key} expects bool: 1, true, yes or 0, false, no')
        value = BOOLS[raw.lower()]
    else:  # numbers, with the same rules as in a config file
        try:
            value = literal(ast.parse(raw.strip(), mode='eval').body, where)
        except SyntaxError:
            raise ConfigError(f'{where}: cannot read {raw!r} as a {kind.__name__}') from None
    return key, check(key, value, defaults, where)


def parse(argv, defaults, doc, rules=None, passthrough=False):
    """defaults overridden by argv, for a script's main: --help prints doc and the defaults and
    exits with status 0; a bad argument, or a value that breaks one of the rules, exits with status
    1 and one line naming it, before the script does any work. With passthrough=True the arguments
    of unknown keys are returned too, unread, as (cfg, rest): compare.py hands them on to train.py.
    """
    if '-h' in argv or '--help' in argv:
        print(doc + '\noptions and defaults:\n'
              + '\n'.join(f'  --{k}={v}' for k, v in defaults.items()))
        raise SystemExit(0)
    cfg, rest = dict(defaults), []
    for arg in argv:
        if passthrough and arg.removeprefix('--').partition('=')[0] not in defaults:
            rest.append(arg)
            continue
        try:
            key, value = override(arg, defaults)
        except ConfigError as e:
            raise SystemExit(f'error: {e}') from None
        cfg[key] = value
    try:
        check_rules(cfg, rules or {}, '--')
    except ConfigError as e:
        raise SystemExit(f'error: {e}') from None
    return (cfg, rest) if passthrough else cfg


def check_rules(cfg, rules, prefix=''):
    """rules: {key: (test, expected)}, each test a function of the value (and of the whole cfg, for
    rules that relate two keys). The first value that fails is a ConfigError:
    '--key=value: expected ...'."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    for key, (test, expected) in rules.items():
        value = get(key)
        ok = test(value, cfg) if test.__code__.co_argcount == 2 else test(value)
        if not ok:
            raise ConfigError(f'{prefix}{key}={value!r}: expected {expected}')


def read_config_file(path):
    """The `name = value` lines of a config file, as [(name, value, 'file:line')]; nothing runs."""
    try:  # parsed, never run: a config file cannot import, call, or set anything but known keys
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except OSError as e:
        raise ConfigError(f'cannot read config file {path}: {e.strerror}') from None
    except SyntaxError as e:
        raise ConfigError(f'{path}:{e.lineno}: syntax error: {e.msg}') from None
    out = []
    for node in tree.body:
        where = f'{path}:{node.lineno}'
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f'{where}: a config file holds only `name = value` lines, '
                              f'got `{ast.unparse(node)}`')
        out.append((node.targets[0].id, literal(node.value, where), where))
    return out

# --------------------------------------------------------------------------------------------------
# The named variants (GPTConfig fields): the seven forms bench.py, compare.py and the tests run

VARIANTS = {
    'standard': dict(residual='standard'),
    'ddl': dict(residual='ddl', ddl_dv=1),
    'ddl_dv4': dict(residual='ddl', ddl_dv=4),
    'attnres': dict(residual='attnres', res_block=0),
    # 6 sublayers a block: 4 blocks at 12 layers
    'attnres_block': dict(residual='attnres', res_block=6),
    'delta': dict(residual='delta', res_block=0),
    'delta_block': dict(residual='delta', res_block=6),
}

# the routing code: fused (fast/) where it measured faster, or as named
ROUTE_IMPLS = ('auto', 'plain', 'fused')


def fast_paths(model, impl):
    """fast.apply(model, impl): the fused GPU paths of fast/, applied to a built model from outside.
    A student copy of the project leaves fast/ out (it re-implements the exercises' math): 'auto'
    then runs the plain code, 'fused' is an error."""
    try:
        import fast
    except ImportError:
        if impl == 'fused':
            raise ConfigError(
                "route_impl='fused': this copy of the project has no fast/ folder") from None
        return 'plain (no fast/ here)'
    return fast.apply(model, impl)

# --------------------------------------------------------------------------------------------------
# Device and precision

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def pick_device(device):
    """'auto' -> cuda if there is one, else mps, else cpu; others are checked on this machine."""
    import torch
    if device == 'auto':
        return ('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available()
                else 'cpu')
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(
            f"device={device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'device={device}: this machine has no CUDA GPU that torch can use '
                          f'(try device=cpu)')
    if kind == 'cuda' and torch.device(device).index is not None and \
            torch.device(device).index >= torch.cuda.device_count():
        raise ConfigError(f'device={device}: this machine has '
                          f'{torch.cuda.device_count()} CUDA GPU(s)')
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f'device={device}: MPS is not available on this machine (try device=cpu)')
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ConfigError(f"device={device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def pick_dtype(dtype, device):
    """(dtype, why): 'auto' -> bfloat16 on a GPU that has it (Ampere and newer), else float32."""
    import torch
    if dtype not in DTYPES:
        raise ConfigError(f'dtype={dtype!r}: expected one of {", ".join(DTYPES)}')
    kind = torch.device(device).type
    if dtype == 'float16' and kind != 'cuda':
        raise ConfigError(f'dtype=float16 needs a CUDA device (its loss scaler is CUDA-only), '
                          f'got {device}')
    if dtype != 'auto':
        return dtype, 'set'
    if kind == 'cuda' and torch.cuda.is_bf16_supported():
        return 'bfloat16', 'auto: this GPU has bf16'
    return 'float32', f'auto: {kind}'


def autocast(device, dtype):
    """The context that runs the matmuls in dtype (bfloat16, float16) on device while weights stay
    fp32; float32 needs none."""
    import torch
    from contextlib import nullcontext
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def runtime(device, dtype, seed, ddp):
    """Processes, device and precision of a training run. Under torchrun: one process per GPU
    (NCCL), or CPU processes (gloo). Rank 0 prints, logs and saves."""
    import os
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    env = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')
    rank, local_rank, world = (int(os.environ[k]) for k in env) if ddp else (0, 0, 1)
    device = pick_device(device)
    if ddp and device.startswith('cuda'):
        device = f'cuda:{local_rank}'  # one GPU per process
        torch.cuda.set_device(device)
    kind = torch.device(device).type  # cuda, mps or cpu
    if ddp:
        if kind not in ('cuda', 'cpu'):
            raise ConfigError(f'device={device}: DDP runs on cuda (NCCL) or cpu (gloo)')
        dist.init_process_group('nccl' if kind == 'cuda' else 'gloo')
    dtype, why = pick_dtype(dtype, device)
    if kind == 'cuda':  # TF32 for the fp32 matmuls that remain: ~3x fp32 speed on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed + rank)  # dropout differs per rank; DDP copies rank 0's initial weights
    # weights and optimizer state stay fp32 under autocast. fp16 also needs a loss scaler against
    # gradient underflow; disabled, the scaler does nothing
    return SimpleNamespace(rank=rank, local_rank=local_rank, world=world, device=device, kind=kind,
                           dtype=dtype, why=why, master=rank == 0, ctx=autocast(device, dtype),
                           say=tqdm.write if rank == 0 else lambda *a: None,
                           scaler=torch.amp.GradScaler('cuda', enabled=(dtype == 'float16')))


def compile_model(model, want, kind):
    """model.compile() in place where it can run (CUDA with triton; CPU and MPS run eager), so that
    the state_dict keeps its keys (no '_orig_mod.'). Returns what was done, in words."""
    import sys
    from importlib.util import find_spec
    if not want:
        return 'off'
    if kind != 'cuda':
        return f'off ({kind} runs eager)'
    if sys.platform == 'win32' or find_spec('triton') is None:  # torch.compile needs triton on CUDA
        return 'off (no triton: not installed, or Windows; running eager)'
    quiet_inductor()
    model.compile()
    return 'on'


def quiet_inductor():
    """Silence one Inductor notice: compiling the plain routed softmax (a few sources a token), it
    says 'Online softmax is disabled on the fly since Inductor decides to split the reduction', six
    lines each time, about its own choice of kernel; nothing to act on. Other warnings still show."""
    warnings.filterwarnings('ignore', message=r'\s*Online softmax is disabled', category=UserWarning)


# dense bf16 peak FLOP/s by device name, for MFU (vendor data sheets, without sparsity)
PEAK_FLOPS = [('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
              ('L40S', 362e12), ('L4', 121e12), ('A10G', 70e12), ('RTX 4090', 165e12),
              ('RTX 3090', 71e12)]


def peak_flops(device):
    """The bf16 peak of a CUDA device from PEAK_FLOPS, or None (CPU, MPS, a GPU not in the table:
    no MFU)."""
    import torch
    device = torch.device(device)
    if device.type != 'cuda':
        return None
    # e.g. 'NVIDIA H100 80GB HBM3'; the first matching key wins
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)
