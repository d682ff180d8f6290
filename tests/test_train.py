"""
Tests of train.py on the CPU with tiny models (2 layers, 32 wide) and tiny shards written here: configuration,
data order, learning-rate schedule, exact resume, crash-safe checkpoints, NaN stop, DDP against grad
accumulation, conversion between variants, and train-then-sample.
"""
import glob
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from prepare import load_shard, write_shard  # noqa: E402

# 4 sequences of 16 tokens = 64 tokens per micro-batch; a total of 128 tokens per step means 2 micro-steps
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--vocab_size=512', '--batch_size=4',
        '--total_batch_size=128', '--warmup_iters=2', '--learning_rate=1e-2', '--val_tokens=512',
        '--eval_interval=4', '--log_interval=1', '--device=cpu']
VARIANT_FIELDS = {'residual', 'res_block', 'ddl_dv', 'delta_gate'}


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # tiny matmuls: extra threads only add overhead, and on a busy 2-core machine they wait on each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def token_stream(n, seed):
    """Mostly a fixed successor rule over 64 tokens (learnable in a few steps), 10% noise over 512 tokens."""
    rng = np.random.default_rng(seed)
    t = np.empty(n, dtype=np.int64)
    t[0] = 1
    noise = rng.random(n) < 0.1
    rand = rng.integers(0, 512, n)
    for i in range(1, n):
        t[i] = rand[i] if noise[i] else (t[i - 1] * 7 + 3) % 64
    return t


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    write_shard(str(d / 'tiny_val_000000.bin'), token_stream(2_000, 0))
    write_shard(str(d / 'tiny_train_000001.bin'), token_stream(3_000, 1))
    write_shard(str(d / 'tiny_train_000002.bin'), token_stream(2_000, 2))
    return str(d)


def run(data_dir, out_dir, *args):
    train.main(TINY + [f'--data_dir={data_dir}', f'--out_dir={out_dir}', *args])


def records(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if 'step' in r]


def load(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)

# -----------------------------------------------------------------------------
# configuration

def test_config_file_then_overrides_in_order(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text('"""a docstring"""\n# a comment\nn_layer = 4\ntotal_batch_size = 8 * 64 * 1024\n'
                    "learning_rate = 3e-4\nresidual = 'ddl'\nout_dir = 'from-file'\n")
    cfg = train.parse_config([str(path), '--learning_rate=1', '--out_dir=a=b/c', '--compile=false', '--ddl_dv=4'])
    assert (cfg.n_layer, cfg.total_batch_size, cfg.residual, cfg.ddl_dv) == (4, 524_288, 'ddl', 4)
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float  # an int is fine for a float
    assert cfg.out_dir == 'a=b/c' and cfg.compile is False                # a value may contain '='
    assert cfg.n_head == train.Config().n_head                            # untouched keys keep the default
    assert train.parse_config([str(path), '--n_layer=6']).n_layer == 6   # the later one wins
    assert train.parse_config(['--n_layer=6', str(path)]).n_layer == 4


@pytest.mark.parametrize('argv, file_text, expected', [
    (['--learning_rat=1e-3'], None, ["unknown config key 'learning_rat'", 'learning_rate']),
    (['--max_iters=1.5'], None, ['max_iters expects int', '1.5']),
    (['--compile=1'], None, ['compile expects bool']),
    (['--n_layer'], None, ['--n_layer', 'expected --key=value']),
    (['--learning_rate=fast'], None, ['--learning_rate=fast', 'expected a number']),
    (['--residual=resnet'], None, ['residual', 'resnet']),
    (['--lr_schedule=linear'], None, ['lr_schedule', "'cosine' or 'wsd'"]),
    (['--batch_size=0'], None, ['batch_size=0', '> 0']),
    ([], 'n_layer = 2\nimport os\n', ['cfg.py:2', 'only `name = value`']),
    ([], 'n_layer = int("3")\n', ['cfg.py:1', 'int(']),
    ([], 'n_layr = 3\n', ['cfg.py:1', 'n_layer']),
    ([], 'bias = "no"\n', ['cfg.py:1', 'bias expects bool']),
    ([], 'n_layer = (\n', ['cfg.py:1', 'syntax error']),
])
def test_bad_config_is_refused_with_a_clear_message(tmp_path, argv, file_text, expected):
    if file_text is not None:
        (tmp_path / 'cfg.py').write_text(file_text)
        argv = [str(tmp_path / 'cfg.py')] + argv
    with pytest.raises(train.ConfigError) as e:
        train.parse_config(argv)
    for text in expected:
        assert text in str(e.value)


def test_main_exits_nonzero_on_bad_input(tmp_path, data_dir):
    with pytest.raises(SystemExit) as e:
        train.main(['--bogus=1'])
    assert 'unknown config key' in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # 128 tokens per step cannot be split into micro-batches of 3 x 16
        run(data_dir, tmp_path / 'out', '--batch_size=3')
    assert 'total_batch_size=128 is not a multiple of' in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / 'nothing-here', tmp_path / 'out')
    assert 'nothing-here' in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / 'out', '--init_from=resume')
    assert 'no checkpoint at' in str(e.value.code)


def test_model_fields_match_gptconfig():
    # every GPTConfig field can be configured, and the defaults agree with model.py's
    for k in train.MODEL_KEYS:
        assert getattr(train.Config(), k) == getattr(GPTConfig(), k), k


def test_config_files_of_the_repo():
    paths = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
    cfgs = {os.path.basename(p)[:-3]: asdict(train.parse_config([p])) for p in paths}
    shared = os.path.join(ROOT, 'configs', 'compare.py')  # the comparison's settings, then one variant's file
    compare = {k: asdict(train.parse_config([shared, p])) for k, p in zip(cfgs, paths) if k.startswith('compare_')}
    assert {'standard', 'ddl', 'ddl_dv4', 'attnres', 'attnres_block', 'delta', 'delta_block'} <= {
        k.removeprefix('compare_') for k in compare}
    base = compare['compare_standard']
    for name, cfg in compare.items():  # one run, except for the variant and where it is written
        assert {k for k in cfg if cfg[k] != base[k]} <= VARIANT_FIELDS | {'out_dir'}, name
        assert {k for k in cfg if cfg[k] != cfgs['compare'][k]} <= VARIANT_FIELDS | {'out_dir'}, name
    assert len({c['out_dir'] for c in cfgs.values()}) == len(cfgs)  # no two configs share an out_dir
    ddp = asdict(train.parse_config([os.path.join(ROOT, 'configs', f) for f in ('gpt2_124m.py', 'gpt2_124m_ddp.py')]))
    assert ddp['total_batch_size'] % (ddp['batch_size'] * ddp['block_size'] * 8) == 0  # 8 GPUs divide it
    conv = cfgs['convert_delta']
    assert conv['residual'] == 'delta' and conv['delta_gate'] and conv['routing_lr_mult'] > 1
    assert conv['init_from'] == cfgs['gpt2_124m']['out_dir']
    assert all(conv[k] == cfgs['gpt2_124m'][k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'))
    assert cfgs['cpu_quickstart']['device'] == 'cpu'

# -----------------------------------------------------------------------------
# schedule and data

def test_lr_schedules():
    cfg = train.parse_config(['--learning_rate=1', '--min_lr=0.1', '--warmup_iters=10', '--max_iters=110'])
    lrs = [train.get_lr(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(1.0) and lrs[109] == pytest.approx(0.1)  # cosine down to min_lr at the end
    assert lrs[59] == pytest.approx(0.55, abs=0.01)  # half way: the mean of the two
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    cfg = train.parse_config(['--learning_rate=1', '--min_lr=0.1', '--warmup_iters=10', '--max_iters=110',
                              '--lr_schedule=wsd', '--cooldown_frac=0.5'])
    lrs = [train.get_lr(s, cfg) for s in range(110)]
    assert lrs[9] == lrs[54] == pytest.approx(1.0)  # stable until the last 55 steps
    assert lrs[109] == pytest.approx(0.1) and lrs[82] == pytest.approx(0.55, abs=0.02)  # then linear


def test_data_loader_ranks_are_disjoint_and_position_resumes():
    shards = [np.arange(100, dtype=np.uint16), np.arange(1000, 1060, dtype=np.uint16)]
    # world of 2, B=2, T=4: each micro-step the two ranks read 16 tokens of inputs together
    r0, r1 = (train.DataLoader(shards, 2, 4, rank=r, world=2) for r in (0, 1))
    one = train.DataLoader(shards, 4, 4)  # one process with the same tokens per micro-step
    for _ in range(12):  # 6 micro-steps in shard 0 (pos 0..80), 3 in shard 1, then back to shard 0
        a, b, c = r0.next_batch(), r1.next_batch(), one.next_batch()
        assert len(a) == len(b) == 9 and not set(a[:-1]) & set(b[:-1])
        assert np.array_equal(np.concatenate([a[:-1], b]), c)  # the two ranks cover what one process reads
        assert r0.state() == r1.state() == one.state()
    assert one.state() == {'shard': 0, 'pos': 48} and c[0] == 32  # shard 0, after shard 1's 3 micro-steps
    again = train.DataLoader(shards, 4, 4)
    again.load_state(one.state())
    for _ in range(5):
        assert np.array_equal(again.next_batch(), one.next_batch())
    with pytest.raises(train.ConfigError, match='short.bin has 8 tokens'):
        train.DataLoader([np.arange(8)], 2, 4, names=['short.bin'])  # needs 2 * 4 + 1

def test_val_loss_does_not_depend_on_batch_size(data_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=512))
    val = load_shard(os.path.join(data_dir, 'tiny_val_000000.bin'))
    x, y = train.to_batch(val[: 7 * 16 + 1], 16, 'cpu')  # 7 sequences: the mean over all 112 tokens
    expected = model(x, y)[1].item()
    for b in (1, 3, 7, 32):  # 3: batches of 3, 3 and 1 sequences, which must be weighted by their tokens
        cfg = train.parse_config(TINY + [f'--batch_size={b}'])
        assert train.evaluate(model, val, 7, cfg, 0, 1, 'cpu', torch.no_grad()) == pytest.approx(expected, abs=1e-6)

# -----------------------------------------------------------------------------
# runs: resume, crash safety, NaN, conversion, DDP, sampling

def test_resume_after_a_crash_gives_the_same_losses(tmp_path, data_dir, monkeypatch):
    args = ['--max_iters=8', '--dropout=0.1']  # dropout: the RNG state must be restored as well
    run(data_dir, tmp_path / 'a', *args)
    calls = {'n': 0}
    next_batch = train.DataLoader.next_batch

    def crash_in_step_6(self):  # 2 micro-batches per step: call 11 is the first of step 6
        calls['n'] += 1
        if calls['n'] == 11:
            raise KeyboardInterrupt
        return next_batch(self)
    monkeypatch.setattr(train.DataLoader, 'next_batch', crash_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, tmp_path / 'b', *args)
    monkeypatch.undo()
    assert load(tmp_path / 'b')['step'] == 4  # the last checkpoint before the crash
    run(data_dir, tmp_path / 'b', *args, '--init_from=resume')
    a, b = records(tmp_path / 'a'), records(tmp_path / 'b')
    assert [r['step'] for r in b] == list(range(9))  # the lines of the lost steps 5 and 6 were dropped
    for ra, rb in zip(a, b):  # bit-exact: the same batches, dropout masks and optimizer state
        assert [ra[k] for k in ('tokens', 'train_loss', 'lr')] == [rb[k] for k in ('tokens', 'train_loss', 'lr')]
        assert ra.get('val_loss') == rb.get('val_loss')
    ca, cb = load(tmp_path / 'a'), load(tmp_path / 'b')
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])
    assert ca['data'] == cb['data'] and ca['step'] == cb['step'] == 8


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=4')
    good = (out / 'ckpt.pt').read_bytes()

    def torn_save(obj, f):  # the process dies half way through writing the checkpoint
        f.write(good[: len(good) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(train.torch, 'save', torn_save)
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, out, '--max_iters=8', '--init_from=resume')
    monkeypatch.undo()
    assert (out / 'ckpt.pt').read_bytes() == good
    assert load(out)['step'] == 4
    run(data_dir, out, '--max_iters=8', '--init_from=resume', '--total_batch_size=64')  # and goes on from it
    assert load(out)['step'] == 8 and load(out)['tokens'] == 4 * 128 + 4 * 64  # with half the batch size
    assert [r['tokens'] for r in records(out)][4:] == [512, 576, 640, 704, 768]


def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path, data_dir):
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=8')
    good = (out / 'ckpt.pt').read_bytes()
    # an infinite learning rate turns the weights to inf/NaN in step 9, so the loss of step 10 is NaN
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, '--max_iters=12', '--init_from=resume', '--learning_rate=1e999')
    assert 'train loss is nan at step 10' in str(e.value.code) and 'step 8' in str(e.value.code)
    assert (out / 'ckpt.pt').read_bytes() == good
    assert max(r['step'] for r in records(out)) == 9  # nothing was logged for the failed step


@pytest.fixture(scope='module')
def standard_ckpt(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp('standard')
    run(data_dir, out, '--max_iters=8')
    return str(out)


@pytest.mark.parametrize('variant', [['--residual=ddl'], ['--residual=ddl', '--ddl_dv=2'],
                                     ['--residual=attnres'], ['--residual=attnres', '--res_block=2'],
                                     ['--residual=delta'], ['--residual=delta', '--res_block=3'],
                                     ['--residual=delta', '--delta_gate=True']])
def test_convert_standard_checkpoint_into_a_variant(tmp_path, data_dir, standard_ckpt, variant):
    # learning_rate=0: one step that changes nothing, so the checkpoint written holds the converted model
    run(data_dir, tmp_path, f'--init_from={standard_ckpt}', '--max_iters=1', '--learning_rate=0', *variant)
    src, dst = load(standard_ckpt), load(tmp_path)
    own = GPT(GPTConfig(**dst['model_args'])).variant_param_names()
    assert own and own <= dst['model'].keys() and not own & src['model'].keys()
    assert dst['model'].keys() - own == src['model'].keys()
    assert all(torch.equal(src['model'][k], dst['model'][k]) for k in src['model'])  # the backbone, loaded
    assert dst['data'] == {'shard': src['data']['shard'], 'pos': src['data']['pos'] + 2 * 64}  # data goes on
    first = records(tmp_path)[0]
    assert first['step'] == 0
    if '--delta_gate=True' in variant:  # the gate starts at 0: exactly the standard model's function (fp32, CPU)
        assert first['val_loss'] == src['val_loss']


@pytest.mark.parametrize('field', ['--n_embd=64', '--n_head=4', '--n_layer=3'])
def test_convert_refuses_another_backbone(tmp_path, data_dir, standard_ckpt, field):
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, f'--init_from={standard_ckpt}', '--residual=delta', field)
    assert field[2:].split('=')[0] in str(e.value.code) and standard_ckpt in str(e.value.code)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_with_grad_accumulation(tmp_path, data_dir):
    # no clipping, and the optimizer's moments are compared too: AdamW's update hides the gradient's scale
    args = ['--max_iters=4', '--residual=delta', '--grad_clip=0', f'--data_dir={data_dir}']
    run(data_dir, tmp_path / 'one', *args)  # 1 process: 2 micro-steps of 4 sequences per step
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           *TINY, *args, f'--out_dir={tmp_path / "two"}']  # 2 processes: 1 micro-step of 4 sequences each
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '4 B x 16 T x 1 accum x 2 ranks' in p.stderr + p.stdout
    one, two = load(tmp_path / 'one'), load(tmp_path / 'two')
    for k in one['model']:
        torch.testing.assert_close(two['model'][k], one['model'][k], rtol=1e-5, atol=1e-6)
    for a, b in zip(one['optimizer']['state'].values(), two['optimizer']['state'].values()):
        torch.testing.assert_close(b['exp_avg'], a['exp_avg'], rtol=1e-4, atol=1e-8)
    assert one['data'] == two['data']
    assert len(two['rng']) == 2
    for a, b in zip(records(tmp_path / 'one'), records(tmp_path / 'two')):
        for key in ('train_loss', 'val_loss'):  # None where a line has no such loss (pytest 9's approx refuses None)
            assert a.get(key) == (None if b.get(key) is None else pytest.approx(b[key], rel=1e-5)), (key, a, b)


def test_train_then_sample(tmp_path, data_dir):
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=24', '--eval_interval=12', '--residual=attnres', '--res_block=2')
    with open(out / 'log.jsonl') as f:
        first = json.loads(f.readline())
    assert first['config']['residual'] == 'attnres' and first['config']['max_iters'] == 24
    recs = records(out)
    assert [r['step'] for r in recs] == list(range(25))
    for r in recs:
        assert {'step', 'tokens', 'train_loss', 'lr', 'tok_per_s', 'mfu', 'peak_mem_mb'} <= r.keys()
        assert r['mfu'] is None and r['peak_mem_mb'] is None  # a CPU has no known peak and no CUDA memory
    evals = [r for r in recs if 'val_loss' in r]
    assert [r['step'] for r in evals] == [0, 12, 24]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0  # it learned the successor rule
    assert all(len(r['routing_max']) == len(r['routing_entropy']) == 5 for r in evals)  # 2L reads + the final
    assert recs[5]['tokens'] == 5 * 128 and recs[5]['tok_per_s'] > 0
    ckpt = load(out)
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    assert ckpt['config']['residual'] == 'attnres' and ckpt['val_loss'] == evals[-1]['val_loss']
    try:
        import tiktoken
        tiktoken.get_encoding('r50k_base')
    except Exception as e:
        pytest.skip(f"sample.py needs GPT-2's BPE (tiktoken 'r50k_base'), which could not be loaded: {e}")
    # 'a' is GPT-2 token 64, inside the tiny model's 512-token vocabulary
    p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out}', '--start=a', '--max_new_tokens=20',
                        '--num_samples=1', '--device=cpu'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip()
