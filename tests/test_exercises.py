"""exercises.py: make cuts out exactly the exercise's function bodies and leaks nothing, and every exercise's
tests fail on its blanked copy and pass on the solution (model.py; for the open-ended exercise 7, a reference
variant written here)."""

import ast
import json
import os
import subprocess
import sys

import pytest

import exercises

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTION = open(os.path.join(ROOT, 'model.py')).read()


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


def check(n, d):
    """exercises.py check n --dir=d --json, as a gradebook would run it: (exit code, report)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'exercises.py'), 'check', str(n), f'--dir={d}', '--json'],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, json.loads(r.stdout)


def test_list_names_every_exercise(capsys):
    assert exercises.main(['list']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(exercises.EXERCISES) >= 7
    for ex, line in zip(exercises.EXERCISES, lines):
        assert line.split()[:3] == [str(ex.number), ex.name, ex.difficulty] and f'{ex.minutes} min' in line
        md, test = exercises.files_of(ex)  # every exercise has a statement and tests
        assert os.path.isfile(os.path.join(ROOT, md)) and os.path.isfile(os.path.join(ROOT, test))


@pytest.mark.parametrize('ex', exercises.EXERCISES, ids=lambda ex: ex.name)
def test_make_cuts_out_exactly_the_exercise(tmp_path, ex):
    out = tmp_path / 'student'
    exercises.make(ex, str(out))
    assert not (out / 'tests').exists() and (out / exercises.files_of(ex)[0]).is_file()
    assert (out / 'fastroute.py').read_text() == exercises.FASTROUTE_STAND_IN  # not the fused routing math
    assert (out / 'fastddl.py').read_text() == exercises.FASTDDL_STAND_IN  # nor the fused delta rule
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
    with open(os.path.join(d, 'compare.py'), 'a') as f:
        f.write("\nRUNS.append('denseformer')\n")
    with open(os.path.join(d, 'configs', 'compare_denseformer.py'), 'w') as f:
        f.write("out_dir = 'out-compare-denseformer'\nresidual = 'denseformer'\n")
    with open(os.path.join(d, 'comparison.md'), 'w') as f:
        f.write('denseformer reached val loss 6.61 against 6.58 for standard. ' + 'word ' * 150)


@pytest.mark.slow
def test_every_exercise_fails_blanked_and_passes_solved(tmp_path):
    jobs = []  # (exercise, directory, solved?)
    for ex in exercises.EXERCISES:
        d = tmp_path / f'ex{ex.number}'
        exercises.make(ex, str(d))
        jobs.append((ex, d, False))
        if ex.number == 7:
            solved = tmp_path / 'ex7_solved'
            exercises.make(ex, str(solved))
            answer_exercise_7(str(solved))
            jobs.append((ex, solved, True))
        else:
            jobs.append((ex, ROOT, True))
    # one child process grades every directory in turn (what `check` runs, without a torch import per job)
    args = [str(a) for ex, d, _ in jobs for a in (ex.number, d)]
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'exercises.py'), '_run', *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reports = json.loads(r.stdout.splitlines()[-1].removeprefix(exercises.RESULTS))
    for (ex, d, solved), results in zip(jobs, reports):
        failed = [t['title'] + ': ' + t['message'] for t in results if not t['passed']]
        if solved:
            assert not failed and len(results) >= 5, (ex.name, failed)
        else:  # every test fails on the blanked copy: each one exercises the cut-out code
            assert len(failed) == len(results), (ex.name, results)


def test_check_exit_code_and_json(tmp_path):
    code, report = check(3, ROOT)
    assert code == 0 and report['passed'] == report['total'] > 0 and report['score'] == 1.0
    exercises.make(exercises.get_exercise(3), str(tmp_path / 'ex3'))
    code, report = check(3, tmp_path / 'ex3')
    assert code == 1 and report['passed'] == 0
    assert all('not written yet (exercise 3: write Standard.' in t['message'] for t in report['tests'])
