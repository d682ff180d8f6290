"""compare.py end to end on a tiny model and tiny shards: every run trained through train.py, then the table,
the JSON with the routing weights, and a second call that trains nothing."""

import json
import os

import numpy as np
import pytest

import compare
from prepare import write_shard

TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=16', '--vocab_size=128', '--batch_size=2',
        '--total_batch_size=64', '--max_iters=4', '--eval_interval=2', '--log_interval=1', '--val_tokens=256',
        '--device=cpu', '--compile=False']


@pytest.mark.slow
def test_compare_trains_reports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py and configs/
    rng = np.random.default_rng(0)
    write_shard(tmp_path / 'data' / 'tiny_val_000000.bin', rng.integers(0, 128, 2_000))
    write_shard(tmp_path / 'data' / 'tiny_train_000001.bin', rng.integers(0, 128, 5_000))
    out = tmp_path / 'cmp'
    args = [f'--out_dir={out}', f'--data_dir={tmp_path / "data"}', '--runs=standard,delta_block',
            '--extra_seeds=standard', '--routing_tokens=2'] + TINY
    compare.main(args)
    runs = sorted(os.listdir(out))
    assert {'standard_s1337', 'standard_s1338', 'delta_block_s1337'} <= set(runs)
    table = (out / 'results.md').read_text().splitlines()
    assert [line.split('|')[1].strip() for line in table[2:]] == ['standard', 'standard', 'delta_block']
    result = json.loads((out / 'results.json').read_text())
    assert [r['tokens'] for r in result['rows']] == [4 * 64] * 3  # every run saw the same token budget
    assert result['rows'][0]['val_loss'] != result['rows'][1]['val_loss']  # the two seeds differ
    # res_block=6 with 4 sublayers: no block finishes, so each read mixes e and the partial block
    w = np.array(result['routing']['delta_block']['weights'])  # (reads, sources): rows are distributions
    assert w.shape == (3, 2) and np.allclose(w.sum(1), 1, atol=1e-5)
    assert result['routing']['delta_block']['sources'] == ['emb', 'partial']
    assert 'standard' not in result['routing']  # no routing to show
    mtimes = {r: os.path.getmtime(out / r / 'ckpt.pt') for r in runs if (out / r / 'ckpt.pt').exists()}
    compare.main(args)  # every run has finished: nothing is trained again
    assert mtimes == {r: os.path.getmtime(out / r / 'ckpt.pt') for r in mtimes}


def test_help_and_passthrough(capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse(['--help'])
    assert e.value.code == 0 and 'same data order' in capsys.readouterr().out
    cfg, rest = compare.parse(['--gpus=0,1', '--max_iters=5'])
    assert cfg['gpus'] == '0,1' and rest == ['--max_iters=5']  # unknown keys go to train.py
