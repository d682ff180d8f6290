"""A GPT-2 language model with four ways to carry the residual stream, in one file.

The transformer backbone is nanoGPT's GPT-2, the same in every variant. What varies is the residual
stream: what a sublayer (attention or MLP) reads, how its output is written back, and what reaches
the final LayerNorm. `GPTConfig.residual` picks one of:

  'standard'  x = x + F(ln(x))                                                        (GPT-2)
  'ddl'       Deep Delta Learning, Zhang et al. 2026, arXiv:2601.00417: a gated delta-rule rewrite
              of the state along each sublayer output; scalar (ddl_dv=1) or expanded d x dv state
  'attnres'   Attention Residuals, Kimi Team 2026, arXiv:2603.15031: each sublayer reads a softmax
              mixture of the embedding and all earlier sublayer outputs (res_block=0), or block sums
  'delta'     Delta Attention Residuals, Luo et al. 2026, arXiv:2605.18855: the same routed mixture
              added on top of the untouched standard stream (res_block=0 per sublayer, S blocks)

Every variant is a small `nn.Module` with four methods: start(e) builds the stream state from the
embedding, read(st, s) gives sublayer s its input, write(st, s, out, h, c) writes the output back,
final(st) gives the input of ln_f. AttnRes and Delta share one routing primitive, `depth_route`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# --------------------------------------------------------------------------------------------------
# The GPT-2 backbone (as in nanoGPT)

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""
    eps = 1e-5  # GPT-2's

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; c_attn makes q, k, v in one matmul."""

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # q, k, v: (B, nh, T, hs)
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approx = config.gelu_approx

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approx)))


class Block(nn.Module):
    """One layer: two (pre-norm, function) sublayers; the stream between them is the variant's."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)


RESIDUALS = ('standard', 'ddl', 'attnres', 'delta')


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linears and LayerNorms; False is a little better and faster
    gelu_approx: str = 'none'  # MLP GELU: 'none' exact (nanoGPT), 'tanh' GPT-2's (for its weights)
    residual: str = 'standard'  # one of RESIDUALS
    res_block: int = 0  # attnres/delta: route over each sublayer output (0) or S-sublayer sums
    ddl_dv: int = 1  # ddl: value channels of the state; 1 = a vector stream, >1 = a d x dv matrix
    delta_gate: bool = False  # delta: scale the routed term by a learnable scalar that starts at 0

    def __post_init__(self):
        checks = [
            ('residual', self.residual in RESIDUALS, f'one of {RESIDUALS}'),
            ('res_block', 0 <= self.res_block <= 2 * self.n_layer,
             f'0 (per sublayer) or a block of S <= 2 * n_layer = {2 * self.n_layer} sublayers'),
            ('ddl_dv', self.ddl_dv >= 1, 'an int >= 1'),
            ('gelu_approx', self.gelu_approx in ('none', 'tanh'), "'none' (exact) or 'tanh'"),
            ('n_embd', self.n_head > 0 and self.n_embd % self.n_head == 0,
             f'divisible by n_head={self.n_head}'),
            ('dropout', 0.0 <= self.dropout < 1.0, 'in [0, 1)'),
        ] + [(k, getattr(self, k) > 0, 'an int > 0')
             for k in ('block_size', 'vocab_size', 'n_layer', 'n_head')]
        for field, ok, expected in checks:
            if not ok:
                raise ValueError(f'GPTConfig.{field}={getattr(self, field)!r}: expected {expected}')

# --------------------------------------------------------------------------------------------------
# The residual streams. s = 0 .. 2L-1 numbers the sublayers (even: attention, odd: MLP).

class Standard(nn.Module):
    """x <- x + F(ln(x)). The state is the stream itself."""

    def start(self, e):
        return {'x': e}  # every variant's state is a dict of tensors, built here from the embedding

    def read(self, st, s):
        return st['x']  # every sublayer reads the running sum ...

    def write(self, st, s, out, h, c):
        st['x'] = st['x'] + out  # ... and adds its output to it: x_final = e + sum_s out_s

    def final(self, st):
        return st['x']  # what goes into ln_f


class DeepDelta(nn.Module):
    """Deep Delta Learning: a delta rule rewrites the state X (d x dv per token) along k = out/|out|
        X += beta k (v^T - k^T X),  beta = 2 sigmoid(w_b . c + b_b),  v = 4 sigmoid(W_v x_in + b_v)
    The readout error along k shrinks by (1 - beta), beta in (0, 2); directions orthogonal to k are
    untouched; beta = 0 is the identity. v reads the un-normalised x_in, as the paper's code (text:
    W_v c). dv = 1 is the scalar form; dv > 1 the paper's default 'DDL': a channel compressor per
    layer (for both sublayers, plus one for the readout) and a causal conv expanding e into X."""
    eps_k = 1e-5  # k's epsilon: |out| below it and k shrinks to 0 instead of dividing by ~0

    def __init__(self, config):
        super().__init__()
        d, dv, L = config.n_embd, config.ddl_dv, config.n_layer
        self.dv = dv
        std = 0.5 / math.sqrt(d)  # the paper's code initialises these with N(0, 0.5/sqrt(d))
        self.w_b = nn.Parameter(torch.randn(2 * L, d) * std)  # gate: one row per sublayer
        self.b_b = nn.Parameter(torch.zeros(2 * L))  # logit(beta0/2), beta0 = 1: the code's default
        self.w_v = nn.Parameter(torch.randn(2 * L, dv, d) * std)  # v: dv rows per sublayer
        self.b_v = nn.Parameter(torch.empty(2 * L, dv).uniform_(-1 / math.sqrt(d),
                                                                1 / math.sqrt(d)))
        if dv > 1:
            # compress(X)[i] = sum_j W[i, j] X[i, j]; W = 1/dv makes compress(repeat(e)) = e at init
            # (the paper's mean; the code's random W flips signs of x_in). L + 1: layers + readout
            self.compress = nn.Parameter(torch.full((L + 1, dv, d), 1.0 / dv))
            # Embedding conv: causal, kernel 4, channel i of e feeds its own dv output channels
            self.ec = nn.Parameter(torch.zeros(d * dv, 1, 4))
            self.ec.data[:, 0, -1] = 1.0  # identity init (last tap 1): X0 = repeat(e)

    # X is stored as (B, T, dv, d): d contiguous, so the sums over d below are reductions along rows
    def start(self, e):
        if self.dv == 1:
            return {'X': e.unsqueeze(-2)}  # (B, T, 1, d)
        B, T, d = e.shape
        # 3 zeros padded in front: output t sees inputs t-3..t only (causal), as a decoder must
        X = F.conv1d(F.pad(e.transpose(1, 2), (3, 0)), self.ec.to(e.dtype), groups=d)
        return {'X': X.view(B, d, self.dv, T).permute(0, 3, 2, 1)}  # (B, d*dv, T) -> (B, T, dv, d)

    def _compress(self, X, i):
        # x_in[i] = sum_j W[j, i] X[j, i]: each channel mixes only its own dv values; (B, T, dv, d)
        return X.squeeze(-2) if self.dv == 1 else (X * self.compress[i]).sum(-2)  # -> (B, T, d)

    def read(self, st, s):
        return self._compress(st['X'], s // 2)  # layer s // 2's compressor: both its sublayers

    def write(self, st, s, out, h, c):
        X, out = wide(st['X']), wide(out)  # the write in fp32
        # k = out / sqrt(|out|^2 + eps^2): a unit vector, unless out ~ 0 (then k ~ 0: nothing moves)
        k = out * torch.rsqrt(out.pow(2).sum(-1, keepdim=True) + self.eps_k ** 2)  # (B, T, d)
        # multiply-and-sum, not matmul, so autocast keeps them in fp32. beta: (B, T), v: (B, T, dv)
        beta = 2 * torch.sigmoid((wide(c) * self.w_b[s]).sum(-1) + self.b_b[s])
        v = 4 * torch.sigmoid((wide(h).unsqueeze(-2) * self.w_v[s]).sum(-1) + self.b_v[s])
        r = (k.unsqueeze(-2) * X).sum(-1)  # k^T X: (B, T, dv)
        # X' = X + k (beta (v - k^T X))^T, so k^T X' = (1 - beta) k^T X + beta v for a unit k: the
        # readout moves a fraction beta of the way to v, and X orthogonal to k stays as it was
        st['X'] = X + (beta.unsqueeze(-1) * (v - r)).unsqueeze(-1) * k.unsqueeze(-2)  # rank-1 write

    def final(self, st):
        return self._compress(st['X'], -1)  # the readout compressor: the last of the L + 1


def wide(t):
    """t in fp32 for statistics and accumulation (fp64 stays fp64, so tests can check in fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def source_logits(v, W, eps=1e-6):
    """The logits of one source v (B, T, d) against the queries of all R reads at once, (B, T, R):
        q_r . RMSNorm(v; g_r) = (q_r * g_r) . v / rms(v),   W = query * key_gain (R, d)
    The queries are parameters, not functions of the input: a source's logits are computed once, at
    its creation; its keys never materialise. No 1/sqrt(d) or temperature (as the paper); fp32."""
    with torch.autocast(device_type=v.device.type, enabled=False):  # else the matmul runs in bf16
        v = wide(v)
        # (B, T, d) @ (d, R) -> (B, T, R), then times the key's normalisation 1/rms(v) (B, T, 1)
        return (v @ W.to(v.dtype).t()) * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def depth_route(srcs, logits):
    """Softmax attention over depth, the primitive shared by AttnRes and Delta AttnRes.
    srcs: n sources (B, T, d), the values; logits: their n logits (B, T) for this read.
    Returns the mixture sum_i a_i v_i (B, T, d) in fp32 and the weights a (n, B, T)."""
    a = torch.stack(logits).softmax(0)  # (n, B, T): normalised over depth, per token
    # values: raw sources, not their RMS-normalised keys. A Python sum, not a stacked (n, B, T, d)
    # tensor: no copy of the sources, and torch.compile fuses it into one kernel reading each once
    return sum(a[i].unsqueeze(-1) * wide(v) for i, v in enumerate(srcs)), a


class Routed(nn.Module):
    """Attention Residuals (additive=False) and Delta Attention Residuals (additive=True).
    Sources: the embedding e (never summed into a block), then for blocks of S sublayers the sum of
    each finished block and the partial sum of the current one; S = 1 (res_block=0) is every output.
    AttnRes replaces the stream: sublayer s reads h = sum_i a_i v_i, and a final read feeds ln_f.
    Delta keeps the standard stream x <- x + out and reads h = x + gamma_s * sum_i a_i v_i; sublayer
    0 reads x = e unrouted (its one source). gamma_s = 1, or learned from 0 with delta_gate."""

    def __init__(self, config, additive):
        super().__init__()
        L2, d = 2 * config.n_layer, config.n_embd
        self.additive, self.S = additive, config.res_block or 1
        self.n_reads = L2 - 1 if additive else L2 + 1  # one per sublayer, +1 final / -1 sublayer 0
        self.query = nn.Parameter(torch.zeros(self.n_reads, d))  # 0: uniform at init (mandatory)
        self.key_gain = nn.Parameter(torch.ones(self.n_reads, d))
        self.gate = nn.Parameter(torch.zeros(self.n_reads)) if config.delta_gate else None
        self.probe = None  # diagnostics (routing.py) see, and may change, each read's logits here

    def start(self, e):
        W = self.query * self.key_gain  # (R, d): every read's query with its key gain folded in
        # x: the standard stream (Delta only); blocks: the finished sources, e first; logits: theirs
        # against every read, (B, T, R) each; partial: the current block's running sum (None: empty)
        return {'x': e, 'W': W, 'blocks': [e], 'logits': [source_logits(e, W)], 'partial': None}

    def _route(self, st, r):
        """Read number r: the mixture of every source visible now."""
        srcs, logits = st['blocks'], [lg[..., r] for lg in st['logits']]  # column r: read r's
        if st['partial'] is not None:
            srcs, logits = srcs + [st['partial']], logits + [st['partial_logits'][..., r]]
        if self.probe is not None:  # finished sources are logits[:nb], the partial (if any) last
            logits = self.probe(r, logits, len(st['blocks']))
        return depth_route(srcs, logits)[0]

    def read(self, st, s):
        if not self.additive:
            return self._route(st, s)  # replacement: the mixture is all the sublayer sees
        if s == 0:
            return st['x']  # = e; routing over the single source e would only add e to itself
        mix = self._route(st, s - 1)  # Delta's read of sublayer s is read number s - 1
        return st['x'] + (mix if self.gate is None else self.gate[s - 1] * mix)

    def write(self, st, s, out, h, c):
        if self.additive:
            st['x'] = st['x'] + out
        # a block's running sum is kept in fp32 (a sum of bf16 outputs would round at every step)
        st['partial'] = out if st['partial'] is None else wide(st['partial']) + out
        st['partial_logits'] = source_logits(st['partial'], st['W'])
        if (s + 1) % self.S == 0:  # block finished: it becomes a source of its own
            st['blocks'].append(st['partial'])
            st['logits'].append(st['partial_logits'])
            st['partial'] = None

    def final(self, st):  # Delta's stream is complete; AttnRes's is one more read (its own query)
        return st['x'] if self.additive else self._route(st, self.n_reads - 1)

# --------------------------------------------------------------------------------------------------
# The model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # residual projections: std 0.02/sqrt(2L) (GPT-2),
            if pn.endswith('c_proj.weight'):  # so that the sum of 2L outputs keeps its scale
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        r = config.residual  # the variant last: the init above is for Linear and Embedding only
        self.stream = (Standard() if r == 'standard' else DeepDelta(config) if r == 'ddl'
                       else Routed(config, additive=(r == 'delta')))  # fast/ swaps in a fused twin

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def sublayers(self):
        """The 2L (pre-norm, function) pairs in order: attention then MLP of each layer."""
        for block in self.transformer.h:
            yield block.ln_1, block.attn
            yield block.ln_2, block.mlp

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without wpe (wte counts: it is also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        B, T = idx.size()  # idx: (B, T) token ids; e, h, x below: (B, T, d)
        if T > self.config.block_size:
            raise ValueError(f'sequence length {T} > block_size {self.config.block_size}')
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        e = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        st = self.stream.start(e)  # one loop for every variant: only start/read/write/final differ
        for s, (norm, f) in enumerate(self.sublayers()):
            h = self.stream.read(st, s)  # what sublayer s reads, before its pre-norm: (B, T, d)
            c = norm(h)  # DDL needs c too: its gate beta is computed from the normalised input
            self.stream.write(st, s, f(c), h, c)
        x = self.transformer.ln_f(self.stream.final(st))  # (B, T, d)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position is needed
        logits = self.lm_head(x)  # (B, T, V); loss on (B*T, V) rows, in fp32 even under autocast
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                               ignore_index=-1)  # -1 marks targets to ignore
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx (B, T), feeding each prediction back in."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # crop the context to block_size
            logits, _ = self(idx_cond)  # (B, 1, V): only the last position
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')  # keep only the top_k largest
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ----------------------------------------------------------------------------------------------
    # Training helpers

    def variant_param_names(self):
        """Names of the parameters that only this variant has (all under 'stream.')."""
        return {n for n, _ in self.named_parameters() if n.startswith('stream.')}

    def load_backbone(self, state_dict):
        """Load any variant's checkpoint: the backbone must match exactly, the variant's own
        parameters where the checkpoint has them with the same shape. Returns those left at init."""
        sd = {k.removeprefix('_orig_mod.').removeprefix('module.'): v
              for k, v in state_dict.items()}  # prefixes torch.compile and DDP add when they wrap
        own = self.state_dict()
        variant = self.variant_param_names()
        problems = [f'missing {k}' for k in own if k not in variant and k not in sd]
        problems += [f'unexpected {k}' for k in sd if k not in own and not k.startswith('stream.')]
        problems += [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
                     for k in own if k in sd and k not in variant and sd[k].shape != own[k].shape]
        if problems:
            raise ValueError('checkpoint backbone does not match this model: '
                             + '; '.join(problems[:8]))
        # e.g. attnres -> delta: both have queries, but 2L + 1 rows vs 2L - 1, so they stay at init
        load = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
        self.load_state_dict(load, strict=False)
        return sorted(variant - load.keys())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             routing_lr_mult=1.0):
        """AdamW. Weight decay on the backbone's matrices only: not gains, biases, or the variant's
        own parameters (queries, key gains, gates, DDL vectors). Groups carry lr_mult (schedule)."""
        variant = self.variant_param_names()
        groups = {}
        for n, p in self.named_parameters():
            if p.requires_grad:
                key = (n in variant, p.dim() >= 2 and n not in variant)  # (variant's?, decayed?)
                groups.setdefault(key, []).append(p)
        optim_groups = [dict(params=ps, weight_decay=weight_decay if decay else 0.0,
                             lr_mult=routing_lr_mult if is_variant else 1.0)
                        for (is_variant, decay), ps in groups.items()]
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas,
                                 fused=(device_type == 'cuda'))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward = 3x forward), after PaLM appendix B: 6N
        for the matmuls, 12 L d T for attention at T = block_size, plus the variant's own work."""
        cfg = self.config
        L, d, T = cfg.n_layer, cfg.n_embd, cfg.block_size
        N = self.get_num_params() - sum(p.numel() for p in self.stream.parameters())  # backbone
        fwd = 0  # extra forward FLOPs of the residual stream, per token
        if isinstance(self.stream, DeepDelta):
            dv = cfg.ddl_dv  # per sublayer: normalise k, beta, v, k^T X, rank-1 write: ~12 d dv
            fwd = 2 * L * 12 * d * dv + (0 if dv == 1 else (2 * L + 1) * 2 * d * dv + 8 * d * dv)
        elif isinstance(self.stream, Routed):  # a read over n sources costs 6 n d:
            for s in range(self.stream.n_reads):  # logits (dot + rms, ~4 n d), mixture (2 n d)
                fwd += 6 * d * _num_sources(s + int(self.stream.additive), self.stream.S)
        # e.g. GPT-2 124M, standard stream: 6 * 123.6M + 12 * 12 * 768 * 1024 = 0.855 GFLOP/token
        return 6 * N + 12 * L * d * T + 3 * fwd

    def estimate_mfu(self, tokens_per_sec, peak):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None if unknown)."""
        return None if not peak else self.flops_per_token() * tokens_per_sec / peak


def _num_sources(s, S):
    """Sources read before sublayer s (2L: final read): e, finished blocks, a started partial."""
    return 1 + s // S + (1 if s % S else 0)
