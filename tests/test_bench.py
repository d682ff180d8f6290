"""bench.py on a tiny CPU config, and the compiled (fused) path that bench.py and train.py use on the GPU,
checked against the eager reference."""

import json

import pytest
import torch

import bench
from model import GPT, GPTConfig

TINY = ['--device=cpu', '--compile=False', '--n_layer=3',  # 6 sublayers: one block of 6
        '--n_embd=32', '--n_head=2', '--block_size=16',
        '--batch_size=2', '--vocab_size=128', '--warmup=1', '--steps=2', '--route_steps=2']


def test_bench_table_and_json(tmp_path, capsys):
    out = tmp_path / 'b.json'
    result = bench.main(TINY + ['--variants=standard,ddl,attnres_block,delta', f'--json={out}'])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())['variants'] == result['variants']
    rows = {r['variant']: r for r in result['variants']}
    assert list(rows) == ['standard', 'ddl', 'attnres_block', 'delta']
    assert rows['standard']['step_ratio'] == 1.0
    for name, r in rows.items():
        assert f'| {name} |' in printed
        assert r['ms_per_step'] > 0 and r['tok_per_s'] == pytest.approx(2 * 16 / (r['ms_per_step'] / 1000))
        assert r['mfu'] is None and r['peak_mem_mb'] is None  # no peak FLOP/s or CUDA memory on a CPU
        assert r['config']['residual'] == bench.VARIANTS[name]['residual']
    assert rows['delta']['flops_per_token'] > rows['standard']['flops_per_token']
    # the routing of a 3-layer Delta stream: reads of sublayers 1..5 see 2..6 sources = 20 pairs; each pair
    # moves a bf16 source forward and a bf16 read gradient backward: 2 * 20 * 2 bytes x 32 wide x 32 tokens
    rt = result['routing']
    assert (rt['pairs'], rt['impl']) == (20, 'plain') and rt['bytes'] == 2 * 20 * 2 * 32 * 32 and rt['gb_per_s'] > 0
    # no kernel time off CUDA: the bandwidth is over the wall time
    assert rt['gpu_ms'] is None and rt['gb_per_s'] == pytest.approx(rt['bytes'] / rt['ms'] / 1e6)
    fused = bench.main(TINY + ['--variants=delta', '--route_impl=fused', f'--json={out}'])['routing']
    assert (fused['pairs'], fused['impl']) == (20, 'fused')


def test_bench_json_keeps_the_variants_measured_before_a_crash(tmp_path, monkeypatch):
    """The JSON is written after every variant: a run cut short (a time limit, a later variant failing) still
    leaves what it measured."""
    out, real = tmp_path / 'b.json', bench.bench_variant

    def bench_variant(name, cfg, device):
        if name == 'delta':
            raise RuntimeError('out of memory')
        return real(name, cfg, device)
    monkeypatch.setattr(bench, 'bench_variant', bench_variant)
    with pytest.raises(RuntimeError):
        bench.main(TINY + ['--variants=standard,delta', '--route_steps=0', f'--json={out}'])
    saved = json.loads(out.read_text())
    assert [r['variant'] for r in saved['variants']] == ['standard'] and saved['variants'][0]['ms_per_step'] > 0


def test_bench_profile(tmp_path):
    """--profile=True writes each variant's profile table next to the JSON; the GPU's busy time a step
    (gpu_ms_per_step) is measured on CUDA only."""
    out = tmp_path / 'p.json'
    row, = bench.main(TINY + ['--variants=delta', '--profile=True', '--route_steps=0', f'--json={out}'])['variants']
    table = (tmp_path / 'p_profile_delta.txt').read_text()
    assert 'Self CPU' in table and row['gpu_ms_per_step'] is None


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(['--help'])
    assert e.value.code == 0 and '--route_variant=delta' in capsys.readouterr().out


@pytest.mark.parametrize('argv, words', [
    (['--stpes=3'], ["unknown key 'stpes'", 'did you mean steps']),
    (['--variants=resnet'], ["--variants='resnet'", 'comma-separated list of standard']),
    (['--steps=0'], ['--steps=0', '>= 1']),
    (['--json=no/such/folder/b.json'], ['--json=', 'a folder that exists']),
    (['--n_head=3'], ['n_embd=32', 'divisible by n_head=3']),
    (['--variants=standard,delta_block', '--n_layer=1'],  # res_block=6 needs 6 sublayers
     ['GPTConfig.res_block=6', 'S <= 2 * n_layer = 2', 'variant delta_block']),
    (['--route_impl=triton'], ["--route_impl='triton'", 'auto, plain, fused']),
    (['--device=tpu'], ["device='tpu'", "'cpu', 'cuda'"]),
] + ([] if torch.cuda.is_available() else [(['--device=cuda'], ['device=cuda', 'no CUDA GPU'])]))
def test_bench_refuses_bad_options_before_it_runs(argv, words, tmp_path):
    """One line naming the option and what was expected, exit status 1, and nothing written."""
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + [f'--json={tmp_path / "b.json"}'] + argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith('error: ') and '\n' not in e.value.code
    assert all(w in e.value.code for w in words), e.value.code
    assert not (tmp_path / 'b.json').exists()


@pytest.mark.slow
@pytest.mark.parametrize('kw', [dict(residual='delta', res_block=2), dict(residual='attnres'),
                                dict(residual='ddl', ddl_dv=4)])
def test_compiled_path_matches_eager_reference(kw):
    """torch.compile fuses the routing and the delta rule into generated kernels; the result must be the
    eager reference's, forward and backward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32, **kw))
    with torch.no_grad():  # routing away from uniform, so that the softmax matters
        for n, p in model.named_parameters():
            if n.startswith('stream.'):
                p.add_(0.5 * torch.randn_like(p))
    idx, tgt = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    ref_loss = model(idx, tgt)[1]
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = torch.compile(model)(idx, tgt)[1]
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_kernel_ms_counts_each_kernel_once():
    """With CPU activity profiled too, the op that launched a kernel reports the kernel's time as its own
    device time as well: the GPU busy time sums the device's events only (it read twice the truth)."""
    from types import SimpleNamespace as E
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [E(device_type=cpu, self_device_time_total=3000.0),   # aten::mm, 3 ms of its kernel
              E(device_type=cuda, self_device_time_total=3000.0),  # the kernel itself
              E(device_type=cuda, self_device_time_total=1000.0)]  # a kernel launched outside any op
    assert bench.kernel_ms(E(key_averages=lambda: events), steps=2) == pytest.approx(2.0)
