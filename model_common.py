"""What every language model of this repo shares, written once.

Backbone (Llama-style, paper section 5.4):

    tokens -> embedding -> n_layer x Block -> RMSNorm -> LM head (tied to the embedding)
    Block:  x = x + mixer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))

The mixer of each block is chosen by one letter of `layer_pattern` (tiled to n_layer):
    "M"  MirasLayer: a test-time-trained associative memory (memory_core.miras_memory)
    "A"  causal self-attention with RoPE (F.scaled_dot_product_attention; flash on CUDA)
    "S"  sliding-window attention (window `window`), as in the paper's hybrids (Samba-style "MS...")

The Miras layer (paper section 5.4):
    x -> q, k, v = Linear(x) -> depthwise causal Conv1d (kernel 4) -> SiLU -> H heads -> l2-normalize q, k
      -> (RoPE on q, k if use_rope) -> per-token, per-head gates from x through a low-rank map:
         eta_hat = eta_max * sigmoid(.)                    a bounded step in (0, eta_max), normalized by
                                                           memory_core.normalized_eta (eta_gate="normalized":
                                                           Yaad, Memora)
         eta = eta_base * softplus(.)                      or a plain inner learning rate, > 0
                                                           (eta_gate="softplus": Moneta, the generic default)
         alpha = alpha_min + (1 - alpha_min) * sigmoid(.)  retention, in [alpha_min, 1]  (or 1: alpha_gate=False)
         delta = softplus(.) + 1e-4                        huber threshold (objective "huber")
         mu = mu_min + (mu_max - mu_min) * sigmoid(.)      momentum (momentum=True)
      -> memory y_t = M_{W_t}(q_t), from learned initial fast weights (per head, shared over the batch)
      -> per-head RMSNorm of y, times act(Linear(x)) (act: silu or sigmoid) -> Linear out

Inference: `prefill` runs the parallel (chunked) path over a prompt and fills a cache; `forward_step`
decodes one token with O(1) state per Miras layer (conv state + memory_core.MemoryState) and a KV cache per
attention layer (a ring buffer of `window` slots for sliding-window layers). Decoding reproduces the full
forward exactly (tests/test_models.py checks it in float64).

Each model file (model_moneta.py, model_yaad.py, model_memora.py, model_transformer.py) holds its config
with the paper's defaults, the code of its own attentional bias / retention (registered with memory_core)
and its LM assembled from the pieces here. The presets that name sizes and known models live here too
(SIZE_PRESETS, VARIANTS).
"""
import inspect
import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

import memory_core


# ----------------------------------------------------------------------------------------------
# Configs

@dataclass
class LMConfig:
    """The backbone. Every field is a plain bool / int / float / str (models.make_config type-checks)."""
    block_size: int = 4096        # training context (the paper trains at 4096); decoding may go past it
    vocab_size: int = 50304       # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 768
    mlp_hidden: int = 0           # SwiGLU hidden size; 0: Llama's rule, 8/3 * n_embd rounded up to 256
    layer_pattern: str = "A"      # tiled to n_layer: "M" Miras, "A" attention, "S" sliding-window attention
    window: int = 2048            # sliding-window size of "S" layers (Samba uses 2048)
    rope_theta: float = 10000.0
    attention_rope: bool = True   # False: NoPE attention (no position encoding; the causal mask alone orders tokens)
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 0.02        # nanoGPT init; residual projections get init_std / sqrt(2 n_layer)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim={self.n_embd // self.n_head} must be even (RoPE)")
        if not self.layer_pattern or set(self.layer_pattern) - set("MAS"):
            raise ValueError(f"layer_pattern={self.layer_pattern!r}: use the letters M (Miras), "
                             "A (attention), S (sliding-window attention)")
        if self.n_layer % len(self.layer_pattern):
            raise ValueError(f"layer_pattern={self.layer_pattern!r} (length {len(self.layer_pattern)}) must "
                             f"tile n_layer={self.n_layer}")
        if "M" in self.layer_pattern and not isinstance(self, MirasConfig):
            raise ValueError("layer_pattern has Miras layers ('M'): use a MirasConfig")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def layers(self):
        """The layer pattern tiled to n_layer, one letter per block."""
        return self.layer_pattern * (self.n_layer // len(self.layer_pattern))

    @property
    def hidden(self):
        if self.mlp_hidden:
            return self.mlp_hidden
        return 256 * math.ceil(int(8 * self.n_embd / 3) / 256)

    def to_dict(self):
        return asdict(self)


@dataclass
class MirasConfig(LMConfig):
    """The Miras framework's four choices plus the layer's details."""
    layer_pattern: str = "M"
    memory: str = "mlp"           # "mlp": M(x) = x + LN(W_out gelu(W_in x)); "linear": x + LN(W x)
    expansion: int = 4            # E: the memory MLP has E * head_dim hidden units
    objective: str = "l2"         # attentional bias: "l2" | "dot" | "lp" | "huber"
    retention: str = "l2"         # retention gate: "l2" | "lq" | "kl"
    momentum: bool = False        # inner momentum (Titans-LMM); not with kl
    p: float = 3.0                # lp objective
    q_norm: float = 4.0           # lq retention
    lq_link: str = "printed"      # lq retention's link from accumulator to weights: "printed" (Eq. 24 as printed,
                                  # W = A / ||A||_q^(q-2)) | "pnorm" (section 5.2's p-norm link; model_moneta.py)
    sharpness: float = 10.0       # tau of the smoothed sign tanh(tau x) (lp, huber)
    eps: float = 1e-6
    simplex_scale: float = 0.0    # kl: rows live on c * simplex; 0 means c = the row's length
    chunk_size: int = 64          # b: gradients inside a chunk are taken at one anchor
    compile_memory: Optional[bool] = None  # torch.compile each memory chunk (memory_core compile_chunks), with
                                  # or without a whole-model compile (which sees the chunk loop as one operator);
                                  # None: on CUDA inputs, and on any device inside a whole-model torch.compile
                                  # (train.py --compile): on a CPU alone, compiling costs more than it saves
    recompute_inputs: bool = True  # training: the backward recomputes the memory's inputs (input projection, short
                                  # conv, silu, norms, gates) instead of keeping them: the activation memory of
                                  # the default, for a slower step; False keeps them (README, "The memory engine")
    conv_size: int = 4            # depthwise causal conv on q, k, v
    use_rope: bool = False        # RoPE on the Miras layer's q, k (attention layers always use RoPE)
    gate_rank: int = 32           # rank of the low-rank gate projection (paper: 32 or 64)
    out_gate: str = "silu"        # output gate activation: "silu" | "sigmoid"
    eta_gate: str = "softplus"    # "softplus": eta = eta_base * softplus(.), softplus starting at 1;
                                  # "normalized": eta_hat = eta_max * sigmoid(.), normalized by the energy of the
                                  # step (memory_core.normalized_eta; Yaad's and Memora's default). Moneta keeps
                                  # softplus: with lq retention the "gain" step makes the outer gradients
                                  # explode across chunks at init ("gauss_newton" does not, but Moneta did not
                                  # learn MQAR on it; README, "Stability")
    eta_base: float = 3e-4        # eta_gate="softplus": with all gradients of a chunk at one anchor a chunk
                                  # moves the memory by ~b steps at once; larger values made the outer
                                  # gradients explode across chunks (README, "Stability")
    step_norm: str = "gain"       # eta_gate="normalized": what the step is sized by (memory_core.normalized_eta):
                                  # "gain", the output gain along g; "gauss_newton", the output change of the step
                                  # itself (never larger: stable on long streams of recurring pairs where "gain" is
                                  # chaotic, lower LM loss, but MQAR is learned far less reliably: README,
                                  # "Stability")
    eta_max: float = 1.0          # eta_gate="normalized": ceiling of eta_hat (1: a lone pair's full step)
    eta_init: float = 0.5         # eta_gate="normalized": eta_hat at init
    alpha_gate: bool = True       # False: alpha = 1 (no retention: TTT, the paper's "- retention" ablation)
    alpha_min: float = 0.1
    alpha_init: float = 0.99
    delta_init: float = 0.0       # huber threshold at init; 0 means 2 sqrt(head_dim) (model_yaad.HuberBias)
    mu_init: float = 0.9          # momentum at init

    def __post_init__(self):
        super().__post_init__()
        for name, valid in (("memory", memory_core.MEMORIES), ("out_gate", ("silu", "sigmoid")),
                            ("lq_link", ("printed", "pnorm"))):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {valid}")
        memory_core.resolve("objective", self.objective)
        if self.momentum and not memory_core.resolve("retention", self.retention).momentum:
            raise ValueError(f"momentum works with retention {memory_core.momentum_retentions()}, "
                             f"not {self.retention!r}")
        if self.chunk_size < 1 or self.conv_size < 1 or self.gate_rank < 1 or self.expansion < 1:
            raise ValueError("chunk_size, conv_size, gate_rank and expansion must be >= 1")
        if not 0.0 < self.alpha_min < self.alpha_init < 1.0:
            raise ValueError(f"need 0 < alpha_min < alpha_init < 1, got {self.alpha_min}, {self.alpha_init}")
        if not MU_MIN < self.mu_init < MU_MAX:
            raise ValueError(f"mu_init must lie in ({MU_MIN}, {MU_MAX}), got {self.mu_init}")
        if self.eta_gate not in ("normalized", "softplus"):
            raise ValueError(f"eta_gate={self.eta_gate!r}: use 'normalized' or 'softplus'")
        if self.step_norm not in memory_core.STEP_NORMS:
            raise ValueError(f"step_norm={self.step_norm!r}: use one of {', '.join(memory_core.STEP_NORMS)}")
        if not 0.0 < self.eta_max <= 2.0:
            raise ValueError(f"eta_max must lie in (0, 2] (the normalized step contracts for eta_hat < 2), "
                             f"got {self.eta_max}")
        if not 0.0 < self.eta_init < self.eta_max:
            raise ValueError(f"eta_init must lie in (0, eta_max={self.eta_max}), got {self.eta_init}")
        if self.eta_base <= 0:
            raise ValueError(f"eta_base must be > 0, got {self.eta_base}")


MU_MIN, MU_MAX = 1e-3, 0.999  # momentum stays inside (0, 1) without clamping

# Paper Table 5 (all 16 heads). The text calls the first and third 120M and 760M, Table 5 170M and 780M;
# both names work. 1.3B is not in Table 5: 24 x 2048 is the 1.3B shape of the baselines the paper copies
# (GLA / Gated DeltaNet). `tiny` trains on a CPU in minutes.
SIZE_PRESETS = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, block_size=256, window=64),
    "120m": dict(n_layer=12, n_embd=768, n_head=16),
    "340m": dict(n_layer=24, n_embd=1024, n_head=16),
    "760m": dict(n_layer=24, n_embd=1536, n_head=16),
    "1.3b": dict(n_layer=24, n_embd=2048, n_head=16),
}
# The peak learning rate of each size (Table 5; 1.3b continues the table's trend): a training setting, not part
# of the model config. train.py takes it for --learning_rate=None (models.preset_learning_rate).
PRESET_LEARNING_RATES = {"tiny": 1e-3, "120m": 3e-3, "340m": 1.5e-3, "760m": 1.25e-3, "1.3b": 1e-3}
DEFAULT_LEARNING_RATE = 3e-3  # a preset that names no size
SIZE_ALIASES = {"170m": "120m", "780m": "760m"}
NOMINAL_PARAMS = {"120m": 120e6, "340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}

# Known models of the framework (paper Table 1) and the paper's ablations, as overrides of a Miras config.
# "_like": same four Miras choices, but our memory (x + LN(.), chunk-anchored gradients), not the original.
VARIANTS = {
    "titans_lmm": dict(memory="mlp", objective="l2", retention="l2", momentum=True),   # Titans-LMM, no attention
    "ttt_mlp": dict(memory="mlp", objective="l2", retention="l2", alpha_gate=False, chunk_size=16),
    "ttt_linear": dict(memory="linear", objective="l2", retention="l2", alpha_gate=False, chunk_size=16),
    "gated_deltanet_like": dict(memory="linear", objective="l2", retention="l2"),
    "deltanet_like": dict(memory="linear", objective="l2", retention="l2", alpha_gate=False),
    "gated_linear_attention_like": dict(memory="linear", objective="dot", retention="l2"),
    "linear_ablation": dict(memory="linear"),            # the model's own choices with a linear memory
    "no_retention": dict(alpha_gate=False),              # Table 4 "- retention gate" (alpha = 1)
    "hybrid": dict(layer_pattern="MS"),                  # Moneta-H / Yaad-H / Memora-H: Miras + SWA
}


# ----------------------------------------------------------------------------------------------
# Small modules

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)  # gate and value halves, one matmul
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class Rotary(nn.Module):
    """RoPE angles for explicit positions (no length limit, so decoding may pass block_size)."""

    def __init__(self, head_dim, theta):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pos):
        angles = pos.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # [T, d/2]
        return angles.cos(), angles.sin()


def apply_rope(x, rope):
    """Rotate the two halves of the last dim (GPT-NeoX / Llama-HF layout). x: [B, H, T, d]."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1) if x.dtype in (torch.float16, torch.bfloat16) else x.chunk(2, dim=-1)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def logit(p):
    return math.log(p / (1.0 - p))


def inv_softplus(y):
    return y + math.log(-math.expm1(-y))


class Gate(NamedTuple):
    """A per-token, per-head scalar the Miras layer produces from x: value = activation(low-rank map of x
    + bias), with the bias starting at `init_bias`. The activation is a partial of a module-level function
    (sigmoid_between, scaled_softplus), not a closure over the config: dynamo failed to trace a closure's
    free variable inside the checkpointed input stage once a second model class had been compiled in the
    same process."""
    name: str
    init_bias: float
    activation: Callable


def sigmoid_between(x, low, high):
    return low + (high - low) * torch.sigmoid(x)


def scaled_softplus(x, scale, shift=0.0):
    return scale * F.softplus(x) + shift


# ----------------------------------------------------------------------------------------------
# Decoding caches

class AttnCache:
    """Preallocated keys and values [B, H, L, d]: L = max_len (full attention) or window (ring buffer)."""

    def __init__(self, batch, heads, length, head_dim, ring, device, dtype):
        self.k = torch.zeros(batch, heads, length, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.ring = ring


class MirasCache:
    """Conv state (the last conv_size - 1 pre-conv inputs, [B, K-1, 3C]) and the memory's MemoryState;
    chunk_start: whether the next token starts a chunk, when a compiled decode step knows it on the host
    (memory_core.miras_memory_step's chunk_start; None: decided from the state's position)."""

    def __init__(self):
        self.conv = None
        self.mem = None
        self.chunk_start = None


class Cache:
    """Per-layer caches and the position of the next token (a 0-dim tensor, so a compiled step serves all)."""

    def __init__(self, layers, device):
        self.layers = layers
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.started = False
        self.decode_owner = None  # (a compiled decode step's mark, the state objects it writes in place): sample.py


def iter_tensors(obj):
    """The tensors in obj, a tensor or nested tuples / lists of them (a MemoryState, its per-layer tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from iter_tensors(x)


def state_bytes(cache):
    """Bytes of a decoding cache per sequence: {"miras": short-conv tails + memory state (fast weights, chunk
    anchor, lq norms, momentum) of the Miras layers, constant in the length; "attention": the KV caches (full
    attention: preallocated for the whole run; sliding window: `window` slots); "total"}. The one count of
    the decoding state: sample.py and bench.py report it."""
    miras = attention = 0
    batch = 1
    for layer in cache.layers:
        if isinstance(layer, AttnCache):
            batch = layer.k.shape[0]
            attention += sum(t.numel() * t.element_size() for t in (layer.k, layer.v))
        else:  # MirasCache
            parts = [layer.conv] + (list(layer.mem) if layer.mem is not None else [])
            for t in iter_tensors(parts):
                if t.dim() >= 1:
                    batch = t.shape[0]
                    miras += t.numel() * t.element_size()
    return {"miras": miras // batch, "attention": attention // batch, "total": (miras + attention) // batch}


# ----------------------------------------------------------------------------------------------
# Mixers

class Attention(nn.Module):
    """Causal self-attention with RoPE (NoPE if cfg.attention_rope is False); `window` > 0 makes it sliding-window
    (token t sees t-window+1..t)."""

    def __init__(self, cfg, window=0):
        super().__init__()
        self.n_head, self.head_dim, self.window = cfg.n_head, cfg.head_dim, window
        self.use_rope = cfg.attention_rope
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def new_cache(self, batch, max_len, device, dtype):
        ring = bool(self.window) and self.window < max_len
        length = self.window if ring else max_len
        return AttnCache(batch, self.n_head, length, self.head_dim, ring, device, dtype)

    def forward(self, x, rope, cache=None, pos=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.use_rope:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None and pos is not None:  # one decoding step: static shapes, position as a tensor
            y = self._step(q, k, v, cache, pos)
        else:
            drop = self.dropout if self.training else 0.0
            if not self.window or T <= self.window:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
            else:
                i = torch.arange(T, device=x.device)
                band = (i.view(-1, 1) >= i.view(1, -1)) & (i.view(-1, 1) - i.view(1, -1) < self.window)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=drop)
            if cache is not None:
                self._prefill(k, v, cache)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    @staticmethod
    def _prefill(k, v, cache):
        T, L = k.shape[2], cache.k.shape[2]
        if not cache.ring:
            if T > L:
                raise ValueError(f"prompt of {T} tokens does not fit the KV cache of {L}")
            cache.k[:, :, :T] = k.to(cache.k.dtype)
            cache.v[:, :, :T] = v.to(cache.v.dtype)
        else:
            n = min(T, L)
            slots = torch.arange(T - n, T, device=k.device) % L
            cache.k[:, :, slots] = k[:, :, T - n:].to(cache.k.dtype)
            cache.v[:, :, slots] = v[:, :, T - n:].to(cache.v.dtype)

    @staticmethod
    def _step(q, k, v, cache, pos):
        L = cache.k.shape[2]
        slot = (pos % L if cache.ring else pos).view(1)
        cache.k.index_copy_(2, slot, k.to(cache.k.dtype))
        cache.v.index_copy_(2, slot, v.to(cache.v.dtype))
        valid = torch.arange(L, device=q.device) <= pos  # ring: every slot once pos >= L
        y = F.scaled_dot_product_attention(q.to(cache.k.dtype), cache.k, cache.v, attn_mask=valid.view(1, 1, 1, L))
        return y.to(q.dtype)


def conv_taps_in_layout(taps, param):
    """Checkpoints written before the short conv's taps became [K, 3C] hold nn.Conv1d's [3C, 1, K] (the same
    taps, transposed), for the weights and their optimizer moments: those in `param`'s layout; others as they are."""
    if torch.is_tensor(taps) and taps.shape == (param.shape[1], 1, param.shape[0]):
        return taps.squeeze(1).t().contiguous()
    return taps


class MirasLayer(nn.Module):
    """The Miras sequence layer (paper section 5.4); the memory itself is memory_core's."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, H, d, r = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.gate_rank
        self.H, self.d, self.r = H, d, r
        # one matmul for q, k, v, the output gate and the low-rank gate input
        self.in_proj = nn.Linear(C, 4 * C + r, bias=False)
        # depthwise causal conv taps, [K, 3C]: row j weighs the input K-1-j steps back. Channels contiguous, so
        # that compiled code reads a tap as a vector (Inductor's CPU code for nn.Conv1d's [3C, 1, K] layout is
        # scalar); the same function as nn.Conv1d(3C, 3C, K, groups=3C) with weight.squeeze(1).t()
        self.conv_weight = nn.Parameter(torch.empty(cfg.conv_size, 3 * C))
        self.objective = memory_core.resolve("objective", cfg.objective)
        self.retention = memory_core.resolve("retention", cfg.retention)
        self.gates = self._gate_specs()
        self.gate_proj = nn.Linear(r, len(self.gates) * H, bias=True)
        # learned initial fast weights per head: plain (l2), the accumulator A (lq), logits (kl)
        hidden = cfg.expansion * d
        shapes = [(H, hidden, d), (H, d, hidden)] if cfg.memory == "mlp" else [(H, d, d)]
        self.mem_init = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])
        self.mem_ln_weight = nn.Parameter(torch.ones(H, d))
        self.mem_ln_bias = nn.Parameter(torch.zeros(H, d))
        self.out_norm_weight = nn.Parameter(torch.ones(H, d))
        self.out_proj = nn.Linear(C, C, bias=False)
        self.mem_kwargs = dict(objective=cfg.objective, retention=cfg.retention, chunk_size=cfg.chunk_size,
                               p=cfg.p, q_norm=cfg.q_norm, sharpness=cfg.sharpness, eps=cfg.eps,
                               simplex_scale=cfg.simplex_scale or None, memory=cfg.memory,
                               normalize_step=cfg.step_norm if cfg.eta_gate == "normalized" else False,
                               link=cfg.lq_link if cfg.retention == "lq" else "printed")
        self.reset_special_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "conv_weight"
        if key in state_dict:
            state_dict[key] = conv_taps_in_layout(state_dict[key], self.conv_weight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _gate_specs(self):
        """eta, alpha (unless alpha_gate is off), the objective's own gates (Yaad: delta), mu (momentum)."""
        cfg = self.cfg
        if cfg.eta_gate == "normalized":
            gates = [Gate("eta", logit(cfg.eta_init / cfg.eta_max), partial(sigmoid_between, low=0.0, high=cfg.eta_max))]
        else:
            gates = [Gate("eta", inv_softplus(1.0), partial(scaled_softplus, scale=cfg.eta_base))]
        if cfg.alpha_gate:
            gates.append(Gate("alpha", logit((cfg.alpha_init - cfg.alpha_min) / (1 - cfg.alpha_min)),
                              partial(sigmoid_between, low=cfg.alpha_min, high=1.0)))
        gates += self.objective.gates(cfg, self.d)
        if cfg.momentum:
            gates.append(Gate("momentum", logit((cfg.mu_init - MU_MIN) / (MU_MAX - MU_MIN)),
                              partial(sigmoid_between, low=MU_MIN, high=MU_MAX)))
        return gates

    def new_cache(self, batch, max_len, device, dtype):
        return MirasCache()

    @torch.no_grad()
    def reset_special_parameters(self):
        """Inits that the generic nanoGPT init must not overwrite (called again by LM after it)."""
        cfg = self.cfg
        fan = self.conv_weight.shape[0]
        # drawn as nn.Conv1d's default init draws its [3C, 1, K] weight, then transposed
        taps = torch.empty(self.conv_weight.shape[::-1], device=self.conv_weight.device, dtype=self.conv_weight.dtype)
        self.conv_weight.copy_(nn.init.uniform_(taps, -1 / math.sqrt(fan), 1 / math.sqrt(fan)).t())
        self.gate_proj.bias.copy_(torch.tensor([g.init_bias for g in self.gates for _ in range(self.H)]))
        for w in self.mem_init:  # the learned initial state: plain weights, an accumulator, logits ...
            self.retention.init_fast_weights_(w, cfg)

    def initial_weights(self, batch):
        """The fast weights every sequence starts from (the retention's reading of mem_init), [B, ...]."""
        ws = [self.retention.initial_weights(w, self.cfg) for w in self.mem_init]
        return tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in ws)

    def _gates(self, u, dtype):
        """Every gate's value, [B, H, T] each; alpha is 1 without the alpha gate, absent gates are None."""
        B, T, _ = u.shape
        g = self.gate_proj(u).to(dtype).view(B, T, len(self.gates), self.H).permute(2, 0, 3, 1)
        out = dict(alpha=None, delta=None, momentum=None)
        out.update({gate.name: gate.activation(x) for gate, x in zip(self.gates, g.unbind(0))})
        if out["alpha"] is None:
            out["alpha"] = torch.ones_like(out["eta"])
        return out

    def _short_conv(self, x, prev):
        """Depthwise causal conv over time. x: [B, T, 3C]; prev: the K-1 inputs before x [B, K-1, 3C], or None
        (zeros).

        As K shifted multiply-adds along time, y_t = sum_j w_j x_{t-K+1+j}, not F.conv1d (the reference in the
        tests): compiled, they and their backward fuse with the elementwise ops around them, where a depthwise
        conv1d is a kernel of its own whose backward is slow on a CPU (results/bench/HISTORY.md)."""
        K, T = self.conv_weight.shape[0], x.shape[1]
        xp = F.pad(x, (0, 0, K - 1, 0)) if prev is None else torch.cat([prev.to(x.dtype), x], dim=1)
        w = self.conv_weight.to(x.dtype)  # [K, 3C]
        y = xp[:, :T] * w[0]
        for j in range(1, K):
            y = y + xp[:, j:j + T] * w[j]
        # the tail in its own storage: a view would keep all of xp alive in the cache (a whole prefill's inputs)
        # and reach a compiled decode step strided, to be copied on every token
        return y, xp[:, xp.shape[1] - (K - 1):].contiguous()

    def _memory_inputs(self, x, rope, conv_prev):
        """x -> (q, k, v [B, H, T, d], gates, output gate, conv tail): projections, short conv, silu, l2 norm."""
        B, T, C = x.shape
        H, d = self.H, self.d
        dt = self.mem_ln_weight.dtype  # float32 (float64 for a double model), also under autocast
        qkv, out_gate, u = self.in_proj(x).split([3 * C, C, self.r], dim=-1)
        h, conv_state = self._short_conv(qkv, conv_prev)
        q, k, v = F.silu(h).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).to(dt)  # each [B, H, T, d]
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        if self.cfg.use_rope:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # own storage for what outlives this function (u: in the gate projection's backward, for its weights'
        # gradient): views would keep the whole projection alive
        return q, k, v.contiguous(), self._gates(u.contiguous(), dt), out_gate.contiguous(), conv_state

    def forward(self, x, rope, cache=None, pos=None):
        B, T, C = x.shape
        H, d = self.H, self.d
        if cache is None and torch.is_grad_enabled() and self.cfg.recompute_inputs:
            # training: the backward recomputes the inputs (one projection matmul, the conv and elementwise ops)
            # instead of keeping their activations (the conv's padded input, 3C per token, compiled; eager autograd
            # also keeps the conv's output and the silu's)
            q, k, v, gates, out_gate, _ = torch.utils.checkpoint.checkpoint(self._memory_inputs, x, rope, None,
                                                                            use_reentrant=False)
        else:
            q, k, v, gates, out_gate, conv_state = self._memory_inputs(x, rope, None if cache is None else cache.conv)
        kw = dict(self.mem_kwargs, delta=gates["delta"], momentum=gates["momentum"])
        args = (self.mem_ln_weight, self.mem_ln_bias)
        compile_chunks = self.cfg.compile_memory
        if compile_chunks is None:  # compiled on CUDA and inside a whole-model compile; eager in an eager CPU model
            compile_chunks = q.is_cuda or torch.compiler.is_compiling()
        chunked = dict(check_values=False, compile_chunks=compile_chunks)
        if cache is None:  # training: plain tuple in, chunk-aligned from the first token
            y, _ = memory_core.miras_memory(q, k, v, gates["eta"], gates["alpha"], self.initial_weights(B),
                                            *args, **chunked, **kw)
        else:
            cache.conv = conv_state
            if cache.mem is None:
                cache.mem = memory_core.MemoryState.start(self.initial_weights(B), self.cfg.momentum,
                                                          self.cfg.retention, self.mem_kwargs["normalize_step"])
            if pos is None:  # prefill (or any block of tokens): exact continuation of the carried state
                y, cache.mem = memory_core.miras_memory(q, k, v, gates["eta"], gates["alpha"], cache.mem, *args,
                                                        **chunked, **kw)
            else:  # one decoding step
                kw = {n: (t[..., 0] if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
                y, cache.mem = memory_core.miras_memory_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], gates["eta"][..., 0],
                                                             gates["alpha"][..., 0], cache.mem, *args,
                                                             chunk_start=cache.chunk_start, **kw)
                y = y.unsqueeze(2)
        y = F.rms_norm(y.transpose(1, 2), (d,), eps=self.cfg.norm_eps) * self.out_norm_weight  # per-head norm
        act = F.silu if self.cfg.out_gate == "silu" else torch.sigmoid
        y = y.reshape(B, T, C).to(x.dtype) * act(out_gate).to(x.dtype)
        return self.out_proj(y)


# ----------------------------------------------------------------------------------------------
# Block and language model

def make_mixer(cfg, kind):
    """The sequence mixer named by one letter of layer_pattern: "M" the Miras layer of this config (its
    objective and retention), "A" causal attention, "S" sliding-window attention (the hybrids)."""
    if kind == "M":
        return MirasLayer(cfg)
    return Attention(cfg, cfg.window if kind == "S" else 0)


class Block(nn.Module):
    """x = x + mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg, mixer):
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.n_embd, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache=None, pos=None):
        x = x + self.drop(self.mixer(self.norm1(x), rope, cache, pos))
        return x + self.drop(self.mlp(self.norm2(x)))


def call_block(block, x, rope, cache=None, pos=None):
    """One block (what LM.compile_regions compiles once per kind of block)."""
    return block(x, rope, cache, pos)


def logits_and_loss(model, x, targets=None):
    """The final norm and the LM head on the last block's output x: (logits [B, T, vocab], mean cross-entropy
    (-1 ignored) when targets are given, else None)."""
    logits = model.lm_head(model.norm_f(x))
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    return logits, loss


class LM(nn.Module):
    """What every language model here shares: the token embedding, the final RMSNorm and the LM head tied
    to the embedding, RoPE angles, init, training forward, prefill / decode / generate, optimizer groups.
    A model file subclasses it, sets `config_class`, builds `self.blocks` and calls `init_weights()`."""
    config_class = LMConfig

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList()
        self.norm_f = RMSNorm(C, config.norm_eps)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        needs_rope = (config.attention_rope and ("A" in config.layers or "S" in config.layers)) or getattr(
            config, "use_rope", False)
        self.rotary = Rotary(config.head_dim, config.rope_theta) if needs_rope else None
        self.regions = None  # compile_regions: (a compiled call_block per block, the compiled logits_and_loss)

    @torch.no_grad()
    def init_weights(self):
        """nanoGPT's init (normal(0, init_std); residual projections scaled by 1/sqrt(2 n_layer)), then the
        Miras layers' own inits, which the generic one must not overwrite."""
        config = self.config
        self.apply(self._init_weights)
        resid_std = config.init_std / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, resid_std)
        for m in self.modules():
            if isinstance(m, MirasLayer):
                m.reset_special_parameters()

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)

    # --- training / scoring

    def _backbone(self, idx, cache=None, pos=None, run_block=None):
        T = idx.shape[1]
        x = self.drop(self.wte(idx))
        rope = None
        if self.rotary is not None:
            rope = self.rotary(pos.view(1) if pos is not None else torch.arange(T, device=idx.device))
        compiled = self.regions is not None and cache is None
        for i, block in enumerate(self.blocks):
            run = run_block or (self.regions[0][i] if compiled else call_block)
            x = run(block, x, rope, None if cache is None else cache.layers[i], pos)
        return x

    def forward(self, idx, targets=None):
        """idx [B, T] -> logits [B, T, vocab]; loss (mean cross-entropy, -1 ignored) when targets are given."""
        head = self.regions[1] if self.regions is not None else logits_and_loss
        return head(self, self._backbone(idx), targets)

    def compile_regions(self, **compile_kwargs):
        """torch.compile this model's forward region by region, in place: the blocks of each kind (a letter of
        config.layers) through one compiled call_block, and the final norm and LM head with the loss
        (logits_and_loss); the embedding stays eager, and so do prefill and decode (sample.make_step compiles its
        own step). Blocks of one kind share a graph (Dynamo traces the block's code once, its weights are graph
        inputs), so the compile time does not grow with the depth, as that of torch.compile(model) does, whose one
        graph unrolls every block. Each kind of block of each model, and its head, gets its own copy of the
        function's code: Dynamo's recompile limit (8) counts graphs per code object, and a kind needs a few
        (training, evaluation, a new batch size). train.py's and bench.py's --compile; compile_kwargs go to
        torch.compile (mode, backend, ...). Returns the model."""
        kinds = {kind: torch.compile(memory_core.with_own_code(call_block, kind), **compile_kwargs)
                 for kind in set(self.config.layers)}
        head = torch.compile(memory_core.with_own_code(logits_and_loss, "head"), **compile_kwargs)
        self.regions = (tuple(kinds[kind] for kind in self.config.layers), head)
        return self

    # --- inference

    def init_cache(self, batch_size, max_len, device=None, dtype=None):
        """An empty cache. max_len bounds full-attention KV caches only (Miras state is O(1))."""
        p = self.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype
        layers = [b.mixer.new_cache(batch_size, max_len, device, dtype) for b in self.blocks]
        return Cache(layers, device)

    @torch.no_grad()
    def prefill(self, idx, cache):
        """Parallel (chunked) pass over a prompt into an empty cache: (logits [B, T, vocab], cache)."""
        if cache.started:
            raise ValueError("prefill needs a fresh cache (init_cache); continue with forward_step")
        cache.started = True
        logits, _ = logits_and_loss(self, self._backbone(idx, cache))
        cache.pos = cache.pos + idx.shape[1]
        return logits, cache

    @torch.no_grad()
    def forward_step(self, idx, cache, run_block=None):
        """One token per sequence, idx [B, 1]: (logits [B, 1, vocab], cache), the cache updated in place.
        Static shapes and the position as a tensor, so one compiled graph serves every step. run_block: what
        runs each block (default call_block; sample.make_step's compiled step passes its own)."""
        cache.started = True
        logits, _ = logits_and_loss(self, self._backbone(idx, cache, cache.pos, run_block))
        cache.pos = cache.pos + 1
        return logits, cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, generator=None):
        """Prefill the prompt in parallel, then decode recurrently; every token is drawn by sample_next
        (temperature 0 or top_k 1: greedy; top_k None: no top-k filter)."""
        if max_new_tokens <= 0:
            return idx
        cache = self.init_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
        logits = self.prefill(idx, cache)[0][:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k or 0, top_p, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if i < max_new_tokens - 1:
                logits = self.forward_step(nxt, cache)[0][:, -1]
        return idx

    # --- bookkeeping

    def num_params(self, non_embedding=True):
        """Parameter count; the tied embedding / LM head is counted once, or not at all (non_embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len, training=True):
        """FLOPs per token of a forward (+ backward: x3) pass at context seq_len (nanoGPT / PaLM convention:
        2 per matmul weight, attention scores over the full context, not halved for causality). The memory's
        count follows memory_core's chunked dual form (b x b blocks per chunk, per-layer weight matmuls)."""
        cfg, C = self.config, self.config.n_embd
        f = 2 * C * cfg.vocab_size  # LM head
        for block in self.blocks:
            m = block.mixer
            f += 2 * sum(p.numel() for p in block.mlp.parameters())
            if isinstance(m, MirasLayer):
                f += 2 * sum(p.numel() for p in (m.in_proj.weight, m.out_proj.weight, m.gate_proj.weight,
                                                 m.conv_weight))
                f += cfg.n_head * memory_flops(cfg, min(seq_len, cfg.chunk_size))
            else:
                ctx = min(seq_len, m.window) if m.window else seq_len
                f += 2 * (m.qkv.weight.numel() + m.out_proj.weight.numel()) + 2 * 2 * C * ctx  # + q k^T, att v
        return 3 * f if training else f

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu", eps=1e-8):
        """AdamW; weight decay on Linear / Embedding weights only (not norms, gates' biases, conv, the
        initial fast weights). Fused on CUDA."""
        decay_ids = {id(m.weight) for m in self.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        params = {id(p): p for p in self.parameters() if p.requires_grad}
        decay = [p for i, p in params.items() if i in decay_ids]
        no_decay = [p for i, p in params.items() if i not in decay_ids]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        extra = dict(fused=True) if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **extra)

    def load_optimizer_state(self, optimizer, state_dict):
        """optimizer.load_state_dict, with the moments of a Miras layer's conv taps saved in the older layout
        brought to the parameter's (conv_taps_in_layout)."""
        optimizer.load_state_dict(state_dict)
        for m in self.modules():
            if isinstance(m, MirasLayer) and m.conv_weight in optimizer.state:
                state = optimizer.state[m.conv_weight]
                for key, value in state.items():
                    state[key] = conv_taps_in_layout(value, m.conv_weight)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Accepts state dicts of compiled (`_orig_mod.`) and DDP (`module.`) wrappers too."""
        clean = {}
        for key, value in state_dict.items():
            for prefix in ("_orig_mod.", "module."):
                while key.startswith(prefix):
                    key = key[len(prefix):]
            clean[key] = value
        return super().load_state_dict(clean, strict=strict, assign=assign)


def is_greedy(temperature, top_k):
    return temperature == 0 or top_k == 1


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy (argmax) when temperature == 0 or top_k == 1, else temperature, top-k,
    top-p, then a Gumbel-max draw from uniform noise; ids >= vocab_limit never come. The noise is drawn outside
    (with the caller's generator) and `pick` has no generator and no host sync, so a decode step and its draw
    compile into one graph (sample.make_step)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    vocab_limit: Optional[int] = None

    @property
    def greedy(self):
        return is_greedy(self.temperature, self.top_k)

    def draws_like(self, other):
        """True when both draw the same way (every greedy setting with one vocab_limit is the same)."""
        if self.greedy or other.greedy:
            return self.greedy and other.greedy and self.vocab_limit == other.vocab_limit
        return self == other

    def noise(self, shape, device, generator=None):
        """Uniform noise in [0, 1) of the logits' shape [B, V] for pick (None when greedy)."""
        return None if self.greedy else torch.rand(shape, generator=generator, device=device)

    def pick(self, logits, noise):
        """Next token ids [B, 1] from last-position logits [B, V]. argmax(log p + G), G = -log(-log u), draws
        from p exactly (the Gumbel-max trick), p the filtered softmax (u = 0 gives G = -inf: never drawn)."""
        logits = logits.float()
        V = logits.shape[-1]
        if self.vocab_limit is not None and self.vocab_limit < V:
            logits = logits.masked_fill(torch.arange(V, device=logits.device) >= self.vocab_limit, -float("inf"))
        if self.greedy:
            return logits.argmax(-1, keepdim=True)
        logits = logits / self.temperature
        if self.top_k and self.top_k < V:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(F.softmax(logits, dim=-1), dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens: keep while it is < top_p
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, -float("inf"))
        return (logits - torch.log(-torch.log(noise))).argmax(-1, keepdim=True)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, vocab_limit=None):
    """Next token ids [B, 1] from last-position logits [B, V] (Sampling: greedy when temperature == 0 or
    top_k == 1, else temperature, top-k, top-p, then a draw with `generator`). The one sampler: LM.generate,
    sample.py and its compiled decode step all draw with Sampling.pick."""
    how = Sampling(temperature, top_k, top_p, vocab_limit)
    return how.pick(logits, how.noise(logits.shape, logits.device, generator))


def memory_flops(cfg, b):
    """Forward FLOPs per token and head of memory_core's chunked memory with chunk length b
    (memory_core.chunk_flops)."""
    return memory_core.chunk_flops(cfg.head_dim, cfg.expansion, cfg.memory, cfg.momentum, b)
