"""4-bit quantization: NF4 / FP4 written out, and the linear-layer factory the model is built from.

QLoRA (Dettmers et al., 2023) stores each frozen linear weight in 4 bits (NF4 or FP4) in blocks of
64 values that share one absmax scale, and with double quantization stores those scales in 8 bits.
bitsandbytes' `Linear4bit` holds the packed weight and dequantizes it on the fly in its matmul; the
reference functions below produce the same bytes as its CPU `quantize_4bit` (tests/test_quant.py).
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# On an AVX512-BF16 CPU bitsandbytes warns at import that the optional `kernels` package (a hub download)
# is missing; it only serves the eval-mode kernel that make_linear turns off, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # values per absmax block, as in the QLoRA paper and bitsandbytes' default
ABSMAX_BLOCKSIZE = 256  # double quantization: absmax values per second-level fp32 scale


def nf4_code(offset=0.9677083):
    """The 16 NF4 values, sorted: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.

    8 positive and 7 negative quantiles (an asymmetric type) so that 0 is representable. `offset`, the
    outermost probability, is the mean of 1 - 1/(2*15) and 1 - 1/(2*16): the end points a 15- and a
    16-level quantile grid would use, since ndtri(1) is infinite. It puts +-1 at 1.85 standard deviations.
    """
    # bitsandbytes computes the probabilities in fp32 and the quantiles in fp64 (scipy); so do we.
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()


def fp4_code():
    """The 16 FP4 values indexed by their bits `s e e m` (sign, 2-bit exponent, 1-bit mantissa).

    bitsandbytes' definition: exponent e > 0 means (1 + m/2) * 2^(4 - e), so e=1 is the largest
    (8, 12) and e=3 the smallest (2, 3); e=0 is subnormal, m/16. Scaled by 1/12 to [-1, 1].
    """
    values = []
    for bits in range(16):
        s, e, m = bits >> 3, (bits >> 1) & 3, bits & 1
        magnitude = (1 + m / 2) * 2 ** (4 - e) if e else m / 16
        values.append(-magnitude if s else magnitude)
    return torch.tensor(values) / 12


def dynamic_map():
    """bitsandbytes' signed 8-bit "dynamic" map used for the absmax codes: 0, 1 and 254 values
    +-10^-k * (midpoints of a linear grid on [0.1, 1]), with 2^(6-k) grid steps for k = 0..6."""
    values = [0.0, 1.0]
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2**i + 1)
        mids = 10 ** (i - 6) * (grid[:-1] + grid[1:]) / 2
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values))


@dataclass
class State4bit:
    """What dequantization needs besides the packed codes (the fields of bitsandbytes' QuantState)."""
    shape: torch.Size
    dtype: torch.dtype  # dtype of the quantized tensor, restored by dequantization
    quant_type: str
    blocksize: int
    absmax: torch.Tensor  # (nblocks,) fp32 block scales, or with double quantization their uint8 codes
    offset: torch.Tensor | None = None  # () fp32 mean of the scales, subtracted before 8-bit coding
    absmax2: torch.Tensor | None = None  # (ceil(nblocks / 256),) fp32 scales of the uint8 codes


def _blocks(x, blocksize):
    """(numel,) -> (nblocks, blocksize), zero-padding a last partial block."""
    return F.pad(x.flatten(), (0, -x.numel() % blocksize)).view(-1, blocksize)


def _quantize_8bit(x, code, blocksize=ABSMAX_BLOCKSIZE):
    """bitsandbytes' CPU blockwise 8-bit quantizer: (numel,) uint8 codes and (nblocks,) fp32 absmax."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * torch.where(absmax > 0, 1 / absmax, 0)[:, None]).clamp(-1, 1)
    # The CPU kernel does not search the code for each value: it rounds the value to one of 65536 grid
    # points on [-1, 1] and reads the code nearest that point from a table. Near a midpoint between two
    # codes this can differ from the exact nearest code; we follow it to produce the same bytes.
    grid = -1 + 2 * torch.arange(65536, dtype=torch.float32) / 65535
    nearest = torch.bucketize(grid, (code[:-1] + code[1:]) / 2)  # a tie goes to the lower code
    q = nearest[((scaled + 1) * 0.5 * 65535 + 0.5).long()]
    q[absmax == 0] = 0  # bitsandbytes stores code 0 for a block of zeros
    return q.flatten()[: x.numel()].to(torch.uint8), absmax


def quantize_4bit_reference(w, quant_type="nf4", blocksize=BLOCKSIZE, double_quant=True):
    """bitsandbytes' `quantize_4bit` on the CPU, written out: (packed uint8 (ceil(numel/2), 1), State4bit)."""
    code = nf4_code() if quant_type == "nf4" else fp4_code()  # (16,) value of each 4-bit code
    values, codes = code.sort(stable=True)  # FP4's +0 (code 0) sorts before -0 (code 8), as in bnb
    n = w.numel()
    blocks = _blocks(w.float(), blocksize)  # (nblocks, blocksize): the weight read row-major
    absmax = blocks.abs().amax(dim=1)  # (nblocks,) fp32, one scale per block
    scale = absmax.clamp(min=1e-38)  # a block of zeros quantizes to the code of 0
    scaled = (blocks * (1 / scale)[:, None]).clamp(-1, 1)
    if n % blocksize:  # bitsandbytes divides in a last partial block instead of using the reciprocal
        scaled[-1] = (blocks[-1] / scale[-1]).clamp(-1, 1)
    # Nearest code: count the midpoints between sorted codes strictly below the value (a tie -> lower).
    q = codes[torch.bucketize(scaled.flatten(), (values[:-1] + values[1:]) / 2)]
    q = q[: n + n % 2].to(torch.uint8)  # an odd numel is padded with one code of 0
    # Two codes per byte, the first element in the high nibble. Worked example, NF4, one block whose
    # absmax is 2.0: w = [1.0, -2.0, 0.5, 0.0, ...] -> scaled [0.5, -1.0, 0.25, 0.0] -> nearest codes
    # [12 (0.4407), 0 (-1.0), 10 (0.2461), 7 (0.0)] -> bytes [12 << 4 | 0, 10 << 4 | 7] = [0xC0, 0xA7],
    # which dequantize to [0.8814, -2.0, 0.4922, 0.0].
    packed = (q[0::2] << 4 | q[1::2]).view(-1, 1)
    state = State4bit(w.shape, w.dtype, quant_type, blocksize, absmax)
    if double_quant:
        # The scales are positive with a mean far from 0: centring them first spends the 8-bit code
        # (symmetric around 0) on their spread. 8 + 32/256 bits per block instead of 32.
        state.offset = absmax.mean()
        state.absmax, state.absmax2 = _quantize_8bit(absmax - state.offset, dynamic_map())
    return packed, state


def dequantize_4bit_reference(packed, state, dtype=None):
    """The tensor `packed` encodes, in `dtype` (default: the dtype it was quantized from)."""
    absmax = state.absmax  # (nblocks,)
    if state.offset is not None:
        codes = dynamic_map().to(absmax.device)[absmax.long()]
        absmax = (_blocks(codes, ABSMAX_BLOCKSIZE) * state.absmax2[:, None]).flatten()[: absmax.numel()]
        absmax = absmax + state.offset
    code = (nf4_code() if state.quant_type == "nf4" else fp4_code()).to(packed.device)
    q = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], dim=1)  # (nbytes, 2): high nibble first
    values = _blocks(code[q.long()], state.blocksize) * absmax[:, None]  # fp32, rounded once to `dtype`
    return values.flatten()[: state.shape.numel()].view(state.shape).to(dtype or state.dtype)


class _Matmul4bit(torch.autograd.Function):
    """x @ W^T with W dequantized in the forward and again in the backward: never kept in full."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x @ dequantize_4bit_reference(weight.data, _state(weight), x.dtype).t()

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out) -> (..., in); the frozen weight gets none
        return grad @ dequantize_4bit_reference(ctx.weight.data, _state(ctx.weight), grad.dtype), None


class Linear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit, multiplying with the reference dequantization where its CPU kernel is wrong.

    bitsandbytes 0.50.2's AVX512 CPU dequantization reads the scale of (row, col) at
    absmax[row * (in // blocksize) + col // blocksize], which is the right block only when every row
    holds whole blocks; it takes that path whenever in % 16 == 0, so a layer with in_features 32, 48 or
    96 gets wrong scales (outputs off by tens of percent) in its forward and backward.
    """

    def forward(self, x):
        if x.device.type != "cpu" or self.in_features % self.weight.blocksize == 0:
            return super().forward(x)
        h = _Matmul4bit.apply(x.to(self.compute_dtype), self.weight)  # (..., out)
        if self.bias is not None:
            h = h + self.bias.to(h.dtype)
        return h.to(x.dtype)


def make_linear(in_features, out_features, *, bias, quantize=None, compute_dtype=torch.float32,
                double_quant=True):
    """An `nn.Linear`, or a 4-bit `Linear4bit` (a bnb.nn.Linear4bit) when `quantize` is "nf4" / "fp4".

    Built on whatever device is current (the loader uses "meta"); `set_linear_weight` fills it.
    """
    if quantize is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {quantize!r}")
    layer = Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                       compress_statistics=double_quant, quant_type=quantize)
    # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place on the first no-grad
    # eval-mode forward, for a kernel that rejects shapes (in % 64, out % 32) and whose output has no
    # gradient path afterwards, so adapters below it would silently train on a wrong gradient.
    # Turning the repack off keeps the dequantize-and-matmul path, correct for every shape.
    layer.support_avx512bf16_for_cpu = False
    return layer


def is_4bit(module):
    return isinstance(module, bnb.nn.Linear4bit)


def set_linear_weight(layer, weight, *, device, dtype):
    """Give `layer` its weight (out, in): quantized to 4 bits on `device` for a Linear4bit."""
    if is_4bit(layer):
        # Params4bit quantizes when moved to a device: the full-precision copy is freed right after.
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False,
                                         quant_type=layer.weight.quant_type, blocksize=BLOCKSIZE,
                                         compress_statistics=layer.weight.compress_statistics,
                                         module=layer).to(device)
    else:
        layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)


def _state(weight):
    """The State4bit of a quantized bnb Params4bit."""
    qs = weight.quant_state
    return State4bit(qs.shape, qs.dtype, qs.quant_type, qs.blocksize, qs.absmax, qs.offset,
                     qs.state2.absmax if qs.nested else None)


def dequantize_weight(layer):
    """The (out, in) full-precision weight of a linear layer, dequantized if it is 4-bit."""
    if is_4bit(layer):
        return dequantize_4bit_reference(layer.weight.data, _state(layer.weight))
    return layer.weight.data


def memory_report(model):
    """Bytes held by `model`: 4-bit weights with their per-block statistics, everything else, and the
    size it would have with every parameter in bf16 (buffers as they are)."""
    weights = [m.weight for m in model.modules() if is_4bit(m)]
    states = [_state(w) for w in weights]
    quantized_params = sum(s.shape.numel() for s in states)  # values held (out * in), two per byte
    quantized_bytes = sum(w.nbytes for w in weights)
    # absmax (+ offset and second-level scales); bnb's fixed code tables (16 and 256 floats per layer) are
    # left out, as in the paper's bits-per-parameter
    state_bytes = sum(s.absmax.nbytes + (s.offset.nbytes + s.absmax2.nbytes if s.offset is not None else 0)
                      for s in states)
    others = [p for p in model.parameters() if all(p is not w for w in weights)]  # tied weights once
    buffer_bytes = sum(b.nbytes for b in model.buffers())
    other_bytes = sum(p.nbytes for p in others) + buffer_bytes
    return {
        "quantized_params": quantized_params,
        "quantized_weight_bytes": quantized_bytes,
        "quant_state_bytes": state_bytes,
        "other_bytes": other_bytes,
        "total_bytes": quantized_bytes + state_bytes + other_bytes,
        "bf16_bytes": 2 * (quantized_params + sum(p.numel() for p in others)) + buffer_bytes,
        "bits_per_param": 8 * (quantized_bytes + state_bytes) / quantized_params if weights else None,
    }


def format_memory_report(r):
    mib = 2**20
    line = f"memory {r['total_bytes'] / mib:.2f} MiB (all-bf16 model: {r['bf16_bytes'] / mib:.2f} MiB)"
    if r["bits_per_param"] is not None:
        line += (f"; 4-bit weights {(r['quantized_weight_bytes'] + r['quant_state_bytes']) / mib:.2f} MiB for "
                 f"{r['quantized_params']:,} params ({r['bits_per_param']:.3f} bits/param)")
    return line


# ----------------------------------------------------------------------------- planning memory

def _block_linears(cfg):
    """One block's linears as (name, in, out), grouped by the activation they read."""
    C, H, q, kv = cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if cfg.arch == "gpt2":
        return [[("attn.c_attn", C, 3 * C)], [("attn.c_proj", C, C)], [("mlp.c_fc", C, H)], [("mlp.c_proj", H, C)]]
    return [[("q_proj", C, q), ("k_proj", C, kv), ("v_proj", C, kv)], [("o_proj", q, C)],
            [("gate_proj", C, H), ("up_proj", C, H)], [("down_proj", H, C)]]


def activation_bytes_per_token(cfg, *, rank, targets, dtype, dropout, device="cuda"):
    """Bytes autograd keeps for backward, per token of one block (tests/test_memory.py counts them)."""
    d, C, H = torch.finfo(dtype).bits // 8, cfg.dim, cfg.hidden_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # dropout's keep-mask and LayerNorm's statistics: bool and fp32 on CUDA, the input's dtype on a CPU
    mask, stat = (1, 4) if device == "cuda" else (d, d)
    if cfg.arch == "gpt2":   # LayerNorm keeps its input, mean and rstd; attention q, k, v, output; GELU its input
        total = 2 * (d * C + 2 * stat) + d * 4 * C + 4 * cfg.n_heads + d * H
    else:                    # RMSNorm keeps an fp32 copy; attention q, k, v, output + fp32 logsumexp; SwiGLU 3
        total = 2 * (4 * C + 4) + d * (2 * q + 2 * kv) + 4 * cfg.n_heads + 3 * d * H
    for g, group in enumerate(_block_linears(cfg)):
        n = sum(targets == "all-linear" or any(("." + name).endswith("." + t) for t in targets)
                for name, _, _ in group)
        width = group[0][1]
        if dropout:
            total += n * (mask + d) * width      # each adapter's dropout keeps its mask and its output
        elif n and g != 1:
            total += d * width                   # the shared input, for A's gradient (o_proj's is the attention output)
        total += n * d * rank                    # x A^T, for B's gradient
    return total


def estimate_memory(cfg, *, quantize, rank, targets, batch_size, max_seq_len, dtype, grad_checkpointing,
                    dropout=0.05, double_quant=True, answer_tokens=32, device="cuda"):
    """Peak bytes of a QLoRA training step, from the config alone (no weights), as a dict of parts.

    Assumes every sequence padded to max_seq_len, `answer_tokens` supervised tokens per example, AdamW
    in fp32 and fused attention (no T x T matrix). Counts tensors, not the CUDA context (~0.5 GB more).
    """
    d = torch.finfo(dtype).bits // 8
    linears = [lin for group in _block_linears(cfg) for lin in group]
    n_block = cfg.n_layers * sum(i * o for _, i, o in linears)
    if quantize:   # 4 bits per value + one absmax per 64 values: 8 bits (+ fp32 per 256 absmax) or fp32
        weights = n_block / 2 + n_block / BLOCKSIZE * ((1 + 4 / ABSMAX_BLOCKSIZE) if double_quant else 4)
    else:
        weights = n_block * d
    weights += (cfg.n_params() - n_block) * d                 # embedding, LM head, norms, biases in `dtype`
    chosen = [(i, o) for name, i, o in linears
              if targets == "all-linear" or any(("." + name).endswith("." + t) for t in targets)]
    lora_params = cfg.n_layers * sum(rank * (i + o) for i, o in chosen)
    per_layer = activation_bytes_per_token(cfg, rank=rank, targets=targets, dtype=dtype, dropout=dropout,
                                           device=device)
    tokens = batch_size * max_seq_len
    # Saved for backward: every block's tensors, or with checkpointing only each block's input.
    saved = tokens * (cfg.n_layers * (d * cfg.dim if grad_checkpointing else per_layer))
    # On top of that at the peak, the larger of: the LM head's loss (it sees only the supervised positions,
    # 256 at a time as in train.ChunkedCrossEntropy: fp32 logits and one fp32 temporary of logsumexp, 8 bytes
    # per logit), and one block's backward (gradients of its widest tensors; with checkpointing also its
    # recomputed tensors). Plus one dequantized weight.
    head_rows = min(256, batch_size * answer_tokens)
    block = tokens * (d * (cfg.dim + 3 * cfg.hidden_dim) + per_layer * grad_checkpointing)
    working = max(head_rows * cfg.vocab_size * 8, block)
    working += d * max(i * o for _, i, o in linears) if quantize else 0
    parts = dict(weights=weights, lora=16 * lora_params, activations=saved, working=working)
    return {k: int(v) for k, v in parts.items()} | dict(total=int(sum(parts.values())), lora_params=lora_params)


def format_estimate(e):
    gib = 2**30
    return (f"memory estimate {e['total'] / gib:.2f} GiB: weights {e['weights'] / gib:.2f} + LoRA with AdamW "
            f"{e['lora'] / gib:.2f} + activations {e['activations'] / gib:.2f} + backward "
            f"{e['working'] / gib:.2f}")
