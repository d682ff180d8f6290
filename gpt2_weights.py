"""
OpenAI's pretrained GPT-2 in Hugging Face's format, as the backbone of any variant of model.py.

  python train.py --init_from=gpt2 --residual=delta --delta_gate=True  # downloaded by transformers
  python train.py --init_from=models/gpt2 --residual=attnres  # a folder copied to a machine offline
  python sample.py --init_from=gpt2-medium --start="The meaning of life is"

A model name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') is downloaded with `transformers`, an
optional dependency imported only then. A folder as `save_pretrained` or the hub writes it
(config.json, and model.safetensors or pytorch_model.bin, whole or in shards) is read without
transformers. Either way the result is the backbone's GPTConfig fields and a state_dict in
model.py's names, for GPT.load_backbone.
"""
import json
import os
from importlib.util import find_spec

import torch

from cli import ConfigError
from model import GPTConfig, LayerNorm

NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # 124M, 350M, 774M and 1558M parameters
# each as one file, or shards listed in <name>.index.json
WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
# Hugging Face's Conv1D keeps a linear layer's weight as (in, out); nn.Linear's is (out, in)
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# GPT2Config.activation_function -> F.gelu's `approximate`. GPT-2 was trained with the tanh
# approximation ('gelu_new'); model.py's default is the exact GELU, with which GPT-2's logits
# come out a little different
GELU = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu': 'none'}
# GPT2Config's defaults, for the keys that a config.json leaves out (transformers reads it so too)
HF_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257,
                   n_inner=None, activation_function='gelu_new', layer_norm_epsilon=1e-5,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   tie_word_embeddings=True)


def weight_files(folder):
    """The weight files of a Hugging Face folder, [] if it has none: model.safetensors or its
    shards, else pytorch_model.bin or its shards."""
    for name in WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
        # e.g. gpt2-xl, 6.4 GB in float32, saved in parts
        index = os.path.join(folder, name + '.index.json')
        if os.path.isfile(index):
            # {parameter name: the file that holds it}
            shards = read_json(index).get('weight_map', {})
            return [os.path.join(folder, s) for s in sorted(set(shards.values()))]
    return []


def is_hf_folder(path):
    """A folder of config.json and weights: what init_from=DIR loads as GPT-2 (not a checkpoint)."""
    return os.path.isfile(os.path.join(path, 'config.json')) and bool(weight_files(path))


EXPECTED = ('a Hugging Face GPT-2 folder holds config.json and model.safetensors or '
            'pytorch_model.bin')


def load(init_from):
    """(the backbone's GPTConfig fields, its state_dict in model.py's names, what was found, in
    words) of the GPT-2 that init_from names: one of NAMES, or a Hugging Face folder. Anything that
    does not load, or is not GPT-2 as model.py builds it, is a ConfigError naming the file or key.
    """
    if init_from in NAMES:
        config, sd = download(init_from)
        where, found = (f'{init_from} (Hugging Face hub)',
                        f"Hugging Face's {init_from}, through transformers")
    elif not is_hf_folder(init_from):
        raise ConfigError(f"{init_from}: not one of {', '.join(NAMES)} nor a folder of GPT-2 "
                          f"weights ({EXPECTED})")
    else:
        files = weight_files(init_from)
        config, sd = read_json(os.path.join(init_from, 'config.json')), {}
        for path in files:
            sd.update(read_weights(path))
        where = os.path.join(init_from, 'config.json')
        found = (f'a Hugging Face GPT-2 folder '
                 f'(config.json, {", ".join(os.path.basename(p) for p in files)})')
    return backbone(config, where), model_names(sd, init_from), found


def download(name):
    """(config as a dict, state_dict) of a GPT-2 of the Hugging Face hub, through transformers."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ConfigError(f"init_from={name} downloads GPT-2 with Hugging Face's transformers, "
                          'which is not installed: pip install transformers (or give the path of a '
                          'Hugging Face GPT-2 folder)') from None
    try:
        model = GPT2LMHeadModel.from_pretrained(name)
    # no network, a proxy, a full disk: transformers and its hub client raise many kinds
    except Exception as e:
        why = ' '.join(str(e).split())[:400]
        raise ConfigError(f'init_from={name}: cannot get it from the Hugging Face hub '
                          f'({type(e).__name__}: {why}); without internet, copy a folder saved '
                          'with save_pretrained and give its path') from None
    return model.config.to_dict(), model.state_dict()


def read_json(path):
    """A JSON file as a dict; a missing or broken one is a ConfigError that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON
        raise ConfigError(f'cannot read {path}: {e}') from None


def read_weights(path):
    """The tensors of one weight file, on the CPU. Loading either format runs no code from the file.
    """
    safetensors = path.endswith('.safetensors')
    # transformers depends on it: only a bare machine lacks it
    if safetensors and find_spec('safetensors') is None:
        raise ConfigError(f'{path}: reading .safetensors needs the safetensors package: '
                          f'pip install safetensors')
    try:
        if safetensors:
            from safetensors.torch import load_file
            return load_file(path)
        # tensors only, no pickled objects
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # cut short, not this format: each library raises its own kind
        raise ConfigError(f'cannot read {path}: {type(e).__name__}: '
                          f'{" ".join(str(e).split())[:400]}') from None


def backbone(config, where):
    """The GPTConfig fields of the GPT-2 that config (a config.json as a dict) describes. A model of
    another architecture, or a GPT-2 option that model.py does not implement, is refused naming
    the key."""
    c = {**HF_DEFAULTS, **config}
    if c.get('model_type') != 'gpt2':
        raise ConfigError(f"{where}: model_type={c.get('model_type')!r}, expected 'gpt2': "
                          "only GPT-2's architecture loads into this model")
    checks = [
        ('activation_function', c['activation_function'] in GELU, ' or '.join(map(repr, GELU))),
        ('n_inner', c['n_inner'] in (None, 4 * c['n_embd']),
         f'None or 4 * n_embd = {4 * c["n_embd"]}'),
        ('layer_norm_epsilon', c['layer_norm_epsilon'] == LayerNorm.eps,
         f"{LayerNorm.eps}, model.py's LayerNorm epsilon"),
        ('scale_attn_weights', c['scale_attn_weights'] is True,
         'True: attention scores scaled by 1/sqrt(head size)'),
        ('scale_attn_by_inverse_layer_idx', c['scale_attn_by_inverse_layer_idx'] is False, 'False'),
        ('tie_word_embeddings', c['tie_word_embeddings'] is True,
         'True: the output layer is the token embedding'),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f'{where}: {key}={c[key]!r}, expected {expected}')
    fields = dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'],
                  block_size=c['n_positions'], vocab_size=c['vocab_size'], bias=True,
                  gelu_approx=GELU[c['activation_function']])
    try:
        GPTConfig(**fields)  # e.g. n_embd not divisible by n_head
    except (TypeError, ValueError) as e:  # TypeError: a number compared with a string or null
        raise ConfigError(f'{where}: {e}') from None
    return fields


def model_names(sd, where):
    """Hugging Face's GPT-2 state_dict in model.py's names and layouts. Whether every weight is
    there with its shape is for GPT.load_backbone to check: it names each key that does not fit."""
    out = {}
    for k, v in sd.items():
        # GPT2LMHeadModel's keys have it; GPT2Model's (the hub's gpt2 files) not
        k = k.removeprefix('transformer.')
        # the causal mask, a buffer that older transformers saved; our attention is causal by itself
        if k.endswith(('.attn.bias', '.attn.masked_bias')):
            continue
        if k == 'lm_head.weight':
            continue  # the output layer: the token embedding, as checked below
        out['transformer.' + k] = v.t() if k.endswith(CONV1D) else v  # (in, out) -> (out, in)
    wte, head = out.get('transformer.wte.weight'), sd.get('lm_head.weight')
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise ConfigError(f'{where}: lm_head.weight differs from transformer.wte.weight; '
                          'model.py ties the output layer to the token embedding, as GPT-2 does')
    if wte is not None:
        out['lm_head.weight'] = wte  # tied: one tensor under both names, as in GPT's state_dict
    return out
