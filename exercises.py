"""
Classroom exercises cut from model.py, and their autograder.

  python exercises.py list                      # the exercises, with difficulty and time estimate
  python exercises.py make 4 --out=ex4          # a student copy of the project, exercise 4 cut out
  cd ex4 && python exercises.py check 4         # grade it: pass/fail, a message per test, a score
  python exercises.py check 4 --dir=ex4 --json  # the same as JSON, for a gradebook

model.py stays the solution and carries no markers: `make` parses it with `ast`, finds the
exercise's functions by their qualified names (e.g. `DeepDelta.write`; a class name means all of its
methods) and replaces each body, below its signature and docstring, with
`raise NotImplementedError`. Then it checks that no line of a removed body survives anywhere in the
copy. Statements and tests live in exercises/ as NN_name.md and NN_name_test.py.

`check` runs the student's code in a child process that only computes: the student's functions, on
inputs made from a seed drawn at random for each run, and their raw outputs written back. This
process makes the same inputs and holds every reference (float64 loops, the papers' invariants, the
weights of the model.py next to this file) and every assertion: nothing the child prints, writes or
patches passes a test, only right outputs do. The tests check properties and values, never the
solution's source, so any correct implementation passes. `check` exits 0 only when every test
passes. It runs the student's code with your privileges: exercises/README.md says how to grade
submissions you do not trust, and what the checks can't tell.
"""

import ast
import glob
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import namedtuple
from contextlib import suppress

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
             'a new residual variant behind the same interface, in compare.py, '
             'with a written comparison'),
]
# what a student copy holds: the project's code, docs, configs and exercises; not tests/ (its naive
# reference loops would give the answers away), data or runs
COPY = ['*.py', 'README.md', 'docs/*.md', 'requirements.txt', 'configs/*.py', 'exercises/*.md',
        'exercises/*_test.py']
# The fast GPU paths (fast/) re-implement the routing and the delta rule that exercises 1, 2, 4, 5
# and 6 ask for, so a copy that cuts code out leaves them out, and every device runs the student's
# plain code (train.py and bench.py run without them). Exercise 7 cuts nothing: its copy keeps them.
FAST = ['fast/**/*.py']
MIN_LEAK_CHARS = 8  # shorter lines ('return', 'else:') say nothing about a solution
CHECK_TIMEOUT = 600  # seconds; a student's endless loop must not hang a grading script


def get_exercise(n):
    for ex in EXERCISES:
        if str(ex.number) == str(n):
            return ex
    raise SystemExit(f'no exercise {n!r}: expected one of '
                     f'{", ".join(str(e.number) for e in EXERCISES)} (python exercises.py list)')


def files_of(ex):
    """The statement and the tests of an exercise, relative to the project root."""
    stem = f'exercises/{ex.number:02d}_{ex.name}'
    return stem + '.md', stem + '_test.py'

# --------------------------------------------------------------------------------------------------
# make: blank the exercise's functions with ast

def find_functions(tree, targets):
    """The FunctionDef nodes named by targets, in order: 'f', 'Class.method', or 'Class' for all
    its methods."""
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
            raise SystemExit(f'model.py: no function or class {t!r} to cut out '
                             f'(was it renamed? update EXERCISES in exercises.py)')
    return found


def blank_source(source, ex):
    """model.py's text with the bodies of ex.targets replaced by a NotImplementedError, and the
    removed lines. Everything else, comments included, stays byte for byte."""
    lines = source.splitlines(keepends=True)
    # (first line, last line) of each body, 0-based inclusive, and the line that replaces it
    edits = []
    for qualname, node in find_functions(ast.parse(source), ex.targets):
        body = node.body
        doc = ast.get_docstring(node, clean=False) is not None
        if len(body) == doc:
            raise SystemExit(f'model.py: {qualname} has no body to cut out')
        first, last = body[doc].lineno - 1, node.end_lineno - 1
        if body[doc].lineno == node.lineno:
            raise SystemExit(f'model.py: {qualname} is written on one line; '
                             f'put its body on lines of its own')
        indent = body[doc].col_offset
        # comment lines belong to the body when they are indented like it: those just before its
        # first statement (no docstring) and just after its last one
        while not doc and first - 1 > node.lineno - 1 and is_comment_at(lines[first - 1], indent):
            first -= 1
        while last + 1 < len(lines) and is_comment_at(lines[last + 1], indent):
            last += 1
        md, _ = files_of(ex)
        stub = f'raise NotImplementedError("exercise {ex.number}: write {qualname}; see {md}")'
        edits.append((first, last, ' ' * indent + stub + '\n'))
    removed = []
    # from the bottom up, so line numbers stay valid
    for first, last, stub in sorted(edits, reverse=True):
        removed += lines[first:last + 1]
        lines[first:last + 1] = [stub]
    return ''.join(lines), removed


def is_comment_at(line, indent):
    stripped = line.lstrip(' ')
    return stripped.startswith('#') and len(line) - len(stripped) >= indent


def find_leaks(removed, out):
    """(file, line) for every non-trivial removed line found as a whole line in a file under out."""
    needles = {line.strip() for line in removed if len(line.strip()) >= MIN_LEAK_CHARS}
    leaks = []
    for path in sorted(glob.glob(os.path.join(out, '**', '*'), recursive=True)):
        if os.path.isfile(path):
            with open(path, encoding='utf-8', errors='replace') as f:
                leaks += [(os.path.relpath(path, out), s)
                          for s in (line.strip() for line in f) if s in needles]
    return leaks


def copied_files(ex):
    """The files of a student copy of exercise ex, relative to the project root."""
    def matching(patterns):
        return {os.path.relpath(p, HERE) for pattern in patterns
                for p in glob.glob(os.path.join(HERE, pattern), recursive=True)}
    files, fast = matching(COPY), matching(FAST)
    return sorted(files - fast if ex.targets else files | fast)


def make(ex, out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f'--out={out} exists and is not an empty directory: choose a new one '
                         f'(nothing is overwritten, so a student\'s work is never lost)')
    with open(os.path.join(HERE, 'model.py'), encoding='utf-8') as f:
        student, removed = blank_source(f.read(), ex)
    for path in copied_files(ex):
        dst = os.path.join(out, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(HERE, path), dst)
    with open(os.path.join(out, 'model.py'), 'w', encoding='utf-8') as f:
        f.write(student)
    leaks = find_leaks(removed, out)
    if leaks:
        shutil.rmtree(out)
        raise SystemExit(f'exercise {ex.number}: the copy still holds lines of the removed '
                         f'solution, so it was deleted: '
                         + '; '.join(f'{p}: {line!r}' for p, line in leaks[:5]))
    md, _ = files_of(ex)
    what = ', '.join(ex.targets) or 'nothing is cut out: you add a variant'
    print(f'exercise {ex.number} ({ex.name}) written to {out} ({what}).\n'
          f'  read {os.path.join(out, md)}, then grade your work with:\n'
          f'  cd {out} && python exercises.py check {ex.number}')

# --------------------------------------------------------------------------------------------------
# check: the student's code computes in a child process, this one checks
#
# Each test in exercises/NN_name_test.py is a pair of functions. compute_X(M, seed) runs in the
# child on M, the student's model.py, with inputs made from the seed, and returns raw outputs
# (tensors, numbers). check_X(out, ref) runs here: it makes the same inputs from ref.seed, computes
# what they must give and asserts. The child's word counts for nothing: the seed is drawn for each
# run, its outputs pass only if they are right for it, and nothing it prints or patches in its own
# process (the asserts, the tests, sys.exit) reaches this one.

# what a check gets besides the outputs: the reference model.py, the run's seed, the directory of
# the submission
Ref = namedtuple('Ref', 'model seed dir')


def reference():
    """The model.py next to this file, imported before the child starts, so that nothing the child
    does can change it: in the project, the solution; in a student's own copy, the student's file
    (None if it does not import: the child then says so for every test). The checks use its backbone
    and weights, never what their exercise cuts out."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        import model
        return model
    except (Exception, SystemExit):
        return None


def load_tests(ex, name):
    """The exercise's tests in the order they are written, easiest first:
    (name, title, compute, check)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, files_of(ex)[1]))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = []
    for key, fn in vars(module).items():
        if key.startswith('compute_'):
            test = key.removeprefix('compute_')
            tests.append((test, fn.__doc__.strip().splitlines()[0], fn,
                          getattr(module, 'check_' + test)))
    return tests


def compute(seed, results, jobs):
    """In the child: for each (exercise, directory) of jobs, import the directory's model.py and run
    every test's compute function on it, appending one JSON line per test to the file `results`. One
    process may compute for several directories in turn: the modules imported from the previous ones
    are forgotten first, so that `import model` finds this one's."""
    import torch  # here, not at the top: list and make work without it
    # the tests' models are tiny: threads would cost more in sync than they save
    torch.set_num_threads(1)
    # a student's import must never find the solution's files
    sys.path[:] = [p for p in sys.path if p != HERE]
    imported = set()  # the directories whose modules this process has imported
    with open(results, 'a', encoding='utf-8') as out:  # opened before any student code runs
        def send(**record):
            out.write(json.dumps(record) + '\n')
            out.flush()  # the grader shows each test as it finishes
        for job, (n, d) in enumerate(jobs):
            tests = load_tests(get_exercise(n), f'exercise{n}_compute')
            for name, module in list(sys.modules.items()):
                f = getattr(module, '__file__', None)
                if f and name != '__main__' and os.path.dirname(os.path.abspath(f)) in imported:
                    del sys.modules[name]
            imported.add(d)
            sys.path.insert(0, d)  # `import model` (and compare, ...) must find the student's files
            os.chdir(d)  # and the student's code may read its configs from there
            try:
                M = importlib.import_module('model')
            except (Exception, SystemExit) as e:  # a syntax error, a missing name: no test can run
                send(job=job, error=f'model.py does not import: {explain(e, d)}')
            else:
                for name, _, fn, _ in tests:
                    torch.manual_seed(seed)  # the same random numbers, whatever ran before
                    try:
                        send(job=job, test=name, output=encode(fn(M, seed)))
                    # one broken test must not hide the others' results
                    except (Exception, SystemExit) as e:
                        send(job=job, test=name, error=explain(e, d))
            sys.path.remove(d)


def explain(e, d):
    """A failed computation in words: the error, and where in the student's code it was."""
    if isinstance(e, NotImplementedError):
        return f'not written yet ({e})'
    # a compute function's own precondition, e.g. exercise 7's new name
    if isinstance(e, AssertionError):
        return str(e) or 'a property does not hold (the test gave no message)'
    # the calls in the student's files that led to the error, the last one with its line of code
    where = [f for f in traceback.extract_tb(e.__traceback__)
             if os.path.isfile(f.filename)  # not <frozen ...>
             and os.path.dirname(os.path.abspath(f.filename)) == d
             and os.path.abspath(f.filename) != __file__]
    calls = ' -> '.join(f'{f.name} ({os.path.basename(f.filename)} line {f.lineno})'
                        for f in where[-3:])
    at = f'\nin {calls}: {where[-1].line}' if where else ''
    return f'{type(e).__name__}: {" ".join(str(e).split())[:600]}{at}'


def encode(x):
    """An output as JSON: tensors with their dtype and shape, numbers, strings, None, and lists,
    tuples and dicts of them; any other object as its type's name, so a check can say what came
    instead."""
    import torch
    if torch.is_tensor(x):
        x = x.detach().cpu()
        return {'tensor': [str(x.dtype).removeprefix('torch.'), list(x.shape),
                           x.double().flatten().tolist()]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x] if type(x) is list else {'tuple': [encode(v) for v in x]}
    if isinstance(x, dict):
        return {'dict': [[str(k), encode(v)] for k, v in x.items()]}
    return {'object': type(x).__name__}


def decode(x):
    """encode's inverse, in the grader: plain data only, and whatever does not read back raises (the
    test fails). Tensors travel as float64 values, which hold every value of the narrower dtypes
    exactly."""
    import torch
    if isinstance(x, list):
        return [decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    (kind, v), = x.items()
    if kind == 'tensor':
        dtype, shape, values = v
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f'{dtype!r} is not a dtype')
        return torch.tensor(values, dtype=torch.float64).view(shape).to(getattr(torch, dtype))
    if kind == 'tuple':
        return tuple(decode(i) for i in v)
    if kind == 'dict':
        return {str(k): decode(i) for k, i in v}
    if kind == 'object':
        return type(str(v), (), {})()  # an empty object whose type has the name of the child's
    raise ValueError(f'unknown kind of output {kind!r}')


def printable(message):
    """A failure's message as text only: its words may come from the child and must not drive your
    terminal."""
    return ''.join(c for c in str(message)[:3000] if c.isprintable() or c == '\n')


def verdict(check, output, ref):
    """(passed, message): a check of one output of the child's, run here."""
    try:
        check(decode(output), ref)
        return True, ''
    except AssertionError as e:
        return False, str(e) or 'a property does not hold (the test gave no message)'
    # an output of the wrong kind: a list where a tensor should be, a missing entry, ...
    except Exception as e:
        return False, f'the output is not what the test expects: {type(e).__name__}: ' \
                      f'{" ".join(str(e).split())[:300]}'


def grade(jobs, seed, progress=None):
    """Grade [(exercise, directory), ...] with one child process for them all (so one submission's
    code could spoil another's results: check grades one submission per child). Returns for each job
    the results of its tests, dict(test, title, passed, message), in the order they are written;
    progress(job, result) is called as each test is checked. A test whose output never comes (the
    child crashed, exited or hung) fails, so a score is always out of the exercise's test count."""
    if not __debug__:
        raise SystemExit('the checks are assert statements, which python -O removes: '
                         'grade without -O')
    import torch
    solution = reference()
    suites = [load_tests(ex, f'exercise{ex.number}_check') for ex, _ in jobs]
    results = [{} for _ in jobs]  # per job: test name -> result, as they come

    def take(record):
        """One record of the child's: a test's output or error, or an error for all the job's tests
        left."""
        job, name = record['job'], record.get('test')
        tests = suites[job] if type(job) is int and 0 <= job < len(jobs) else []
        for test, title, _, check in tests:
            if test in results[job] or name not in (None, test):
                continue  # a test has one result: the first that came
            passed, message = (False, record['error']) if 'error' in record else \
                verdict(check, record['output'], Ref(solution, seed, os.path.abspath(jobs[job][1])))
            results[job][test] = dict(test=test, title=title, passed=passed,
                                      message=printable(message))
            if progress:
                progress(job, results[job][test])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references are tiny models too
    try:
        with tempfile.TemporaryDirectory(prefix='exercises-') as tmp:
            path = os.path.join(tmp, 'results.jsonl')  # a fresh name, told only to the child
            open(path, 'w').close()
            with (open(path, 'rb') as f,
                  open(os.path.join(tmp, 'stderr'), 'w+', errors='replace') as err):
                # the job goes on stdin, which the child reads before it imports any of the
                # student's code
                child = subprocess.Popen([sys.executable, os.path.abspath(__file__), '_compute'],
                                         cwd=tmp, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=err, text=True)
                with suppress(BrokenPipeError):  # a child that died at once is reported below
                    child.stdin.write(json.dumps(dict(
                        seed=seed, results=path,
                        jobs=[[ex.number, os.path.abspath(d)] for ex, d in jobs])))
                    child.stdin.close()
                deadline, rest = time.time() + CHECK_TIMEOUT, b''
                while True:
                    # then what it wrote before it ended is read once more
                    ended = child.poll() is not None
                    *lines, rest = (rest + f.read()).split(b'\n')
                    # one that is not a record (a student's code can write anything) is ignored
                    for line in lines:
                        with suppress(ValueError, KeyError, TypeError, AttributeError,
                                      RecursionError):
                            take(json.loads(line))
                    if ended or time.time() > deadline:
                        break
                    time.sleep(0.05)
                if ended:
                    err.seek(0)
                    tail = err.read().strip()[-1500:]
                    why = f'the test process ended (exit {child.returncode}) ' \
                        f'before this test\'s result' + (f': {tail}' if tail else '')
                else:
                    child.kill()
                    child.wait()
                    why = (f'the tests did not finish in {CHECK_TIMEOUT} s '
                           f'(an endless loop in model.py?)')
    finally:
        torch.set_num_threads(threads)
    for job in range(len(jobs)):
        take(dict(job=job, error=why))  # every test still without a result
    return [[results[job][test] for test, *_ in suite] for job, suite in enumerate(suites)]


def check(ex, d, as_json, seed):
    d = os.path.abspath(d)
    if not os.path.isfile(os.path.join(d, 'model.py')):
        raise SystemExit(f'{os.path.join(d, "model.py")} not found: check a student copy made with '
                         f'`python exercises.py make {ex.number} --out=DIR`, '
                         f'with --dir=DIR or from inside it')
    t0 = time.time()
    # progress on the terminal as each test is checked; with --json on stderr, so that stdout
    # is only the JSON
    show = sys.stderr if as_json else sys.stdout
    print(f'exercise {ex.number} ({ex.name}) on {os.path.join(d, "model.py")}, seed {seed}',
          file=show)

    def progress(job, r):
        print(f'  {"PASS" if r["passed"] else "FAIL"}  {r["title"]}', file=show, flush=True)
        if not r['passed'] and not as_json:
            print('\n'.join('        ' + line for line in r['message'].splitlines()), flush=True)

    [results] = grade([(ex, d)], seed, progress)
    passed = sum(r['passed'] for r in results)
    if as_json:
        print(json.dumps(dict(exercise=ex.number, name=ex.name, dir=d, seed=seed, passed=passed,
                              total=len(results), score=round(passed / len(results), 4),
                              seconds=round(time.time() - t0, 1), tests=results), indent=1))
    else:
        print(f'score: {passed}/{len(results)} tests passed'
              + (' - done!' if passed == len(results) else ''))
    return passed == len(results)


# --------------------------------------------------------------------------------------------------

USAGE = """usage:
  python exercises.py list
  python exercises.py make N --out=DIR
  python exercises.py check N [--dir=DIR] [--json] [--seed=S]"""


def main(argv):
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__ + '\n' + USAGE)
        return 0
    cmd, args = argv[0], argv[1:]
    # the child process of check: its job comes on stdin, read before any student code
    if cmd == '_compute':
        compute(**json.loads(sys.stdin.read()))
        return 0
    # --key=value options (a bare --json is --json=) and positional arguments, in any order
    opts = dict(a.removeprefix('--').partition('=')[::2] for a in args if a.startswith('--'))
    pos = [a for a in args if not a.startswith('--')]
    known = {'list': set(), 'make': {'out'}, 'check': {'dir', 'json', 'seed'}}
    if cmd not in known:
        raise SystemExit(f'unknown command {cmd!r}\n{USAGE}')
    if set(opts) - known[cmd] or len(pos) != (cmd != 'list'):
        raise SystemExit(f'bad arguments for {cmd}: {" ".join(args) or "(none)"}\n{USAGE}')
    if cmd == 'list':
        for ex in EXERCISES:
            print(f'{ex.number}  {ex.name:<18} {ex.difficulty:<10} ~{ex.minutes:>3} min  '
                  f'{ex.summary}')
        return 0
    ex = get_exercise(pos[0])
    if cmd == 'make':
        if not opts.get('out'):
            raise SystemExit(f'make needs --out=DIR, the directory to write the student copy '
                             f'into\n{USAGE}')
        make(ex, opts['out'])
        return 0
    as_json = opts.get('json', 'false').lower() in ('', '1', 'true')  # --json alone, or --json=True
    # a new seed for every run, so that no output can be prepared; --seed=S repeats a run, to
    # look into it
    seed = opts.get('seed') or str(secrets.randbelow(2 ** 31))
    if not seed.isdigit():
        raise SystemExit(f'--seed={seed}: expected an integer >= 0\n{USAGE}')
    return 0 if check(ex, opts.get('dir') or '.', as_json, int(seed)) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
