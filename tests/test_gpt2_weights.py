"""
GPT-2 in Hugging Face's format as the backbone of every variant (gpt2_weights.py, init_from in train.py and
sample.py), checked against transformers itself. The real GPT-2 cannot be downloaded here, so a small random
GPT2LMHeadModel saved with save_pretrained stands in for it. transformers is a test-only dependency (.ci/run);
without it these tests are skipped.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip('transformers')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gpt2_weights  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from prepare import load_shard, write_shard  # noqa: E402

# the shape of the stand-in GPT-2 (in transformers' names) and the same run in train.py's: 4 sequences of 16
# tokens a micro-batch, 2 micro-steps a step. Its bias, GELU, vocabulary and block size come from the weights
HF_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=512)
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--batch_size=4', '--total_batch_size=128', '--warmup_iters=2',
        '--learning_rate=1e-2', '--val_tokens=512', '--eval_interval=4', '--log_interval=1', '--device=cpu']
# GPT-2's function, to float32 rounding: the standard stream, and Delta with its gate at 0
EXACT = {'standard': [], 'delta, gated': ['--residual=delta', '--delta_gate=True'],
         'delta block, gated': ['--residual=delta', '--res_block=2', '--delta_gate=True']}
# GPT-2's function but for LayerNorm's eps: with zero queries a read is the uniform mean of its sources, and
# e plus every output (or every block sum) is the standard stream x, so AttnRes reads x / n; the pre-norm undoes
# the scale, apart from eps (1e-5), which acts as eps * n^2. The same holds for Delta without the gate
SCALED = {'attnres': ['--residual=attnres'], 'attnres block': ['--residual=attnres', '--res_block=2'],
          'delta, no gate': ['--residual=delta']}
# another function until trained: the delta rule rewrites the stream along each output from the start
CHANGED = {'ddl': ['--residual=ddl'], 'ddl dv=2': ['--residual=ddl', '--ddl_dv=2']}
TRAINED = ['attnres', 'attnres block', 'ddl', 'ddl dv=2']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()  # tiny matmuls: more threads only wait on each other
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_model(**shape):
    """A random GPT2LMHeadModel. Every parameter is drawn, biases and LayerNorm gains too, so that a weight
    loaded into the wrong place or left untransposed changes the logits."""
    torch.manual_seed(0)
    shape = {**HF_SHAPE, **shape}
    special = shape['vocab_size'] - 1  # GPT-2's <|endoftext|> is 50256, outside a small vocabulary
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape, bos_token_id=special, eos_token_id=special))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
    """(the folder that save_pretrained wrote, the model it holds)."""
    d = tmp_path_factory.mktemp('hf-gpt2')
    model = hf_model()
    model.save_pretrained(d)
    assert {'config.json', 'model.safetensors'} <= set(os.listdir(d))
    return str(d), model


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """Tiny shards of a learnable stream: mostly a fixed successor rule over 64 tokens, 10% noise over 512."""
    d = tmp_path_factory.mktemp('data')
    for name, n, seed in (('tiny_val_000000.bin', 2_000, 0), ('tiny_train_000001.bin', 4_000, 1)):
        rng = np.random.default_rng(seed)
        t = [1]
        for noisy, r in zip(rng.random(n - 1) < 0.1, rng.integers(0, 512, n - 1)):
            t.append(int(r) if noisy else (t[-1] * 7 + 3) % 64)
        write_shard(str(d / name), t)
    return str(d)


def run(data_dir, out_dir, *args):
    train.main(TINY + [f'--data_dir={data_dir}', f'--out_dir={out_dir}', *args])


def from_checkpoint(out_dir):
    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.eval(), ckpt


def tokens(data_dir, n=4, T=16):
    val = load_shard(os.path.join(data_dir, 'tiny_val_000000.bin'))
    return torch.from_numpy(val[:n * T].astype(np.int64)).view(n, T)  # (n, T) sequences of the val shard


def logits(model, x):
    with torch.no_grad():
        return model(x, x)[0] if isinstance(model, GPT) else model(x).logits  # (B, T, vocab), every position

# -----------------------------------------------------------------------------
# the weights, through train.py's init_from


@pytest.mark.parametrize('variant', list(EXACT) + list(SCALED) + list(CHANGED))
def test_init_from_folder_into_every_variant(tmp_path, data_dir, hf, variant):
    folder, ref = hf
    args = (EXACT | SCALED | CHANGED)[variant]
    # learning_rate=0: one step that changes nothing, so the checkpoint holds the model as it was loaded
    run(data_dir, tmp_path, f'--init_from={folder}', '--max_iters=1', '--learning_rate=0', '--min_lr=0', *args)
    model, ckpt = from_checkpoint(tmp_path)
    assert {k: ckpt['model_args'][k] for k in ('vocab_size', 'block_size', 'bias', 'gelu_approx')} == {
        'vocab_size': 512, 'block_size': 16, 'bias': True, 'gelu_approx': 'tanh'}  # GPT-2's, from config.json
    # the backbone is transformers' weights, Conv1D's (in, out) transposed to Linear's (out, in)
    hf_sd = {k.removeprefix('transformer.'): v for k, v in ref.state_dict().items() if k != 'lm_head.weight'}
    assert torch.equal(ckpt['model']['transformer.h.1.attn.c_attn.weight'], hf_sd['h.1.attn.c_attn.weight'].t())
    assert torch.equal(ckpt['model']['transformer.h.0.mlp.c_proj.bias'], hf_sd['h.0.mlp.c_proj.bias'])
    assert torch.equal(ckpt['model']['lm_head.weight'], hf_sd['wte.weight'])
    backbone = ckpt['model'].keys() - model.variant_param_names()
    assert backbone == {'transformer.' + k for k in hf_sd} | {'lm_head.weight'}
    assert ckpt['data'] == {'shard': 0, 'pos': 128}  # one step of 128 tokens from the start of the train shards
    x = tokens(data_dir)
    diff = (logits(model, x) - logits(ref, x)).abs().max().item()  # logits of size ~1
    if variant in EXACT:
        torch.testing.assert_close(logits(model, x), logits(ref, x))
    elif variant in SCALED:
        assert 1e-6 < diff < 1e-3
    else:
        assert diff > 0.1


@pytest.mark.parametrize('variant', TRAINED)
def test_routed_and_ddl_models_from_gpt2_train(tmp_path, data_dir, hf, variant):
    run(data_dir, tmp_path, f'--init_from={hf[0]}', '--max_iters=4', *(SCALED | CHANGED)[variant])
    with open(tmp_path / 'log.jsonl') as f:
        evals = [r for r in map(json.loads, f) if r.get('val_loss') is not None]
    assert [r['step'] for r in evals] == [0, 4] and evals[1]['val_loss'] < evals[0]['val_loss']
    _, ckpt = from_checkpoint(tmp_path)
    trained = ckpt['model']['transformer.h.0.attn.c_attn.weight']
    assert not torch.equal(trained, hf[1].state_dict()['transformer.h.0.attn.c_attn.weight'].t())


def test_gpt2_weights_set_the_backbone_and_say_so(tmp_path, data_dir, hf, capsys):
    # the config asks for another width, vocabulary, bias and GELU: GPT-2's own win, and the run says which changed
    run(data_dir, tmp_path, f'--init_from={hf[0]}', '--max_iters=1', '--n_embd=64', '--vocab_size=50304',
        '--residual=delta', '--delta_gate=True')
    out = capsys.readouterr().out
    assert (f'init_from={hf[0]} sets the backbone: n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=512, '
            "bias=True, gelu_approx='tanh' (the config had n_embd 64, block_size 1024, vocab_size 50304, bias False, "
            "gelu_approx 'none')") in out
    assert (f'init_from={hf[0]}: a Hugging Face GPT-2 folder (config.json, model.safetensors); backbone loaded; '
            'at init: stream.gate, stream.key_gain, stream.query; train data from the start of the train shards') in out
    with open(tmp_path / 'log.jsonl') as f:
        config = json.loads(f.readline())['config']  # the run's config is the model it trained
    assert (config['n_embd'], config['vocab_size'], config['init_from']) == (32, 512, hf[0])
    # the run resumes with that config, and a checkpoint of it converts like any other
    run(data_dir, tmp_path, '--init_from=resume', '--max_iters=2')
    run(data_dir, tmp_path / 'attnres', f'--init_from={tmp_path}', '--max_iters=1', '--residual=attnres',
        '--block_size=16', '--vocab_size=512', '--bias=True', '--gelu_approx=tanh')
    assert (f'init_from={tmp_path}: a checkpoint of train.py (residual=delta, step 2, ' in capsys.readouterr().out)


def test_exact_gelu_would_not_match(hf, data_dir):
    # why gelu_approx exists: with model.py's exact GELU, GPT-2's weights give other logits than transformers'
    args, sd, _ = gpt2_weights.load(hf[0])
    x = tokens(data_dir)
    for approx, matches in (('tanh', True), ('none', False)):
        model = GPT(GPTConfig(**{**args, 'gelu_approx': approx}))
        model.load_backbone(sd)
        diff = (logits(model.eval(), x) - logits(hf[1], x)).abs().max().item()
        assert (diff < 1e-5) == matches, (approx, diff)


def test_hub_layout_in_pytorch_model_bin(tmp_path, hf, data_dir):
    # the hub's gpt2 files come from a GPT2Model: no 'transformer.' prefix, the attention masks saved as buffers,
    # and older transformers wrote pytorch_model.bin, with the tied head under its own name
    folder, ref = hf
    sd = {k.removeprefix('transformer.'): v for k, v in ref.state_dict().items()}
    for i in range(HF_SHAPE['n_layer']):
        sd[f'h.{i}.attn.bias'] = torch.tril(torch.ones(1, 1, 16, 16, dtype=torch.bool))
        sd[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    sd['lm_head.weight'] = sd['wte.weight'].clone()
    torch.save(sd, tmp_path / 'pytorch_model.bin')
    shutil.copy(os.path.join(folder, 'config.json'), tmp_path)
    args, model_sd, found = gpt2_weights.load(str(tmp_path))
    assert found == 'a Hugging Face GPT-2 folder (config.json, pytorch_model.bin)'
    model = GPT(GPTConfig(**args))
    assert model.load_backbone(model_sd) == []  # every weight found, nothing left over
    x = tokens(data_dir)
    torch.testing.assert_close(logits(model.eval(), x), logits(ref, x))
    sd['lm_head.weight'] += 1.0  # an untied output layer: model.py has none
    torch.save(sd, tmp_path / 'pytorch_model.bin')
    with pytest.raises(train.ConfigError, match='lm_head.weight differs from transformer.wte.weight'):
        gpt2_weights.load(str(tmp_path))


def test_sharded_safetensors(tmp_path, hf, data_dir):
    hf[1].save_pretrained(tmp_path, max_shard_size='20KB')  # gpt2-xl in float32 is saved in parts like this
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))
    assert len(shards) > 1 and (tmp_path / 'model.safetensors.index.json').exists()
    args, sd, found = gpt2_weights.load(str(tmp_path))
    assert found == f'a Hugging Face GPT-2 folder (config.json, {", ".join(shards)})'
    model = GPT(GPTConfig(**args))
    model.load_backbone(sd)
    x = tokens(data_dir)
    torch.testing.assert_close(logits(model.eval(), x), logits(hf[1], x))

# -----------------------------------------------------------------------------
# what is refused, and how


def edited_copy(tmp_path, folder, **config):
    """A copy of the folder whose config.json has these keys changed (None removes one)."""
    d = tmp_path / 'edited'
    shutil.copytree(folder, d)
    with open(d / 'config.json') as f:
        c = json.load(f)
    c.update(config)
    (d / 'config.json').write_text(json.dumps({k: v for k, v in c.items() if v is not None}))
    return d


@pytest.mark.parametrize('config, expected', [
    (dict(model_type='llama', architectures=['LlamaForCausalLM']), ["model_type='llama', expected 'gpt2'"]),
    (dict(activation_function='relu'), ["activation_function='relu', expected 'gelu_new' or"]),
    (dict(n_inner=64), ['n_inner=64, expected None or 4 * n_embd = 128']),
    (dict(layer_norm_epsilon=1e-6), ['layer_norm_epsilon=1e-06']),
    (dict(scale_attn_by_inverse_layer_idx=True), ['scale_attn_by_inverse_layer_idx=True, expected False']),
    (dict(tie_word_embeddings=False), ['tie_word_embeddings=False']),
    (dict(n_head=3), ['n_embd', 'divisible by n_head=3']),
    # config.json and the weights disagree: the keys that do not fit are named
    (dict(n_layer=3), ['into this model', 'missing transformer.h.2.ln_1.weight']),
    (dict(n_embd=48, n_head=2), ['transformer.wte.weight: checkpoint (512, 32) vs model (512, 48)']),
    (dict(vocab_size=None), ['transformer.wte.weight: checkpoint (512, 32) vs model (50257, 32)']),  # the default
])
def test_another_architecture_or_shape_is_refused(tmp_path, data_dir, hf, config, expected):
    folder = edited_copy(tmp_path, hf[0], **config)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / 'out', f'--init_from={folder}')
    message = e.value.code
    assert message.startswith('error: ') and str(folder) in message
    for text in expected:
        assert text in message
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


def test_a_folder_of_neither_kind(tmp_path, data_dir, hf):
    (tmp_path / 'empty').mkdir()
    config_only = tmp_path / 'config-only'
    config_only.mkdir()
    shutil.copy(os.path.join(hf[0], 'config.json'), config_only)  # no weights beside it
    for folder in (tmp_path / 'empty', config_only):
        with pytest.raises(SystemExit) as e:
            run(data_dir, tmp_path / 'out', f'--init_from={folder}')
        assert e.value.code == (f'error: init_from={folder}: the folder holds neither a checkpoint of train.py '
                                '(ckpt.pt) nor GPT-2 weights (a Hugging Face GPT-2 folder holds config.json and '
                                'model.safetensors or pytorch_model.bin)')
    with pytest.raises(SystemExit, match=r'init_from=.*nowhere: no such file or folder; .* gpt2, gpt2-medium'):
        run(data_dir, tmp_path / 'out', f'--init_from={tmp_path / "nowhere"}')
    (tmp_path / 'damaged').mkdir()
    (tmp_path / 'damaged' / 'config.json').write_text('{"model_type": "gpt2"}')
    (tmp_path / 'damaged' / 'model.safetensors').write_bytes(b'\x00' * 100)
    with pytest.raises(SystemExit, match=r'cannot read .*damaged/model\.safetensors'):
        run(data_dir, tmp_path / 'out', f'--init_from={tmp_path / "damaged"}')

# -----------------------------------------------------------------------------
# init_from='gpt2' and the other names: transformers downloads them (here it hands over the saved model)


@pytest.fixture
def hub(monkeypatch, hf):
    """transformers' from_pretrained, answering every name with the stand-in model; the list of names asked for."""
    asked = []
    monkeypatch.setattr(transformers.GPT2LMHeadModel, 'from_pretrained', lambda name: asked.append(name) or hf[1])
    return asked


def test_init_from_gpt2_downloads_with_transformers(tmp_path, data_dir, hf, hub, capsys):
    run(data_dir, tmp_path, '--init_from=gpt2-medium', '--max_iters=1', '--learning_rate=0', '--min_lr=0', *EXACT['delta, gated'])
    assert hub == ['gpt2-medium']
    assert ("init_from=gpt2-medium: Hugging Face's gpt2-medium, through transformers; backbone loaded; "
            'at init: stream.gate, stream.key_gain, stream.query') in capsys.readouterr().out
    model, _ = from_checkpoint(tmp_path)
    x = tokens(data_dir)
    torch.testing.assert_close(logits(model, x), logits(hf[1], x))


def test_init_from_gpt2_without_transformers_or_network(tmp_path, data_dir, hf, monkeypatch):
    def offline(name):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(transformers.GPT2LMHeadModel, 'from_pretrained', offline)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, '--init_from=gpt2')
    assert e.value.code.startswith('error: init_from=gpt2: cannot get it from the Hugging Face hub (OSError: We '
                                   "couldn't connect") and 'give its path' in e.value.code
    monkeypatch.setitem(sys.modules, 'transformers', None)  # None in sys.modules: importing it raises ImportError
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, '--init_from=gpt2-xl')
    assert 'error: init_from=gpt2-xl downloads GPT-2' in e.value.code and 'pip install transformers' in e.value.code
    # a folder copied to the machine needs neither
    args, sd, _ = gpt2_weights.load(hf[0])
    assert args['n_embd'] == 32 and sd['transformer.h.0.attn.c_attn.weight'].shape == (96, 32)

# -----------------------------------------------------------------------------
# sample.py --init_from


@pytest.fixture(scope='module')
def hf_full_vocab(tmp_path_factory):
    """A stand-in GPT-2 with GPT-2's vocabulary, so that its samples decode as text."""
    d = tmp_path_factory.mktemp('hf-gpt2-vocab')
    model = hf_model(vocab_size=50257, n_positions=32)
    model.save_pretrained(d)
    return str(d), model


def bpe():
    try:
        import tiktoken
        return tiktoken.get_encoding('r50k_base')
    except Exception:  # offline and not cached
        pytest.skip("tiktoken cannot load 'r50k_base' (offline, not cached)")


@pytest.mark.parametrize('name', ['folder', 'gpt2'])
def test_sample_from_gpt2_is_transformers_greedy_text(hf_full_vocab, capsys, monkeypatch, name):
    enc = bpe()
    folder, ref = hf_full_vocab
    if name == 'gpt2':
        monkeypatch.setattr(transformers.GPT2LMHeadModel, 'from_pretrained', lambda _: ref)
    init_from = folder if name == 'folder' else 'gpt2'
    # top_k=1: sampling keeps only the most likely token, which is transformers' greedy decoding
    sample.main([f'--init_from={init_from}', '--start=Hello world', '--num_samples=1', '--max_new_tokens=10',
                 '--top_k=1', '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    header, text = out.split('\n', 1)
    assert header.startswith(f'{init_from}: ') and 'M parameters' in header
    prompt = torch.tensor([enc.encode('Hello world')])
    greedy = ref.generate(prompt, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt),
                          pad_token_id=0)
    assert text.split('\n---------------\n')[0] == sample.decode(enc, greedy[0].tolist())
    assert "the 'standard' variant has no routing weights" in out


def test_sample_refuses_what_is_not_gpt2(tmp_path, hf):
    with pytest.raises(SystemExit, match=r'error: cannot load .*: not one of gpt2, .* nor a folder of GPT-2 weights'):
        sample.main([f'--init_from={tmp_path}', '--device=cpu'])
    folder = edited_copy(tmp_path, hf[0], model_type='bert')
    with pytest.raises(SystemExit, match=r"config\.json: model_type='bert', expected 'gpt2'"):
        sample.main([f'--init_from={folder}', '--device=cpu'])
