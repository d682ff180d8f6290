"""The --key=value parser that train.py, sample.py, bench.py and compare.py share (cli.py), with the options of
sample.py, bench.py and compare.py; train.py's own use of it is tested in test_train.py."""

import warnings

import pytest

import bench
import cli
import compare
import sample


def test_values_take_the_type_of_their_default():
    cfg = cli.parse(['--start=a=b', '--temperature=1', '--routing=False', '--top_k=0', '--seed=2*3'], sample.DEFAULTS,
                    sample.__doc__)
    assert cfg['start'] == 'a=b' and cfg['temperature'] == 1.0 and type(cfg['temperature']) is float
    assert cfg['routing'] is False and cfg['top_k'] == 0 and cfg['seed'] == 6
    assert cfg['max_new_tokens'] == sample.DEFAULTS['max_new_tokens']  # untouched keys keep the default
    for raw, value in [('1', True), ('TRUE', True), ('yes', True), ('0', False), ('false', False), ('No', False)]:
        assert cli.parse([f'--compile={raw}'], bench.defaults, bench.__doc__)['compile'] is value


@pytest.mark.parametrize('argv, expected', [
    (['--temprature=0.5'], ["unknown key 'temprature'", 'did you mean temperature', 'known keys: out_dir, ckpt']),
    (['--seed=abc'], ['--seed=abc', 'expected a number']),
    (['--seed=1.5'], ['seed expects int', '1.5']),
    (['--top_k=True'], ['top_k expects int']),
    (['--temperature=0.5.1'], ["cannot read '0.5.1' as a float"]),
    (['--routing=maybe'], ['routing expects bool: 1, true, yes or 0, false, no']),
    (['seed=3'], ["argument seed=3: expected --key=value"]),
    (['--seed'], ['argument --seed: expected --key=value']),
])
def test_bad_arguments_exit_with_a_message_naming_them(argv, expected):
    with pytest.raises(SystemExit) as e:
        cli.parse(argv, sample.DEFAULTS, sample.__doc__)
    assert isinstance(e.value.code, str) and e.value.code.startswith('error: argument ')
    for text in expected:
        assert text in e.value.code


@pytest.mark.parametrize('module, parse', [(sample, lambda a: cli.parse(a, sample.DEFAULTS, sample.__doc__)),
                                           (bench, bench.parse), (compare, compare.parse)])
def test_help_prints_the_doc_and_every_default(module, parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse(['--seed=3', '--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(module.__doc__)
    defaults = sample.DEFAULTS if module is sample else module.defaults
    assert all(f'  --{k}={v}\n' in out + '\n' for k, v in defaults.items())


def test_bench_rejects_and_compare_passes_on_unknown_keys():
    with pytest.raises(SystemExit, match="unknown key 'stpes'; did you mean steps"):
        bench.parse(['--stpes=3'])
    cfg, rest = compare.parse(['--gpus=0,1', '--max_iters=5', '--report_only=yes', 'configs/x.py'])
    assert cfg['gpus'] == '0,1' and cfg['report_only'] is True
    assert rest == ['--max_iters=5', 'configs/x.py']  # train.py's keys and files, handed on to every run
    with pytest.raises(SystemExit, match='routing_tokens=many: expected a number'):  # a known key is still read
        compare.parse(['--routing_tokens=many'])


def test_quiet_inductor_silences_only_the_online_softmax_notice():
    """compile_model hides Inductor's 'Online softmax is disabled' notice (six lines at every compile of the
    plain routed softmax) and nothing else."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        cli.quiet_inductor()
        warnings.warn('\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.',
                      UserWarning)
        warnings.warn('TensorFloat32 tensor cores for float32 matrix multiplication available', UserWarning)
    assert [str(w.message)[:11] for w in seen] == ['TensorFloat']
