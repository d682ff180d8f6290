"""
Classroom exercises cut from model.py, and their autograder.

  python exercises.py list                       # the exercises, with difficulty and time estimate
  python exercises.py make 4 --out=ex4           # a student copy of the project with exercise 4 cut out
  cd ex4 && python exercises.py check 4          # grade it: pass/fail and a message per test, then a score
  python exercises.py check 4 --dir=ex4 --json   # the same as JSON, for a gradebook

model.py stays the solution and carries no markers: `make` parses it with `ast`, finds the exercise's functions
by their qualified names (e.g. `DeepDelta.write`; a class name means all of its methods) and replaces each body,
below its signature and docstring, with `raise NotImplementedError`. Then it checks that no line of a removed
body survives anywhere in the copy. Statements and tests live in exercises/ as NN_name.md and NN_name_test.py.
The tests check properties and reference values computed in the test (float64 loops, the papers' invariants),
never the solution's source, so any correct implementation passes. `check` exits 0 only when every test passes.
"""

import ast
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
Exercise = namedtuple('Exercise', 'number name targets difficulty minutes summary')
EXERCISES = [
    Exercise(1, 'depth_route', ('depth_route',), 'easy', 20,
             'softmax over depth and the weighted sum of the sources (AttnRes)'),
    Exercise(2, 'source_logits', ('source_logits',), 'easy', 30,
             'RMS-normalised keys against the static pseudo-queries, once per source'),
    Exercise(3, 'standard_stream', ('Standard',), 'warm-up', 15,
             'the standard residual stream as a start/read/write/final module'),
    Exercise(4, 'delta_rule', ('DeepDelta.write',), 'medium', 45,
             'DeepDelta.write: the gated delta rule of Deep Delta Learning'),
    Exercise(5, 'block_bookkeeping', ('Routed.write',), 'medium', 45,
             'Routed.write: finished blocks, the partial block, S=1 is Full AttnRes'),
    Exercise(6, 'delta_read', ('Routed.read',), 'medium', 30,
             'Routed.read: h = x + gamma * mix, and why gamma = 0 converts a checkpoint exactly'),
    Exercise(7, 'new_variant', (), 'open-ended', 240,
             'a new residual variant behind the same interface, in compare.py, with a written comparison'),
]
# what a student copy holds: the project's code, configs and exercises; not tests/ (its naive reference loops
# would give the answers away), data or runs
COPY = ['*.py', 'README.md', 'requirements.txt', 'configs/*.py', 'exercises/*.md', 'exercises/*_test.py']
# fastroute.py, the fused GPU path, re-implements the routing math of exercises 1, 2, 5 and 6 (softmax over
# depth, the keys, the bookkeeping, the Delta read); the copy gets this stand-in, so every device routes with
# the student's Routed
FASTROUTE_STAND_IN = '''"""
Stand-in for the fused GPU routing path, which a student copy of the project leaves out: it re-implements the
routing that the exercises ask for. Every device uses model.Routed's plain code, with the same parameters.
"""
from model import Routed as FusedRouted  # noqa: F401 (imported by GPT.__init__)
'''
# fastddl.py, the fused DDL write, re-implements the delta rule of exercise 4 in the same way
FASTDDL_STAND_IN = '''"""
Stand-in for the fused DDL write, which a student copy of the project leaves out: it re-implements the delta
rule that an exercise asks for. Every device uses model.DeepDelta's plain code, with the same parameters.
"""
from model import DeepDelta


class FusedDeepDelta(DeepDelta):  # GPT.__init__ passes the pre-norms, which only the fused backward needs
    def __init__(self, config, norms):
        super().__init__(config)
'''
MIN_LEAK_CHARS = 8  # shorter lines ('return', 'else:') say nothing about a solution
CHECK_TIMEOUT = 600  # seconds; a student's endless loop must not hang a grading script
RESULTS = 'exercise results: '  # the child's line of JSON starts with this


def get_exercise(n):
    for ex in EXERCISES:
        if str(ex.number) == str(n):
            return ex
    raise SystemExit(f'no exercise {n!r}: expected one of {", ".join(str(e.number) for e in EXERCISES)} '
                     f'(python exercises.py list)')


def files_of(ex):
    """The statement and the tests of an exercise, relative to the project root."""
    stem = f'exercises/{ex.number:02d}_{ex.name}'
    return stem + '.md', stem + '_test.py'

# ----------------------------------------------------------------------------------------------------------
# make: blank the exercise's functions with ast

def find_functions(tree, targets):
    """The FunctionDef nodes named by targets ('f', 'Class.method', or 'Class' for all its methods), in order."""
    funcs, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = [m for m in node.body if isinstance(m, ast.FunctionDef)]
            funcs.update({f'{node.name}.{m.name}': m for m in classes[node.name]})
    found = []
    for t in targets:
        if t in classes:
            found += [(f'{t}.{m.name}', m) for m in classes[t]]
        elif t in funcs:
            found.append((t, funcs[t]))
        else:
            raise SystemExit(f'model.py: no function or class {t!r} to cut out (was it renamed? update EXERCISES '
                             f'in exercises.py)')
    return found


def blank_source(source, ex):
    """model.py's text with the bodies of ex.targets replaced by a NotImplementedError, and the removed lines.
    Everything else, comments included, stays byte for byte."""
    lines = source.splitlines(keepends=True)
    edits = []  # (first line, last line) of each body, 0-based inclusive, and the line that replaces it
    for qualname, node in find_functions(ast.parse(source), ex.targets):
        body = node.body
        doc = ast.get_docstring(node, clean=False) is not None
        if len(body) == doc:
            raise SystemExit(f'model.py: {qualname} has no body to cut out')
        first, last = body[doc].lineno - 1, node.end_lineno - 1
        if body[doc].lineno == node.lineno:
            raise SystemExit(f'model.py: {qualname} is written on one line; put its body on lines of its own')
        indent = body[doc].col_offset
        # comment lines belong to the body when they are indented like it: those just before its first statement
        # (no docstring) and just after its last one
        while not doc and first - 1 > node.lineno - 1 and is_comment_at(lines[first - 1], indent):
            first -= 1
        while last + 1 < len(lines) and is_comment_at(lines[last + 1], indent):
            last += 1
        md, _ = files_of(ex)
        stub = f'raise NotImplementedError("exercise {ex.number}: write {qualname}; see {md}")'
        edits.append((first, last, ' ' * indent + stub + '\n'))
    removed = []
    for first, last, stub in sorted(edits, reverse=True):  # from the bottom up, so line numbers stay valid
        removed += lines[first:last + 1]
        lines[first:last + 1] = [stub]
    return ''.join(lines), removed


def is_comment_at(line, indent):
    stripped = line.lstrip(' ')
    return stripped.startswith('#') and len(line) - len(stripped) >= indent


def find_leaks(removed, out):
    """(file, line) for every non-trivial removed line that appears as a whole line in a file under out."""
    needles = {line.strip() for line in removed if len(line.strip()) >= MIN_LEAK_CHARS}
    leaks = []
    for path in sorted(glob.glob(os.path.join(out, '**', '*'), recursive=True)):
        if os.path.isfile(path):
            with open(path, encoding='utf-8', errors='replace') as f:
                leaks += [(os.path.relpath(path, out), s) for s in (line.strip() for line in f) if s in needles]
    return leaks


def make(ex, out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f'--out={out} exists and is not an empty directory: choose a new one (nothing is '
                         f'overwritten, so a student\'s work is never lost)')
    with open(os.path.join(HERE, 'model.py'), encoding='utf-8') as f:
        student, removed = blank_source(f.read(), ex)
    for pattern in COPY:
        for src in sorted(glob.glob(os.path.join(HERE, pattern))):
            dst = os.path.join(out, os.path.relpath(src, HERE))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
    for name, text in (('model.py', student), ('fastroute.py', FASTROUTE_STAND_IN), ('fastddl.py', FASTDDL_STAND_IN)):
        with open(os.path.join(out, name), 'w', encoding='utf-8') as f:
            f.write(text)
    leaks = find_leaks(removed, out)
    if leaks:
        shutil.rmtree(out)
        raise SystemExit(f'exercise {ex.number}: the copy still holds lines of the removed solution, so it was '
                         f'deleted: ' + '; '.join(f'{p}: {line!r}' for p, line in leaks[:5]))
    md, _ = files_of(ex)
    what = ', '.join(ex.targets) or 'nothing is cut out: you add a variant'
    print(f'exercise {ex.number} ({ex.name}) written to {out} ({what}).\n'
          f'  read {os.path.join(out, md)}, then grade your work with:\n'
          f'  cd {out} && python exercises.py check {ex.number}')

# ----------------------------------------------------------------------------------------------------------
# check: run the exercise's tests against a directory's model.py, in a child process

def run_tests(ex, d):
    """In the child: import d's model.py and the exercise's tests, run every test_ function, return results.
    One process may grade several directories in turn: the modules imported from the previous ones are
    forgotten first, so that `import model` finds this one's."""
    import torch  # here, not at the top: list and make work without it
    torch.set_num_threads(1)  # the tests' models are tiny: threads would cost more in sync than they save
    for name, module in list(sys.modules.items()):
        f = getattr(module, '__file__', None)
        if f and os.path.dirname(os.path.abspath(f)) in _graded and not f.endswith('exercises.py'):
            del sys.modules[name]
    _graded.add(d)
    cwd = os.getcwd()
    sys.path.insert(0, d)  # `import model` (and compare, ...) must find the student's files, not the solution's
    os.chdir(d)  # and the tests read the student's configs and notes from there
    try:
        _, test_file = files_of(ex)
        spec = importlib.util.spec_from_file_location(f'exercise{ex.number}_test', os.path.join(HERE, test_file))
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a syntax error in model.py, a missing name: no test can run
            return [dict(test='import', title='model.py imports', passed=False, message=explain(e, d))]
        results = []
        for name, fn in list(vars(module).items()):  # in the order the tests are written, easiest first
            if name.startswith('test_') and callable(fn):
                torch.manual_seed(0)  # the same random numbers for every student, whatever ran before
                title = (fn.__doc__ or name).strip().splitlines()[0]
                try:
                    fn()
                    results.append(dict(test=name, title=title, passed=True, message=''))
                except Exception as e:  # one broken test must not hide the results of the others
                    results.append(dict(test=name, title=title, passed=False, message=explain(e, d)))
        return results
    finally:
        sys.path.remove(d)
        os.chdir(cwd)


_graded = set()  # the directories whose modules this process has imported


def explain(e, d):
    """A failed test in words: the property's message, or the error and where in the student's code it was."""
    if isinstance(e, NotImplementedError):
        return f'not written yet ({e})'
    if isinstance(e, AssertionError):
        return str(e) or 'a property does not hold (the test gave no message)'
    # the calls in the student's files that led to the error, the last one with its line of code
    where = [f for f in traceback.extract_tb(e.__traceback__)
             if os.path.dirname(os.path.abspath(f.filename)) == d and os.path.abspath(f.filename) != __file__]
    calls = ' -> '.join(f'{f.name} ({os.path.basename(f.filename)} line {f.lineno})' for f in where[-3:])
    at = f'\nin {calls}: {where[-1].line}' if where else ''
    return f'{type(e).__name__}: {" ".join(str(e).split())[:600]}{at}'


def check(ex, d, as_json):
    d = os.path.abspath(d)
    if not os.path.isfile(os.path.join(d, 'model.py')):
        raise SystemExit(f'{os.path.join(d, "model.py")} not found: check a student copy made with '
                         f'`python exercises.py make {ex.number} --out=DIR`, with --dir=DIR or from inside it')
    t0 = time.time()
    # a child process: the student's `model` must not meet the solution's in one interpreter, and an endless
    # loop or a crash in the student's code must end as a failed check, not as a hung or dead grader
    try:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), '_run', str(ex.number), d], cwd=d,
                               capture_output=True, text=True, timeout=CHECK_TIMEOUT)
        out = [line for line in child.stdout.splitlines() if line.startswith(RESULTS)]  # past the student's prints
        results = json.loads(out[-1][len(RESULTS):])[0] if child.returncode == 0 and out else None
        why = f'the test process failed (exit {child.returncode}): {child.stderr.strip()[-1500:]}'
    except subprocess.TimeoutExpired:
        results, why = None, f'the tests did not finish in {CHECK_TIMEOUT} s (an endless loop in model.py?)'
    if results is None:  # graded as one failed test, so the score is 0 and the message says why
        results = [dict(test='run', title='the tests run', passed=False, message=why)]
    passed = sum(r['passed'] for r in results)
    if as_json:
        print(json.dumps(dict(exercise=ex.number, name=ex.name, dir=d, passed=passed, total=len(results),
                              score=round(passed / len(results), 4), seconds=round(time.time() - t0, 1),
                              tests=results), indent=1))
    else:
        print(f'exercise {ex.number} ({ex.name}) on {os.path.join(d, "model.py")}')
        for r in results:
            print(f'  {"PASS" if r["passed"] else "FAIL"}  {r["title"]}')
            if not r['passed']:
                print('\n'.join('        ' + line for line in r['message'].splitlines()))
        print(f'score: {passed}/{len(results)} tests passed' + (' - done!' if passed == len(results) else ''))
    return passed == len(results)

# ----------------------------------------------------------------------------------------------------------

USAGE = """usage:
  python exercises.py list
  python exercises.py make N --out=DIR
  python exercises.py check N [--dir=DIR] [--json]"""


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__ + '\n' + USAGE)
        return 0
    cmd, args = argv[0], argv[1:]
    if cmd == '_run':  # the child process of check: N DIR [N DIR ...] -> a list of results, one JSON line
        print(RESULTS + json.dumps([run_tests(get_exercise(n), d) for n, d in zip(args[::2], args[1::2])]))
        return 0
    # --key=value options (a bare --json is --json=) and positional arguments, in any order
    opts = dict(a.removeprefix('--').partition('=')[::2] for a in args if a.startswith('--'))
    pos = [a for a in args if not a.startswith('--')]
    known = {'list': set(), 'make': {'out'}, 'check': {'dir', 'json'}}
    if cmd not in known:
        raise SystemExit(f'unknown command {cmd!r}\n{USAGE}')
    if set(opts) - known[cmd] or len(pos) != (cmd != 'list'):
        raise SystemExit(f'bad arguments for {cmd}: {" ".join(args) or "(none)"}\n{USAGE}')
    if cmd == 'list':
        for ex in EXERCISES:
            print(f'{ex.number}  {ex.name:<18} {ex.difficulty:<10} ~{ex.minutes:>3} min  {ex.summary}')
        return 0
    ex = get_exercise(pos[0])
    if cmd == 'make':
        if not opts.get('out'):
            raise SystemExit(f'make needs --out=DIR, the directory to write the student copy into\n{USAGE}')
        make(ex, opts['out'])
        return 0
    as_json = opts.get('json', 'false').lower() in ('', '1', 'true')  # --json alone, or --json=True
    return 0 if check(ex, opts.get('dir') or '.', as_json) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
