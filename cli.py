"""
The command line of train.py, sample.py, bench.py and compare.py: `--key=value` arguments over a dict of
defaults, each value read as the type of its default.

  --out_dir=out/run1            a string, as written (it may contain '=')
  --learning_rate=3e-4          a number; arithmetic is fine: --total_batch_size=16*1024*32
  --compile=false               a bool: 1, true, yes or 0, false, no, in any case

train.py also reads config files of `name = value` lines with the same rules (literal, check).
"""
import ast
import difflib
import operator

# arithmetic that a number may use, so that a value can show how it is made: total_batch_size = 32 * 1024 * 16
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
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
    """value, if key is one of the defaults and value has its default's type; an int is fine for a float."""
    if key not in defaults:  # most unknown keys are typos: the nearest names first, then all of them
        close = difflib.get_close_matches(key, defaults, n=3)
        raise ConfigError(f'{where}: unknown key {key!r}; ' + (f'did you mean {" or ".join(close)}? ' if close else '')
                          + f'known keys: {", ".join(defaults)}')
    kind = type(defaults[key])
    if kind is float and type(value) is int:  # learning_rate=1 means 1.0
        value = float(value)
    if type(value) is not kind:  # exact: True is not an int here, and 1.5 is not an int
        raise ConfigError(f'{where}: {key} expects {kind.__name__} (like its default {defaults[key]!r}), '
                          f'got {value!r} ({type(value).__name__})')
    return value


def override(arg, defaults):
    """(key, value) of one `--key=value` argument, the value read as the type of defaults[key]."""
    key, eq, raw = arg.removeprefix('--').partition('=')  # at the first '=': a value may hold more of them
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


def parse(argv, defaults, doc, passthrough=False):
    """defaults overridden by argv, for a script's main: --help prints doc and the defaults and exits with
    status 0; a bad argument exits with status 1 and a message naming it. With passthrough=True the arguments
    of unknown keys are returned too, unread, as (cfg, rest): compare.py hands them on to train.py."""
    if '-h' in argv or '--help' in argv:
        print(doc + '\noptions and defaults:\n' + '\n'.join(f'  --{k}={v}' for k, v in defaults.items()))
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
    return (cfg, rest) if passthrough else cfg
