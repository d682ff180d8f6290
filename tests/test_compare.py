"""compare.py end to end on a tiny model and tiny shards: every run trained through train.py, then the tables,
the JSON with the routing weights, and a second call that trains nothing; the conversion experiment's family
(configs/finetune*.py) from a pretrained checkpoint."""

import json
import os
from importlib.util import find_spec

import numpy as np
import pytest
import torch

import compare
import train
from prepare import write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ['--n_layer=3',  # 6 sublayers: the block forms' res_block=6 is one block
         '--n_embd=32', '--n_head=2', '--block_size=16', '--vocab_size=128', '--batch_size=2',
        '--total_batch_size=64', '--max_iters=4', '--eval_interval=2', '--log_interval=1', '--val_tokens=256',
        '--device=cpu', '--compile=False']


def write_data(d):
    rng = np.random.default_rng(0)
    write_shard(d / 'tiny_val_000000.bin', rng.integers(0, 128, 2_000))
    write_shard(d / 'tiny_train_000001.bin', rng.integers(0, 128, 5_000))


@pytest.mark.slow
def test_compare_trains_reports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # train.py and configs/
    write_data(tmp_path / 'data')
    out = tmp_path / 'cmp'
    args = [f'--out_dir={out}', f'--data_dir={tmp_path / "data"}', '--runs=standard,delta_block',
            '--extra_seeds=standard', '--routing_tokens=2', '--ablate=True', '--ablate_tokens=64',
            f'--extra_val={tmp_path / "data" / "tiny_val_000000.bin"}'] + TINY
    compare.main(args)
    runs = sorted(os.listdir(out))
    assert {'standard_s1337', 'standard_s1338', 'delta_block_s1337'} <= set(runs)
    table, routing_table = (out / 'results.md').read_text().split('\n\n', 1)  # the runs, then the routing
    assert [line.split('|')[1].strip() for line in table.splitlines()[2:]] == ['standard', 'standard', 'delta_block']
    assert '| read | delta_block |\n|---|---|\n| L0.mlp | ' in routing_table  # L0.attn reads e unrouted in delta
    result = json.loads((out / 'results.json').read_text())
    assert [r['tokens'] for r in result['rows']] == [4 * 64] * 3  # every run saw the same token budget
    assert result['rows'][0]['val_loss'] != result['rows'][1]['val_loss']  # the two seeds differ
    # res_block=6 with 6 sublayers: the block finishes after the last read, so each read mixes e and the partial
    w = np.array(result['routing']['delta_block']['weights'])  # (reads, sources): rows are distributions
    assert w.shape == (5, 2) and np.allclose(w.sum(1), 1, atol=1e-5)
    assert result['routing']['delta_block']['sources'] == ['emb', 'partial']
    assert 'standard' not in result['routing']  # no routing to show
    # the ablation: every read sees e and the partial block, so both can be removed from it
    imp = result['importance']['delta_block_s1337']
    assert np.array(imp['drop']).shape == (5, 2) and np.isfinite(np.array(imp['drop'])).all()
    assert len(imp['term']) == 5 and list(result['importance']) == ['delta_block_s1337']
    assert '| delta_block_s1337 | 5 |' in (out / 'results.md').read_text()  # weights against importance
    if find_spec('matplotlib'):
        assert (out / 'importance_delta_block_s1337.png').exists()
    assert all(r['val']['tiny_val_000000.bin'] > 0 for r in result['rows'])  # --extra_val, per run
    mtimes = {r: os.path.getmtime(out / r / 'ckpt.pt') for r in runs if (out / r / 'ckpt.pt').exists()}
    compare.main(args)  # every run has finished: nothing is trained again
    assert mtimes == {r: os.path.getmtime(out / r / 'ckpt.pt') for r in mtimes}


@pytest.mark.slow
def test_finetune_family_from_a_pretrained_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data, pretrain, out = tmp_path / 'data', tmp_path / 'pretrain', tmp_path / 'finetune'
    write_data(data)
    # the pretrained model that configs/finetune.py starts from, here a tiny one, and a config file that points
    # every arm to it. It goes between configs/finetune.py and each arm's file, as configs/finetune_gpt2.py would
    train.main(TINY + [f'--data_dir={data}', f'--out_dir={pretrain}'])
    (tmp_path / 'tiny.py').write_text(f'init_from = {str(pretrain)!r}\n')
    (tmp_path / 'missing.py').write_text(f'init_from = {str(tmp_path / "nowhere")!r}\n')
    args = ['--family=finetune', f'--out_dir={out}', f'--data_dir={data}', '--routing_tokens=2'] + TINY
    with pytest.raises(SystemExit) as e:  # every run's config is checked before any run starts
        compare.main(args + [f'--extra_configs={tmp_path / "missing.py"}'])
    assert e.value.code.startswith(f'error: run standard (seed 1337): init_from={tmp_path / "nowhere"}: no such file')
    assert not out.exists()
    compare.main(args + [f'--extra_configs={tmp_path / "tiny.py"}'])
    result = json.loads((out / 'results.json').read_text())
    rows = {r['run']: r for r in result['rows']}
    assert list(rows) == compare.FINETUNE_RUNS and all(r['tokens'] == 4 * 64 for r in rows.values())
    src = torch.load(pretrain / 'ckpt.pt', weights_only=True)
    for arm in ('standard', 'delta_block', 'delta'):  # the gate at 0: at step 0 exactly the pretrained model
        assert rows[arm]['start_val_loss'] == src['val_loss']
    assert rows['delta_block_scratch']['start_val_loss'] == pytest.approx(np.log(128), abs=0.1)  # random weights
    for arm in compare.FINETUNE_RUNS:  # the same tokens for the fine-tunes: those after the pretraining
        start = 0 if arm == 'delta_block_scratch' else src['data']['pos']
        assert torch.load(out / f'{arm}_s1337' / 'ckpt.pt', weights_only=True)['data']['pos'] == start + 4 * 64
    text = (out / 'results.md').read_text()
    table, routing_table = text.split('\n\n', 1)[0], text.split('\nLargest routing weight', 1)[1]
    assert table.startswith('| run | seed | val loss at step 0 | val loss |')
    assert f'| delta | 1337 | {src["val_loss"]:.4f} |' in table
    routing_lines = routing_table.splitlines()
    assert routing_lines[2] == '| read | delta_block | delta | attnres_block | attnres | delta_block_scratch |'
    # the reads in model order; Delta's first sublayer reads e unrouted, and only AttnRes has a final read
    assert [line.split(' | ')[0] for line in routing_lines[4:]] == ['| L0.attn', '| L0.mlp', '| L1.attn', '| L1.mlp',
                                                                    '| L2.attn', '| L2.mlp', '| final']
    assert routing_lines[4].startswith('| L0.attn | - | - | 1.000 / 0.00 | 1.000 / 0.00 | - |')  # one source
    assert len(result['routing']['attnres']['max_weight']) == 7 and 'standard' not in result['routing']
    if find_spec('matplotlib'):
        assert (out / 'loss_curves.png').exists() and (out / 'routing_max.png').exists()


def test_help_and_passthrough(capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse(['--help'])
    assert e.value.code == 0 and 'same data order' in capsys.readouterr().out
    cfg, rest = compare.parse(['--gpus=0,1', '--max_iters=5'])
    assert cfg['gpus'] == '0,1' and rest == ['--max_iters=5']  # unknown keys go to train.py
    assert (cfg['runs'].split(','), cfg['extra_seeds'], cfg['out_dir']) == (compare.RUNS, 'standard,delta', 'out-compare')
    cfg, _ = compare.parse(['--family=finetune'])  # the family's runs, no second seeds, its own out_dir
    assert (cfg['runs'].split(','), cfg['extra_seeds'], cfg['out_dir']) == (compare.FINETUNE_RUNS, '', 'out-finetune')
    assert compare.train_args(cfg, 'attnres', 1337, ['--max_iters=5']) == [
        'configs/finetune.py', 'configs/finetune_attnres.py', '--out_dir=out-finetune/attnres_s1337', '--seed=1337',
        '--max_iters=5']
    with pytest.raises(SystemExit, match="--family=.pretrain.: expected one of compare, finetune"):
        compare.parse(['--family=pretrain'])


def test_failed_runs_and_bad_options_exit_nonzero(tmp_path, monkeypatch, capsys):
    """A comparison whose runs fail, or that finds nothing to report, exits non-zero with one line; --gpus must be
    GPU numbers, and GPUs this machine has."""
    monkeypatch.chdir(ROOT)
    (tmp_path / 'empty').mkdir()  # no shards: every run stops at once in train.py
    args = [f'--out_dir={tmp_path / "cmp"}', f'--data_dir={tmp_path / "empty"}', '--runs=standard', '--extra_seeds=']
    with pytest.raises(SystemExit) as e:
        compare.main(args + TINY)
    assert e.value.code.startswith('error: 1 run(s) failed: standard seed 1337')
    with pytest.raises(SystemExit) as e:
        compare.main(args + ['--report_only=True'])
    assert e.value.code.startswith('error: no finished run in')
    with pytest.raises(SystemExit) as e:
        compare.parse(['--gpus=first'])
    assert "--gpus='first'" in e.value.code and 'GPU numbers' in e.value.code
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            compare.main(args + ['--gpus=0'] + TINY)
        assert 'has 0 CUDA GPU(s)' in e.value.code
