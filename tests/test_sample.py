"""Tests of sample.py: sampling from a checkpoint in train.py's format, the prompt file, the routing heatmap
(text and PNG), and the messages for missing or broken checkpoints."""

import dataclasses
import math
import re
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch

import routing
from model import GPT, GPTConfig
from prepare import write_shard
from sample import SHADES, decode, format_heatmap, main


def load_bpe():
    try:
        import tiktoken
        return tiktoken.get_encoding('r50k_base')
    except Exception:  # offline and not cached
        return None


needs_bpe = pytest.mark.skipif(load_bpe() is None, reason="tiktoken cannot load 'r50k_base' (offline, not cached)")


def write_ckpt(path, residual, **kw):
    """A tiny model saved the way train.py saves it, with GPT-2's padded vocabulary so decoding works."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32, vocab_size=50304, residual=residual, **kw)
    model = GPT(cfg)
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(cfg), 'config': {}, 'step': 7,
                'val_loss': 10.5}, path / 'ckpt.pt')
    return model


def run(capsys, out_dir, *args):
    main([f'--out_dir={out_dir}', '--device=cpu', '--dtype=float32', *args])
    return capsys.readouterr().out


def samples(text):
    """The sample texts printed by main (each one is followed by a separator line)."""
    return text.split('\n', 1)[1].split('\n---------------\n')[:-1]


@needs_bpe
def test_samples_follow_the_prompt_and_the_seed(tmp_path, capsys):
    write_ckpt(tmp_path, 'standard')
    args = ['--start=Hello world', '--num_samples=2', '--max_new_tokens=12', '--routing=False']
    a = samples(run(capsys, tmp_path, *args, '--seed=1'))
    b = samples(run(capsys, tmp_path, *args, '--seed=1'))
    c = samples(run(capsys, tmp_path, *args, '--seed=2'))
    assert len(a) == 2 and all(s.startswith('Hello world') and len(s) > len('Hello world') for s in a)
    assert a == b          # same seed, same text
    assert a != c          # another seed, other text (12 tokens from ~50k: a collision is out of reach)
    assert a[0] != a[1]    # the samples of one run differ from each other


@needs_bpe
def test_prompt_from_file(tmp_path, capsys):
    write_ckpt(tmp_path, 'standard')
    prompt = 'The quick brown fox = jumps\nover the lazy dog'  # '=' and a newline survive
    (tmp_path / 'prompt.txt').write_text(prompt, encoding='utf-8')
    out = run(capsys, tmp_path, f'--start=FILE:{tmp_path / "prompt.txt"}', '--num_samples=1', '--max_new_tokens=5')
    assert samples(out)[0].startswith(prompt)
    with pytest.raises(SystemExit, match='nothere.txt'):
        run(capsys, tmp_path, f'--start=FILE:{tmp_path / "nothere.txt"}')


def heatmap_rows(out):
    """{row label: (cells, max, entropy)} of the heatmap printed by main: the lines that end in two numbers."""
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r' *(\S+) (.*)  (\d\.\d\d)  (\d\.\d\d)', line)
        if m:
            rows[m[1]] = (m[2], float(m[3]), float(m[4]))
    return rows


@needs_bpe
def test_routing_heatmap_attnres(tmp_path, capsys):
    model = write_ckpt(tmp_path, 'attnres')
    out = run(capsys, tmp_path, '--start=one two three four', '--num_samples=0')
    rows = heatmap_rows(out)
    dests, srcs = routing.labels(model)
    assert list(rows) == dests == ['L0.attn', 'L0.mlp', 'L1.attn', 'L1.mlp', 'final']
    # the queries start at zero, so read r weighs its n = r + 1 visible sources uniformly: weight 1/n, entropy
    # ln n. Shaded against the largest weight (1.0): n equal cells that get lighter from row to row, then blanks.
    levels = []
    for r, (cells, mx, ent) in enumerate(rows.values()):
        n = r + 1
        assert len(cells) == 2 * len(srcs) and cells == cells[0] * 2 * n + ' ' * 2 * (len(srcs) - n)
        assert mx == pytest.approx(1 / n, abs=0.005) and ent == pytest.approx(math.log(n), abs=0.005)
        levels.append(SHADES.index(cells[0]))
    assert levels == sorted(levels, reverse=True) and levels[0] == 9 > levels[1] and levels[-1] < levels[1]
    # the column labels are written downwards: the header lines, read column by column, spell the sources
    header = out.split('columns: source\n', 1)[1].splitlines()[:max(map(len, srcs))]
    indent = len(max(dests, key=len)) + 1
    spelled = [''.join(line.ljust(indent + 2 * len(srcs))[indent + 2 * j] for line in header).strip()
               for j in range(len(srcs))]
    assert spelled == srcs


@needs_bpe
def test_routing_heatmap_delta_blocks(tmp_path, capsys):
    write_ckpt(tmp_path, 'delta', res_block=2)
    rows = heatmap_rows(run(capsys, tmp_path, '--start=a b c', '--num_samples=0'))
    assert list(rows) == ['L0.mlp', 'L1.attn', 'L1.mlp']  # sublayer 0 reads the embedding unrouted
    # sources emb, blk1, partial: L0.mlp sees emb + partial (1/2 each), L1.attn emb + blk1, L1.mlp all three
    # shaded against the largest weight, 1/2: 1/2 is '@', 1/3 is 2/3 of the way, level 6 ('*')
    assert [cells for cells, _, _ in rows.values()] == ['@@  @@', '@@@@  ', '******']


@needs_bpe
@pytest.mark.parametrize('residual', ['standard', 'ddl'])
def test_no_routing_for_unrouted_variants(tmp_path, capsys, residual):
    write_ckpt(tmp_path, residual)
    out = run(capsys, tmp_path, '--num_samples=0')
    assert f"the '{residual}' variant has no routing weights" in out and not heatmap_rows(out)


@needs_bpe
def test_routing_png(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    write_ckpt(tmp_path, 'attnres')
    run(capsys, tmp_path, '--num_samples=0', f'--routing_png={tmp_path / "r.png"}')
    assert (tmp_path / 'r.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@needs_bpe
def test_png_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    write_ckpt(tmp_path, 'attnres')
    for name in ('matplotlib', 'matplotlib.figure'):  # None in sys.modules: importing it raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit, match=r'r\.png: .*pip install matplotlib'):
        run(capsys, tmp_path, '--num_samples=0', f'--routing_png={tmp_path / "r.png"}')
    assert not (tmp_path / 'r.png').exists()


def test_format_heatmap():
    text = format_heatmap(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.39, 0.01]]), ['first', 'b'], ['x', 'yy', 'z'],
                          stats=([1.0, 0.6], [0.0, 0.71]))
    lines = text.splitlines()
    assert lines[0] == '        y'                   # 'yy' runs downwards, ending on the line above the cells
    assert lines[1] == '      x y z    max   ent'
    assert lines[2] == 'first @@      1.00  0.00'   # 1.0 is '@', 0 is ' '
    assert lines[3] == '    b ++==..  0.60  0.71'   # 0.6*9 = 5.4 -> '+', 0.39*9 = 3.5 -> '=', 0.01 -> at least '.'
    assert len(lines) == 6 and '0 .. 1.00' in lines[4]
    assert format_heatmap([[0.1, 0.2]], ['r'], ['a', 'b'], vmax=1.0).splitlines()[1] == 'r ..::'  # fixed scale


def test_decode_skips_padding_ids():
    enc = load_bpe()
    if enc is None:
        pytest.skip("tiktoken cannot load 'r50k_base' (offline, not cached)")
    ids = enc.encode('héllo') + [50300, 50257] + enc.encode(' world') + [50256]
    assert decode(enc, ids) == 'héllo\ufffd\ufffd world<|endoftext|>'


def test_missing_and_broken_checkpoints(tmp_path, capsys):
    missing = tmp_path / 'nothing'
    with pytest.raises(SystemExit, match=re.escape(f'no checkpoint at {missing / "ckpt.pt"}')):
        run(capsys, missing)
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match=re.escape(f'{tmp_path / "ckpt.pt"} is not a usable checkpoint')):
        run(capsys, tmp_path)
    # weights of one variant under the model_args of another: strict loading names the unexpected keys
    write_ckpt(tmp_path, 'attnres')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['model_args']['residual'] = 'standard'
    torch.save(ckpt, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match=r'other\.pt.*stream\.query'):
        main([f'--ckpt={tmp_path / "other.pt"}', '--device=cpu'])


@pytest.mark.parametrize('arg, words', [
    ('--temperature=0', ['--temperature=0.0', '> 0']),
    ('--dtype=float8', ["--dtype='float8'", 'bfloat16']),
    ('--num_samples=-1', ['--num_samples=-1', '>= 0']),
    ('--max_new_tokens=0', ['--max_new_tokens=0', '>= 1']),
    ('--top_k=-5', ['--top_k=-5', '>= 0']),
    ('--device=tpu', ["device='tpu'", "'cpu', 'cuda'"]),
    ('--ablate=no/such.bin', ['--ablate', 'no/such.bin']),
] + ([] if torch.cuda.is_available() else [('--device=cuda', ['device=cuda', 'no CUDA GPU'])]))
def test_bad_values(tmp_path, capsys, arg, words):
    """One line naming the option and what was expected, exit status 1, no traceback."""
    write_ckpt(tmp_path, 'attnres')
    with pytest.raises(SystemExit) as e:
        run(capsys, tmp_path, '--num_samples=0', arg)
    assert isinstance(e.value.code, str) and e.value.code.startswith('error: ') and '\n' not in e.value.code
    assert all(w in e.value.code for w in words), e.value.code


@needs_bpe
def test_ablate_prints_the_importance_of_each_source_and_saves_it(tmp_path, capsys):
    """--ablate=SHARD: the rise in loss when each source is removed from each read, printed beside the
    weights, and both side by side in the PNG."""
    write_ckpt(tmp_path, 'delta', res_block=2)  # 4 sublayers: reads of sublayers 1-3 (e, blk1, partial)
    rng = np.random.default_rng(0)
    write_shard(str(tmp_path / 'v_val_000000.bin'), rng.integers(0, 50257, 200))
    png = tmp_path / 'imp.png'
    args = ['--num_samples=0', f'--ablate={tmp_path / "v_val_000000.bin"}', '--ablate_tokens=96']
    out = run(capsys, tmp_path, *args, *([f'--routing_png={png}'] if find_spec('matplotlib') else []))
    table = out.split('when a source is removed from a read (term: the whole routed term)\n', 1)[1]
    header, *rows = table.splitlines()[:4]
    assert header.split() == ['emb', 'blk1', 'partial', 'term']
    assert [r.split()[0] for r in rows] == ['L0.mlp', 'L1.attn', 'L1.mlp']
    assert rows[0].split()[2] == '.'  # block 1 is not finished before sublayer 2: not visible to L0.mlp
    assert 'importance on 96 tokens of' in out
    if find_spec('matplotlib'):
        assert png.exists() and png.stat().st_size > 0
