"""exercises.py: make cuts out exactly the exercise's function bodies and leaks nothing; every exercise's tests
fail on its blanked copy and pass on the copy with the solution put back (for the open-ended exercise 7, a
reference variant written here); and the grade comes from the grader's own checks, not from anything the
student's code prints, writes or patches in the child process it runs in."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

import exercises

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, 'model.py')) as f:
    SOLUTION = f.read()
FAST = ('fast',)  # the fast GPU paths, as a copy's first path component


def functions(source):
    """qualified name -> (docstring, ast dump of the body below the docstring) of every function and method."""
    out = {}
    for node in ast.parse(source).body:
        for qual, f in ([(node.name, node)] if isinstance(node, ast.FunctionDef) else
                        [(f'{node.name}.{m.name}', m) for m in node.body if isinstance(m, ast.FunctionDef)]
                        if isinstance(node, ast.ClassDef) else []):
            doc = ast.get_docstring(f, clean=False)
            out[qual] = (doc, [ast.dump(s) for s in f.body[doc is not None:]])
    return out


def files_under(d):
    return {os.path.relpath(os.path.join(dirpath, f), d) for dirpath, _, names in os.walk(d) for f in names
            if '__pycache__' not in dirpath}


def check(n, d, *flags):
    """exercises.py check n --dir=d [flags], as a student or a gradebook would run it: (exit code, stdout,
    stderr)."""
    cmd = [sys.executable, os.path.join(ROOT, 'exercises.py'), 'check', str(n), f'--dir={d}', *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def number_of_tests(n):
    return len(exercises.load_tests(exercises.get_exercise(n), 'count'))


def test_list_names_every_exercise(capsys):
    assert exercises.main(['list']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(exercises.EXERCISES) >= 7
    for ex, line in zip(exercises.EXERCISES, lines):
        assert line.split()[:3] == [str(ex.number), ex.name, ex.difficulty] and f'{ex.minutes} min' in line
        md, test = exercises.files_of(ex)  # every exercise has a statement and tests, each a compute/check pair
        assert os.path.isfile(os.path.join(ROOT, md)) and number_of_tests(ex.number) >= 5


@pytest.mark.parametrize('ex', exercises.EXERCISES, ids=lambda ex: ex.name)
def test_make_cuts_out_exactly_the_exercise(tmp_path, ex):
    out = tmp_path / 'student'
    exercises.make(ex, str(out))
    assert not (out / 'tests').exists() and (out / exercises.files_of(ex)[0]).is_file()
    assert (out / 'exercises' / 'README.md').is_file()
    copied = files_under(out)
    for path in copied - {'model.py'}:  # no stand-ins: every other file is the project's, as it is
        assert (out / path).read_bytes() == pathlib.Path(ROOT, path).read_bytes(), path
    fast = {p for p in files_under(ROOT) if p.split(os.sep)[0] in FAST}
    if ex.targets:  # the fast paths re-implement what the exercises ask for: none in the copy
        assert not {p for p in copied if p.split(os.sep)[0] in FAST}
    else:  # exercise 7 cuts nothing, and its compare.py must run
        assert fast <= copied
    student = (out / 'model.py').read_text()
    before, after = functions(SOLUTION), functions(student)
    cut = {q for q in before if q in ex.targets or q.split('.')[0] in ex.targets}
    assert len(cut) >= len(ex.targets) and set(after) == set(before)
    for q in before:
        assert after[q][0] == before[q][0], q  # every docstring stays
        if q in cut:  # the body is one raise NotImplementedError naming the exercise
            assert len(after[q][1]) == 1 and 'NotImplementedError' in after[q][1][0], q
            assert f'exercise {ex.number}:' in after[q][1][0]
        else:
            assert after[q][1] == before[q][1], q
    # outside the cut bodies the text is the solution's, comments included
    kept = [line for line in student.splitlines() if 'raise NotImplementedError("exercise' not in line]
    assert set(kept) <= set(SOLUTION.splitlines())


def test_make_refuses_a_leak_and_a_used_directory(tmp_path):
    ex = exercises.get_exercise(4)
    _, removed = exercises.blank_source(SOLUTION, ex)
    (tmp_path / 'notes.md').write_text('a copy of the answer:\n    ' + removed[-1])
    assert exercises.find_leaks(removed, str(tmp_path)) == [('notes.md', removed[-1].strip())]
    with pytest.raises(SystemExit, match='not an empty directory'):
        exercises.make(ex, str(tmp_path))
    with pytest.raises(SystemExit, match='no exercise'):
        exercises.get_exercise(99)


# A reference answer to the open-ended exercise 7: DenseFormer (Pagliardini et al., 2024), a learned depth-
# weighted average of the stream after every sublayer, identity at init. Appended to a student copy with its
# compare.py entry and a comparison.md.
DENSEFORMER = '''

class DenseFormer(nn.Module):
    """After each sublayer the stream is a learned weighted average of e and every earlier stream value."""

    def __init__(self, config):
        super().__init__()
        n = 2 * config.n_layer
        self.alpha = nn.Parameter(torch.zeros(n, n + 1))
        with torch.no_grad():
            self.alpha[torch.arange(n), torch.arange(1, n + 1)] = 1.0  # identity: the standard stream at init

    def start(self, e):
        return {'x': e, 'past': [e]}

    def read(self, st, s):
        return st['x']

    def write(self, st, s, out, h, c):
        st['past'].append(st['x'] + out)
        st['x'] = sum(self.alpha[s, j] * v for j, v in enumerate(st['past']))

    def final(self, st):
        return st['x']


RESIDUALS = RESIDUALS + ('denseformer',)
_gpt_init = GPT.__init__


def _init_with_denseformer(self, config):
    _gpt_init(self, config)
    if config.residual == 'denseformer':
        self.stream = DenseFormer(config)


GPT.__init__ = _init_with_denseformer
'''


def answer_exercise_7(d):
    with open(os.path.join(d, 'model.py'), 'a') as f:
        f.write(DENSEFORMER)
    path = os.path.join(d, 'cli.py')  # the new entry of VARIANTS, which compare.RUNS lists
    with open(path) as f:
        text = f.read().replace('VARIANTS = {\n', "VARIANTS = {\n    'denseformer': dict(residual='denseformer'),\n")
    with open(path, 'w') as f:
        f.write(text)
    with open(os.path.join(d, 'comparison.md'), 'w') as f:
        f.write('denseformer reached val loss 6.61 against 6.58 for standard. ' + 'word ' * 150)


@pytest.mark.slow
def test_every_exercise_fails_blanked_and_passes_solved(tmp_path):
    jobs, solved = [], []
    for ex in exercises.EXERCISES:
        for answer in (False, True):
            d = tmp_path / f'ex{ex.number}{"_solved" if answer else ""}'
            exercises.make(ex, str(d))
            if answer and ex.number == 7:
                answer_exercise_7(str(d))
            elif answer:  # the solution put back into the copy, which must need nothing it leaves out
                (d / 'model.py').write_text(SOLUTION)
            jobs.append((ex, str(d)))
            solved.append(answer)
    # one child process computes for every directory in turn (what `check` runs, without a torch import per job)
    for (ex, d), answer, results in zip(jobs, solved, exercises.grade(jobs, seed=1234)):
        assert len(results) == number_of_tests(ex.number) >= 5
        failed = [t['title'] + ': ' + t['message'] for t in results if not t['passed']]
        if answer:
            assert not failed, (ex.name, failed)
        else:  # every test fails on the blanked copy: each one exercises the cut-out code
            assert len(failed) == len(results), (ex.name, results)


def test_check_exit_code_json_and_progress(tmp_path):
    n = number_of_tests(3)
    code, out, err = check(3, ROOT, '--json')
    report = json.loads(out)  # stdout is the JSON alone: the progress went to stderr, one line per test
    assert code == 0 and report['passed'] == report['total'] == n and report['score'] == 1.0
    assert sum(line.startswith('  PASS  ') for line in err.splitlines()) == n
    assert f'seed {report["seed"]}' in err.splitlines()[0]  # drawn for this run, and told, to repeat it
    exercises.make(exercises.get_exercise(3), str(tmp_path / 'ex3'))
    code, out, err = check(3, tmp_path / 'ex3', '--seed=7')
    lines = out.splitlines()
    assert code == 1 and 'seed 7' in lines[0] and lines[-1] == f'score: 0/{n} tests passed'
    assert sum(line.startswith('  FAIL  ') for line in lines) == n
    assert out.count('not written yet (exercise 3: write Standard.') == n


def blank_copy(tmp_path, name, code):
    """A copy of exercise 3, left blank, whose model.py ends with code."""
    d = tmp_path / name
    exercises.make(exercises.get_exercise(3), str(d))
    with open(d / 'model.py', 'a') as f:
        f.write('\n' + code)
    return str(d)


# Student code that tries to pass exercise 3 without writing it. Each runs when the child imports model.py; the
# last one changes the child process for whatever runs after it, so it goes last.
TAMPERING = {
    # the old grader took the last line of this form from the child's output
    'prints_fake_results': '''
import atexit, json
ok = [dict(test=f'test_{i}', title='', passed=True, message='') for i in range(6)]
atexit.register(print, 'exercise results: ' + json.dumps([ok]))
atexit.register(print, json.dumps(dict(job=0, test='start_returns_the_state_as_a_dict', passed=True)))
''',
    # finds where the child writes its results, and writes "outputs" there first
    'writes_its_own_results': '''
import json, sys
frame = sys._getframe()
while 'results' not in frame.f_locals:
    frame = frame.f_back
with open(frame.f_locals['results'], 'a') as f:
    for name, *_ in frame.f_locals['tests']:
        f.write(json.dumps(dict(job=frame.f_locals['job'], test=name, passed=True, output=None)) + '\\n')
''',
    'sys_exit': 'import sys\nsys.exit(0)\n',
    'syntax_error': 'def broken(:\n',
    # the asserts, the test functions (now and later), exiting
    'patches_the_tests': '''
import gc, sys, types, torch, torch.testing
torch.testing.assert_close = lambda *a, **k: None
torch.allclose = torch.equal = lambda *a, **k: True
sys.exit = lambda *a: None
for f in [o for o in gc.get_objects() if isinstance(o, types.FunctionType)]:
    if f.__name__.startswith(('check_', 'verdict', 'test_')) and not f.__code__.co_freevars:
        f.__code__ = (lambda *a, **k: None).__code__
''',
}


def test_tampering_student_code_fails_every_test(tmp_path):
    """Each of these in a blank copy is graded 0/N, N the exercise's real number of tests, as it would be
    without it: nothing the child prints, patches or writes passes a test."""
    n = number_of_tests(3)
    jobs = [(exercises.get_exercise(3), blank_copy(tmp_path, name, code)) for name, code in TAMPERING.items()]
    graded = dict(zip(TAMPERING, exercises.grade(jobs, seed=99)))
    for name, results in graded.items():
        assert len(results) == n and not any(r['passed'] for r in results), (name, results)
    for name, error in (('sys_exit', 'SystemExit: 0'), ('syntax_error', 'SyntaxError')):
        assert all(r['message'].startswith(f'model.py does not import: {error}') for r in graded[name])


def test_exiting_early_fails_every_test(tmp_path):
    """A child that ends before sending its results (os._exit(0) in model.py, even at the first test) fails
    every test, and says why."""
    d = blank_copy(tmp_path, 'exits', 'import os\nStandard.start = lambda self, e: os._exit(0)\n')
    results = exercises.grade([(exercises.get_exercise(3), d)], seed=5)[0]
    assert len(results) == number_of_tests(3) and not any(r['passed'] for r in results)
    assert all(r['message'].startswith('the test process ended (exit 0) before this test') for r in results)
