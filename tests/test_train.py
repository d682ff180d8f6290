"""
Tests of train.py on the CPU with tiny models (2 layers, 32 wide) and tiny shards written here: configuration,
data order, learning-rate schedule, exact resume, crash-safe checkpoints, NaN stop, DDP against grad
accumulation, conversion between variants, and train-then-sample.
"""
import errno
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import cli  # noqa: E402
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
    cfg = train.parse_config([str(path), '--learning_rate=1', '--out_dir=a=b/c', '--compile=no', '--ddl_dv=2*2'])
    assert (cfg.n_layer, cfg.total_batch_size, cfg.residual, cfg.ddl_dv) == (4, 524_288, 'ddl', 4)
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float  # an int is fine for a float
    assert cfg.out_dir == 'a=b/c' and cfg.compile is False                # a value may contain '='
    assert train.parse_config(['--compile=1']).compile is True            # cli.py's bools: 1/true/yes, 0/false/no
    assert cfg.n_head == train.Config().n_head                            # untouched keys keep the default
    assert train.parse_config([str(path), '--n_layer=6']).n_layer == 6   # the later one wins
    assert train.parse_config(['--n_layer=6', str(path)]).n_layer == 4


@pytest.mark.parametrize('argv, file_text, expected', [
    (['--learning_rat=1e-3'], None, ["unknown key 'learning_rat'", 'learning_rate', 'known keys: block_size']),
    (['--max_iters=1.5'], None, ['max_iters expects int', '1.5']),
    (['--compile=maybe'], None, ['compile expects bool']),
    ([], 'compile = 1\n', ['cfg.py:1', 'compile expects bool']),  # a file is Python: True or False
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
    # values that type-check but make no sense: one line naming the key and what it must be
    (['--learning_rate=-1e-3'], None, ['learning_rate=-0.001', '>= 0']),
    (['--beta1=1.5'], None, ['beta1=1.5', 'in [0, 1)']),
    (['--beta2=-0.1'], None, ['beta2=-0.1', 'in [0, 1)']),
    (['--weight_decay=-0.1'], None, ['weight_decay=-0.1', '>= 0']),
    (['--min_lr=1e-2'], None, ['min_lr=0.01', '<= learning_rate']),
    (['--grad_clip=-1'], None, ['grad_clip=-1.0', '>= 0']),
    (['--warmup_iters=-5'], None, ['warmup_iters=-5', '>= 0']),
    (['--out_dir='], None, ["out_dir=''", 'not empty']),
    (['--route_impl=triton'], None, ["route_impl='triton'", 'auto, plain, fused']),
    (['--dtype=float8'], None, ["dtype='float8'", 'bfloat16']),
    (['--n_layer=2', '--res_block=6'], None, ['res_block=6', 'S <= 2 * n_layer = 4']),
])
def test_bad_config_is_refused_with_a_clear_message(tmp_path, argv, file_text, expected):
    if file_text is not None:
        (tmp_path / 'cfg.py').write_text(file_text)
        argv = [str(tmp_path / 'cfg.py')] + argv
    with pytest.raises(train.ConfigError) as e:
        train.parse_config(argv)
    for text in expected:
        assert text in str(e.value)


def test_token_ids_past_the_vocabulary_are_refused_when_the_shard_opens(tmp_path, data_dir):
    """A shard with an id >= vocab_size stops the run before its first step, naming the file, the id and the
    vocabulary (it would otherwise be an IndexError mid-run, or a device-side assert on CUDA)."""
    bad = tmp_path / 'bad'
    bad.mkdir()
    shutil.copy(os.path.join(data_dir, 'tiny_val_000000.bin'), bad / 'tiny_val_000000.bin')
    write_shard(str(bad / 'tiny_train_000001.bin'), np.r_[token_stream(2_000, 1), 600])
    with pytest.raises(SystemExit) as e:
        run(bad, tmp_path / 'out', '--max_iters=4')
    msg = e.value.code
    assert 'tiny_train_000001.bin' in msg and 'token id 600' in msg and 'vocab_size=512' in msg
    with pytest.raises(SystemExit) as e:  # the data's ids are fine, the vocabulary asked for is too small
        run(data_dir, tmp_path / 'out', '--vocab_size=256', '--max_iters=4')
    assert 'is not below vocab_size=256' in e.value.code
    assert not (tmp_path / 'out').exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a machine without CUDA')
def test_a_device_this_machine_lacks_is_one_line(tmp_path, data_dir):
    for device, words in (('cuda', 'no CUDA GPU'), ('tpu', "expected 'auto', 'cpu'")):
        with pytest.raises(SystemExit) as e:
            run(data_dir, tmp_path / 'out', f'--device={device}', '--max_iters=4')
        assert e.value.code.startswith('error: device=') and words in e.value.code, e.value.code


def test_main_exits_nonzero_on_bad_input(tmp_path, data_dir):
    with pytest.raises(SystemExit) as e:
        train.main(['--bogus=1'])
    assert "unknown key 'bogus'" in str(e.value.code)
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
    shared = os.path.join(ROOT, 'configs', 'compare.py')  # the comparison's settings, then one variant's fields
    for extra in ([], [os.path.join(ROOT, 'configs', 'corpus.py')]):  # and the comparison at a real budget
        runs = {name: asdict(train.parse_config([shared, *extra] + [f'--{k}={v}' for k, v in fields.items()]))
                for name, fields in cli.VARIANTS.items()}
        assert list(runs) == ['standard', 'ddl', 'ddl_dv4', 'attnres', 'attnres_block', 'delta', 'delta_block']
        for name, cfg in runs.items():  # one run, except for the variant
            assert {k for k in cfg if cfg[k] != runs['standard'][k]} <= VARIANT_FIELDS, name
    corpus = asdict(train.parse_config([shared, os.path.join(ROOT, 'configs', 'corpus.py')]))
    assert corpus['max_iters'] * corpus['total_batch_size'] >= 100_000_000  # at least 100M tokens a run
    assert all(corpus[k] == cfgs['compare'][k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size'))
    del cfgs['corpus']  # it sets no out_dir of its own: compare.py gives one to every run
    ddp = asdict(train.parse_config([os.path.join(ROOT, 'configs', f) for f in ('gpt2_124m.py', 'gpt2_124m_ddp.py')]))
    assert ddp['total_batch_size'] % (ddp['batch_size'] * ddp['block_size'] * 8) == 0  # 8 GPUs divide it
    conv = cfgs['convert_delta']
    assert conv['residual'] == 'delta' and conv['delta_gate'] and conv['routing_lr_mult'] > 1
    assert conv['init_from'] == cfgs['gpt2_124m']['out_dir']
    assert all(conv[k] == cfgs['gpt2_124m'][k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'))
    assert cfgs['cpu_quickstart']['device'] == 'cpu'

def test_finetune_configs_of_the_repo():
    # the conversion experiment: every arm is configs/finetune.py plus its variant; the fine-tuned arms start from
    # the pretrained model and match its backbone; the control differs from arm (b) in its start and learning rate
    import compare
    cfg = lambda *names: asdict(train.parse_config([os.path.join(ROOT, 'configs', f'{n}.py') for n in names]))
    pretrain, shared = cfg('finetune_pretrain'), cfg('finetune')
    assert pretrain['residual'] == 'standard' and shared['init_from'] == pretrain['out_dir']
    assert all(shared[k] == pretrain[k] for k in checkpoint.BACKBONE_KEYS + ['data_dir', 'total_batch_size'])
    arms = {name: cfg('finetune', f'finetune_{name}') for name in compare.FINETUNE_RUNS}
    for name, c in arms.items():
        assert {k for k in c if c[k] != shared[k]} <= VARIANT_FIELDS | {'out_dir'} or name == 'delta_block_scratch'
    b, f = arms['delta_block'], arms['delta_block_scratch']
    assert {k for k in f if f[k] != b[k]} == {'out_dir', 'init_from', 'learning_rate', 'min_lr', 'routing_lr_mult'}
    assert f['init_from'] == 'scratch' and f['learning_rate'] == pretrain['learning_rate']
    assert b['delta_gate'] and arms['delta']['delta_gate'] and (b['res_block'], arms['delta']['res_block']) == (6, 0)
    assert (arms['attnres_block']['residual'], arms['attnres_block']['res_block']) == ('attnres', 6)
    # from GPT-2: configs/finetune_gpt2.py gives every arm GPT-2's backbone; the control still starts from scratch
    gpt2 = {name: cfg('finetune', 'finetune_gpt2', f'finetune_{name}') for name in compare.FINETUNE_RUNS}
    assert [c['init_from'] for c in gpt2.values()] == ['gpt2'] * 5 + ['scratch']
    assert all((c['vocab_size'], c['block_size'], c['bias'], c['gelu_approx']) == (50257, 1024, True, 'tanh')
               for c in gpt2.values())

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
        env = SimpleNamespace(rank=0, world=1, device='cpu', ctx=torch.no_grad())
        assert train.evaluate(model, val, 7, cfg, env) == pytest.approx(expected, abs=1e-6)

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
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / 'b', *args)
    assert e.value.code == 130
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
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, '--max_iters=8', '--init_from=resume')
    monkeypatch.undo()
    assert e.value.code == 130 and not (out / 'ckpt.pt.tmp').exists()
    assert (out / 'ckpt.pt').read_bytes() == good
    assert load(out)['step'] == 4
    run(data_dir, out, '--max_iters=8', '--init_from=resume', '--total_batch_size=64')  # and goes on from it
    assert load(out)['step'] == 8 and load(out)['tokens'] == 4 * 128 + 4 * 64  # with half the batch size
    assert [r['tokens'] for r in records(out)][4:] == [512, 576, 640, 704, 768]


@pytest.mark.parametrize('max_iters', [12, 10])
def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path, data_dir, max_iters):
    """A step's loss is read during the next step, or before a log line, evaluation or checkpoint: with
    log_interval=3 step 10's is read in step 11 (max_iters=12), or before step 10's checkpoint, which
    must not be written (max_iters=10)."""
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=8')
    good = (out / 'ckpt.pt').read_bytes()
    # an infinite learning rate turns the weights to inf/NaN in step 9, so the loss of step 10 is NaN
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, f'--max_iters={max_iters}', '--init_from=resume', '--learning_rate=1e999',
            '--log_interval=3')
    assert 'train loss is nan at step 10' in str(e.value.code) and 'step 8' in str(e.value.code)
    assert (out / 'ckpt.pt').read_bytes() == good
    assert max(r['step'] for r in records(out)) == 9  # nothing was logged for the failed step


# -----------------------------------------------------------------------------
# nothing lost: hard kills, Ctrl-C, damaged checkpoints and failed saves

DURABLE = ['--max_iters=12', '--dropout=0.1']  # checkpoints at steps 4, 8 and 12; dropout: the RNG must resume too


def steps(out_dir):
    """The step lines of log.jsonl without tok/s, the one field that is a wall-clock measurement."""
    return [{k: v for k, v in r.items() if k != 'tok_per_s'} for r in records(out_dir)]


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp('unbroken')
    run(data_dir, out, *DURABLE)
    return out


def killed(data_dir, out_dir, point, *args):
    """Run train.py in a forked child (the parent's torch, no new interpreter) with RESIDUAL_GPT_KILL=point;
    True if it killed itself with SIGKILL there."""
    pid = os.fork()
    if pid == 0:
        try:
            os.environ['RESIDUAL_GPT_KILL'] = point
            run(data_dir, out_dir, *args)
        finally:
            os._exit(1)  # not killed: the point was never reached
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# each scenario: kill points of the first run, then of resumed runs; after the last kill a resume runs to the end
# (step:N is the middle of the step after step N, just before the checkpoint of an eval step: step:7)
KILLS = [['step:7'], ['step:6'], ['log:5'], ['log:8'], ['save:8'], ['rename:8'], ['rename:12'],
         ['step:6', 'log_rewrite:4'], ['save:8', 'rename:8'], ['log:8', 'log_rewrite:4', 'step:11']]


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='the kill test forks')
@pytest.mark.parametrize('points', KILLS, ids=['-'.join(k) for k in KILLS])
def test_hard_kills_lose_nothing(tmp_path, data_dir, unbroken, points):
    out = tmp_path / 'out'
    for i, point in enumerate(points):
        assert killed(data_dir, out, point, *DURABLE, *(['--init_from=resume'] if i else [])), point
        assert not (out / 'log.jsonl.tmp').exists() or point.startswith('log_rewrite')
        with open(out / 'log.jsonl') as f:  # never emptied: the config line and every step up to the checkpoint
            assert 'config' in json.loads(f.readline())
        saved = checkpoint.load_checkpoint(str(out))['step']  # the checksum holds
        assert [r['step'] for r in records(out)][: saved + 1] == list(range(saved + 1))
    run(data_dir, out, *DURABLE, '--init_from=resume')
    assert steps(out) == steps(unbroken)  # line for line, bit-exact losses
    a, b = load(unbroken), load(out)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']) and a['data'] == b['data']
    assert not list(out.glob('*.tmp'))


def sigint():
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by train.py's signal handler


def test_ctrl_c_stops_at_the_next_safe_point(tmp_path, data_dir, unbroken, monkeypatch, capsys):
    out = tmp_path / 'out'
    calls = {'n': 0}
    next_batch = train.DataLoader.next_batch

    def ctrl_c_in_step_5(self):  # 2 micro-batches per step: call 11 is the forward of step 5 -> 6
        calls['n'] += 1
        if calls['n'] == 11:
            sigint()
        return next_batch(self)
    monkeypatch.setattr(train.DataLoader, 'next_batch', ctrl_c_in_step_5)
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, *DURABLE)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert e.value.code == 130 and 'Traceback' not in err
    assert 'interrupted at step 6; last checkpoint step 4; resume with --init_from=resume' in err
    assert records(out)[-1]['step'] == 6  # the step finished, and its line was written
    run(data_dir, out, *DURABLE, '--init_from=resume')
    assert steps(out) == steps(unbroken)


@pytest.mark.parametrize('presses', [1, 2])
def test_ctrl_c_during_a_save(tmp_path, data_dir, monkeypatch, capsys, presses):
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=4')
    good = (out / 'ckpt.pt').read_bytes()
    save = torch.save

    def save_with_ctrl_c(obj, f):
        for _ in range(presses):
            sigint()
        save(obj, f)
    monkeypatch.setattr(train.torch, 'save', save_with_ctrl_c)
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, '--max_iters=12', '--init_from=resume')
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert e.value.code == 130 and 'Traceback' not in err and not (out / 'ckpt.pt.tmp').exists()
    if presses == 1:  # the save finishes, then the run stops: nothing to redo
        assert 'interrupted at step 8; last checkpoint step 8' in err and load(out)['step'] == 8
    else:  # stop at once: the save is abandoned, the previous checkpoint stays
        assert 'interrupted at step 8; last checkpoint step 4' in err and (out / 'ckpt.pt').read_bytes() == good


def flip_bit(b):
    return b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:]


def another_program(_):  # e.g. nanoGPT's checkpoint: a readable torch file without train.py's keys
    buf = io.BytesIO()
    torch.save({'model': {'w': torch.ones(2)}, 'iter_num': 3}, buf)
    return buf.getvalue()


DAMAGE = {  # ckpt.pt's bytes -> a bad file, and what the message must say
    'empty': (lambda b: b'', 'the file is empty (0 bytes)'),
    'truncated': (lambda b: b[: len(b) // 2], 'torch cannot read it and it has no checksum'),
    'last bytes cut': (lambda b: b[:-10], 'it is cut short'),
    'zeroed header': (lambda b: bytes(64) + b[64:], 'its contents do not match the SHA-256'),
    'flipped bit': (flip_bit, 'its contents do not match the SHA-256'),
    'flipped bit in the checksum': (lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:], 'its contents do not match the SHA-256'),
    'text': (lambda b: b'not a checkpoint\n', 'torch cannot read it and it has no checksum'),
    'another program': (another_program, 'it is not a checkpoint of train.py (no config, model_args, step)'),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_checkpoint_is_refused_with_one_clear_message(tmp_path, data_dir, standard_ckpt, damage):
    out = tmp_path / 'out'
    shutil.copytree(standard_ckpt, out)
    bad, expected = DAMAGE[damage]
    (out / 'ckpt.pt').write_bytes(bad((out / 'ckpt.pt').read_bytes()))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if damage == 'flipped bit':  # torch alone reads it without noticing: only the checksum finds it
        assert torch.load(out / 'ckpt.pt', weights_only=True)['step'] == 8
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, '--max_iters=12', '--init_from=resume')
    msg = e.value.code
    assert msg.startswith(f'error: {out / "ckpt.pt"} is not a usable checkpoint: {expected}')
    assert msg.endswith('nothing was changed: the files of the run, and the previous good state in them, '
                        'are as they were') and 'weights_only' not in msg and '\n' not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def fault_replace(replace):
    def fails_for_ckpt(src, dst):  # the rename of log.jsonl's rewrite on resume still works
        if str(dst).endswith('ckpt.pt'):
            raise PermissionError(errno.EACCES, 'Permission denied')
        return replace(src, dst)
    return fails_for_ckpt


def fault_disk_full(obj, f):
    f.write(b'x' * 1000)
    raise OSError(errno.ENOSPC, 'No space left on device')


def fault_torch_write(obj, f):  # how torch.save reports a write that failed inside its zip writer
    f.write(b'x' * 1000)
    raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')


def fault_open(open_):
    def fails_for_tmp(path, *a, **kw):
        if str(path).endswith('ckpt.pt.tmp'):
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return open_(path, *a, **kw)
    return fails_for_tmp


def fault_torch_disk_full(obj, f):  # a full disk, in the words of torch's zip writer, and 0 bytes free
    f.write(b'x' * 1000)
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(100 * 2**30, 100 * 2**30, 0)
    raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')


FAULTS = {'rename': ('os.replace', fault_replace(os.replace), 'Permission denied'),
          'disk full': ('torch.save', fault_disk_full, 'No space left on device'),
          'disk full, torch': ('torch.save', fault_torch_disk_full, 'no space left on device (torch: '),
          'torch write': ('torch.save', fault_torch_write, 'unexpected pos'),
          'no permission': ('builtins.open', fault_open(open), 'Permission denied')}


@pytest.mark.parametrize('fault', FAULTS)
def test_a_failed_save_is_a_clear_error_and_keeps_the_checkpoint(tmp_path, data_dir, monkeypatch, fault):
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=4')
    good = (out / 'ckpt.pt').read_bytes()
    target, fake, reason = FAULTS[fault]
    monkeypatch.setattr(target, fake)
    monkeypatch.setattr(shutil, 'disk_usage', shutil.disk_usage)  # put back after a fault that fakes it
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, '--max_iters=8', '--init_from=resume')
    monkeypatch.undo()
    path = out / 'ckpt.pt'
    assert e.value.code.startswith(f'error: cannot write the checkpoint {path}: ') and reason in e.value.code
    assert e.value.code.endswith(f'{path}.tmp removed, the previous {path} is unchanged')
    assert path.read_bytes() == good and not (out / 'ckpt.pt.tmp').exists()
    run(data_dir, out, '--max_iters=8', '--init_from=resume')  # and the run goes on from it
    assert load(out)['step'] == 8


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
    run(data_dir, tmp_path, f'--init_from={standard_ckpt}', '--max_iters=1', '--learning_rate=0', '--min_lr=0', *variant)
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


def test_a_checkpoint_from_before_gelu_approx_converts_and_resumes(tmp_path, data_dir, standard_ckpt, capsys):
    # checkpoints written before GPTConfig.gelu_approx existed lack the field: they had the exact GELU, the default
    ckpt = load(standard_ckpt)
    del ckpt['model_args']['gelu_approx'], ckpt['config']['gelu_approx']
    old = tmp_path / 'old'
    old.mkdir()
    torch.save(ckpt, old / 'ckpt.pt')
    run(data_dir, tmp_path / 'delta', f'--init_from={old}', '--max_iters=1', '--residual=delta', '--delta_gate=True')
    assert records(tmp_path / 'delta')[0]['val_loss'] == ckpt['val_loss']
    run(data_dir, old, '--init_from=resume', '--max_iters=12')
    assert load(old)['step'] == 12 and load(old)['model_args']['gelu_approx'] == 'none'
    assert 'init_from=' + str(old) + ': a checkpoint of train.py (residual=standard, step 8' in capsys.readouterr().out


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
    one, two = records(tmp_path / 'one'), records(tmp_path / 'two')
    assert [a['step'] for a in one] == [b['step'] for b in two] == list(range(5))
    assert one[0]['train_loss'] is two[0]['train_loss'] is None  # step 0 comes before any training
    for a, b in zip(one[1:], two[1:]):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
    assert [a['step'] for a in one if 'val_loss' in a] == [b['step'] for b in two if 'val_loss' in b] == [0, 4]
    for a, b in zip(one[::4], two[::4]):
        assert a['val_loss'] == pytest.approx(b['val_loss'], rel=1e-5)


CTRL_C_ON_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
next_batch, calls = train.DataLoader.next_batch, [0]

def ctrl_c_on_rank_1(self):  # 1 micro-batch a step on each rank: call 5 is the forward of step 4 -> 5
    calls[0] += 1
    if os.environ['RANK'] == '1' and calls[0] == 5:
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, on this rank alone
    return next_batch(self)

train.DataLoader.next_batch = ctrl_c_on_rank_1
try:
    train.main()
finally:  # where this rank stopped, and how
    with open(os.path.join({out!r}, 'rank' + os.environ['RANK']), 'w') as f:
        f.write(f'{{train.progress.step}} {{sys.exc_info()[1].code}}')
"""


@pytest.mark.slow
def test_ddp_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, data_dir):
    """Ctrl-C on rank 1 alone, during step 4 -> 5: every rank stops at the same safe point, with exit status
    130, the log and the checkpoint of a finished step. Each rank sends its count at every safe point and acts on
    the counts of the one before, so that it never waits for its GPU to finish a step before queueing the next:
    a DDP run stops at step 6 where a single process stops at 5 (test_ctrl_c_stops_at_the_next_safe_point)."""
    driver = tmp_path / 'driver.py'
    driver.write_text(CTRL_C_ON_RANK_1.format(root=ROOT, out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver), *TINY,
           '--max_iters=8', f'--data_dir={data_dir}', f'--out_dir={tmp_path / "two"}']
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0, p.stderr[-3000:]
    assert [(tmp_path / f'rank{r}').read_text() for r in (0, 1)] == ['6 130', '6 130'], p.stderr[-3000:]
    assert 'interrupted at step 6; last checkpoint step 4; resume with --init_from=resume' in p.stderr
    assert records(tmp_path / 'two')[-1]['step'] == 6 and load(tmp_path / 'two')['step'] == 4


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


def test_a_checkpoint_of_the_older_layout_loads_and_resumes(tmp_path, data_dir):
    """Checkpoints written while route_impl was a field of GPTConfig keep it in model_args: they still load
    into a model (sample.py, compare.py) and resume, with route_impl read as a training option again."""
    out = tmp_path / 'out'
    run(data_dir, out, '--max_iters=4', '--residual=delta')
    ckpt = checkpoint.load_checkpoint(str(out))
    ckpt['model_args']['route_impl'] = 'plain'
    checkpoint.save_checkpoint(ckpt, str(out / 'ckpt.pt'))
    model, _ = checkpoint.load_model(str(out / 'ckpt.pt'), 'cpu')
    assert model.config.residual == 'delta' and not hasattr(model.config, 'route_impl')
    run(data_dir, out, '--max_iters=8', '--init_from=resume')
    assert load(out)['step'] == 8
