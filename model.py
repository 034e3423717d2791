"""The transformer, written out: Llama (2, 3, 3.1/3.2, Mistral, SmolLM2, TinyLlama) and GPT-2.

Module names follow Hugging Face (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`), so
safetensors checkpoints load with no renaming and LoRA adapters are PEFT-compatible. Every linear layer
of the blocks comes from `quant.make_linear`: an `nn.Linear`, or a bitsandbytes 4-bit layer for QLoRA.
Shapes: B batch, T new tokens, S cached + new tokens, C model width, nh / nkv query / key-value heads,
hs head size.
"""
import ctypes
import json
import math
import os
import pickle
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import UserError
from quant import make_linear


@dataclass
class Config:
    arch: str = "llama"         # "llama": RMSNorm, RoPE, SwiGLU; "gpt2": LayerNorm, learned positions, GELU
    vocab_size: int = 32000
    dim: int = 4096             # model width C
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0         # 0: n_heads; fewer: grouped-query attention, a smaller KV cache
    head_dim: int = 0           # 0: dim // n_heads; some configs give it explicitly
    hidden_dim: int = 11008     # MLP width
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    # Llama 3.1+: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE
    rope_scaling: dict = None
    tie_embeddings: bool = False  # LM head shares the embedding matrix (SmolLM2, Llama 3.2 1B/3B, GPT-2)
    attn_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_hf(cls, path):
        """Build the config from a Hugging Face `config.json` (a directory or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise UserError(f"{file}: not found (a model directory needs config.json)")
        try:
            with open(file, encoding="utf-8") as f:
                hf = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{file}: not valid JSON ({err})") from None
        kind = hf.get("model_type")
        try:
            if kind == "gpt2":
                return cls(arch="gpt2", vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"],
                           n_heads=hf["n_head"], n_kv_heads=hf["n_head"],
                           hidden_dim=hf.get("n_inner") or 4 * hf["n_embd"],
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_seq_len=hf.get("n_positions", 1024),
                           tie_embeddings=hf.get("tie_word_embeddings", True), attn_bias=True, mlp_bias=True)
            if kind in ("llama", "mistral"):
                # transformers 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`
                rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
                scaling = rope if rope.get("rope_type", rope.get("type")) == "llama3" else None
                if rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3"):
                    raise UserError(f"{file}: RoPE scaling {rope.get('rope_type')!r} is not supported")
                return cls(arch="llama", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
                           n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                           n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                           head_dim=hf.get("head_dim") or 0, hidden_dim=hf["intermediate_size"],
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           max_seq_len=hf.get("max_position_embeddings", 4096),
                           rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                           rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                           attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False))
        except KeyError as err:
            raise UserError(f"{file}: missing field {err}") from None
        raise UserError(f"{file}: unsupported architecture {kind!r} (supported: llama, mistral, gpt2)")

    @classmethod
    def preset(cls, name):
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def n_params(self):
        """Parameter count, from the shapes alone (for planning memory without weights)."""
        C, hs, H = self.dim, self.head_dim, self.hidden_dim
        attn = C * hs * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = (3 if self.arch == "llama" else 2) * C * H
        norms = 2 * C if self.arch == "llama" else 4 * C            # LayerNorm has a bias too
        biases = ((self.n_heads + 2 * self.n_kv_heads) * hs + C) * self.attn_bias + \
            ((2 if self.arch == "llama" else 1) * H + C) * self.mlp_bias
        embed = self.vocab_size * C * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * C if self.arch == "gpt2" else 0
        final_norm = C if self.arch == "llama" else 2 * C
        return self.n_layers * (attn + mlp + norms + biases) + embed + pos + final_norm


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
PRESETS = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, max_seq_len=4096),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       max_seq_len=8192, rope_theta=500000.0),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                         max_seq_len=131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                         max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=32768,
                       rope_theta=1000000.0),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    "smollm2-1.7b": dict(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192,
                         max_seq_len=8192, rope_theta=130000.0, tie_embeddings=True),
    "gpt2": dict(arch="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 hidden_dim=3072, max_seq_len=1024, tie_embeddings=True, attn_bias=True, mlp_bias=True),
}


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the gain, as the reference does (matters in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg, device=None):
    """The hs/2 rotation frequencies theta^(-2i/hs), with Llama 3.1's long-context rescaling if configured."""
    hs = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float) / hs))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    # Llama 3.1: wavelengths longer than the pre-training context are stretched by `factor`, short ones
    # kept, and the band in between interpolated smoothly.
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    scaled = torch.where(wavelen > old_len / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= old_len / s["high_freq_factor"]) & (wavelen <= old_len / s["low_freq_factor"])
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """cos and sin of shape (B, T, hs) for integer positions (B, T), computed in fp32."""
    freqs = positions[..., None].float() * inv_freq             # (B, T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)                  # (B, T, hs): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hs/2}) by the position's angle: the rotate-half convention of HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]            # cos (B, 1, T, hs) broadcasts over heads


def attend(q, k, v, cache, layer, mask):
    """Causal attention of q (B, nh, T, hs) over k, v (B, nkv, T, hs), through the KV cache if given."""
    if cache is not None:
        k, v = cache.update(layer, k, v)                        # (B, nkv, S, hs)
    # With no cache and no padding the causal mask is implicit, which lets SDPA use its fused kernels.
    causal = mask is None
    # enable_gqa: each of the nkv key/value heads serves nh/nkv query heads without copying them.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


class LlamaAttention(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        C, hs = cfg.dim, cfg.head_dim
        self.nh, self.nkv, self.hs = cfg.n_heads, cfg.n_kv_heads, hs
        self.q_proj = linear(C, self.nh * hs, bias=cfg.attn_bias)
        self.k_proj = linear(C, self.nkv * hs, bias=cfg.attn_bias)
        self.v_proj = linear(C, self.nkv * hs, bias=cfg.attn_bias)
        self.o_proj = linear(self.nh * hs, C, bias=cfg.attn_bias)

    def forward(self, x, rope, cache, layer, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)    # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)   # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)   # (B, nkv, T, hs)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attend(q, k, v, cache, layer, mask)                              # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.gate_proj = linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))     # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, linear)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg, linear)

    def forward(self, x, rope, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT2Attention(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.nh, self.hs = cfg.n_heads, cfg.head_dim
        self.c_attn = linear(cfg.dim, 3 * cfg.dim, bias=True)   # q, k, v fused
        self.c_proj = linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x, rope, cache, layer, mask):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.nh, self.hs).transpose(1, 2)              # (B, nh, T, hs) each
                   for t in self.c_attn(x).split(C, dim=-1))
        y = attend(q, k, v, cache, layer, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.c_fc = linear(cfg.dim, cfg.hidden_dim, bias=True)
        self.c_proj = linear(cfg.hidden_dim, cfg.dim, bias=True)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))         # GPT-2's "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg, linear):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, linear)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, linear)

    def forward(self, x, rope, cache, layer, mask):
        x = x + self.attn(self.ln_1(x), rope, cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab). `linear(in, out, bias=...)` builds the block linears."""

    def __init__(self, cfg, linear=make_linear):
        super().__init__()
        self.config = cfg
        self.grad_checkpointing = False   # recompute each block in backward: less activation memory
        if cfg.arch == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.dim), wpe=nn.Embedding(cfg.max_seq_len, cfg.dim),
                h=nn.ModuleList(GPT2Block(cfg, linear) for _ in range(cfg.n_layers)),
                ln_f=nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)))
            self.embed, self.blocks, self.final_norm = (self.transformer.wte, self.transformer.h,
                                                        self.transformer.ln_f)
        else:
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
                layers=nn.ModuleList(LlamaBlock(cfg, linear) for _ in range(cfg.n_layers)),
                norm=RMSNorm(cfg.dim, cfg.norm_eps)))
            self.embed, self.blocks, self.final_norm = (self.model.embed_tokens, self.model.layers,
                                                        self.model.norm)
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # The LM head stays in full precision (as in QLoRA): it is small next to the blocks and sensitive.
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx, cache=None, return_hidden=False):
        """Logits (B, T, V), or the final hidden states (B, T, C) so a caller can apply the head in chunks.

        With a `cache`, idx holds the T tokens that follow those cached, and padding comes from the cache.
        """
        B, T = idx.shape
        if cache is None:
            positions, mask = torch.arange(T, device=idx.device).expand(B, T), None
        else:
            positions, mask = cache.positions_and_mask(T)
        x = self.embed(idx)                                                   # (B, T, C)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(positions)
        else:
            rope = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, cache, layer, mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, layer, mask)
        if cache is not None:
            cache.advance(T)
        x = self.final_norm(x)
        return x if return_hidden else self.lm_head(x)


# ----------------------------------------------------------------------------- loading

def checkpoint_files(path):
    """The safetensors files of a model directory: one file, or the shards its index lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise UserError(f"{index}: not a valid safetensors index ({err})") from None
        files = [os.path.join(path, s) for s in shards]
        for file in files:
            if not os.path.isfile(file):
                raise UserError(f"{file}: shard listed in {os.path.basename(index)} is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return [os.path.join(path, "pytorch_model.bin")]
    raise UserError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")


def _read_tensors(file):
    """Yield (name, tensor) one at a time, so only one full-precision tensor is in memory."""
    if file.endswith(".bin"):
        import warnings
        warnings.warn(f"{file}: a pickle checkpoint; loading with weights_only=True (prefer safetensors)")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:  # weights_only met an object that is not a tensor: code could run
            reason = next((line for line in str(err).splitlines() if "GLOBAL" in line), "not a state dict")
            raise UserError(f"{file}: refused: it holds more than tensors ({reason.strip()})") from None
        except (RuntimeError, OSError, EOFError) as err:  # truncated, or not a torch.save zip file
            raise UserError(f"{file}: unreadable pickle checkpoint ({str(err).splitlines()[0]})") from None
        if not isinstance(state, dict):
            raise UserError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
        yield from state.items()
        return
    # Plain reads, not safetensors' memory map: every mapped page read stays in the process's resident
    # memory until the file closes, which made loading SmolLM2 (one 270 MB file) peak 214 MiB higher.
    # The format is an 8-byte header length, a JSON header of {name: dtype, shape, data_offsets}, the data.
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if 8 + n > size:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            entries = sorted((info["data_offsets"], name, SAFETENSORS_DTYPES[info["dtype"]], info["shape"])
                             for name, info in header.items())
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise UserError(f"{file}: unreadable safetensors file (bad header: {err!r})") from None
        for (begin, end), name, dtype, shape in entries:
            tensor = torch.empty(shape, dtype=dtype)
            if end - begin != tensor.nbytes or 8 + n + end > size:
                raise UserError(f"{file}: unreadable safetensors file (tensor {name!r} is truncated or mis-sized)")
            f.seek(8 + n + begin)
            f.readinto(tensor.view(-1).view(torch.uint8).numpy())
            yield name, tensor
            _release_freed_memory()


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _release_freed_memory():
    """Return freed heap pages to the OS (glibc). Each full-precision tensor is freed after quantization,
    but the holes it leaves between the kept 4-bit tensors stayed resident: loading SmolLM2 grew the heap
    by 120 to 370 MiB from run to run, by 109 MiB (the 4-bit model) with this. A no-op without glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


_LIBC = ctypes.CDLL(None) if os.name == "posix" else None


def hf_name(name, cfg):
    """Our parameter name for a checkpoint key (None to skip), and whether the tensor needs transposing."""
    if cfg.arch == "gpt2":
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None, False                      # causal-mask buffers of old GPT-2 checkpoints
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name            # the original hub checkpoint has no prefix
        # GPT-2 stores its linears as Conv1D, weight (in, out): ours are nn.Linear, weight (out, in).
        conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        return name, conv1d
    if name.endswith("rotary_emb.inv_freq"):
        return None, False
    return name, False


def load_model(path, *, quantize=None, device="cpu", dtype=torch.float32, double_quant=True):
    """Load a Hugging Face checkpoint directory, quantizing block linears to 4 bits if `quantize` is set.

    The model is built on the meta device (no memory) and each tensor is streamed in, cast, moved, and
    quantized as it arrives, so peak memory stays near the quantized model plus one tensor.
    """
    from quant import set_linear_weight
    cfg = Config.from_hf(path)
    files = checkpoint_files(path)

    def linear(n_in, n_out, bias):
        return make_linear(n_in, n_out, bias=bias, quantize=quantize, compute_dtype=dtype,
                           double_quant=double_quant)

    with torch.device("meta"):
        model = Transformer(cfg, linear)
    expected = dict(model.named_parameters())    # tied head appears once, under the embedding's name
    modules = dict(model.named_modules())
    loaded = set()
    for file in files:
        for key, tensor in _read_tensors(file):
            name, transpose = hf_name(key, cfg)
            if name is None or (cfg.tie_embeddings and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise UserError(f"{file}: unexpected tensor {key!r} for a {cfg.arch} model")
            if transpose:
                tensor = tensor.t()
            owner_name, attr = name.rsplit(".", 1)
            owner = modules[owner_name]
            is_linear_weight = isinstance(owner, nn.Linear) and attr == "weight"  # Linear4bit included
            want = (owner.out_features, owner.in_features) if is_linear_weight else tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise UserError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                f"the config expects {want}")
            if is_linear_weight:
                set_linear_weight(owner, tensor, device=device, dtype=dtype)
            else:
                setattr(owner, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if cfg.arch != "gpt2":
        model.inv_freq = rope_inv_freq(cfg, device=device)
    return model.eval()
