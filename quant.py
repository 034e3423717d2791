"""4-bit quantization: the linear-layer factory the model is built from.

QLoRA (Dettmers et al., 2023) stores each frozen linear weight in 4 bits (NF4 or FP4) in blocks of
64 values that share one absmax scale, and with double quantization stores those scales in 8 bits.
bitsandbytes' `Linear4bit` holds the packed weight and dequantizes it on the fly in its matmul.
"""
import torch
import torch.nn as nn
import bitsandbytes as bnb

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # values per absmax block, as in the QLoRA paper and bitsandbytes' default


def make_linear(in_features, out_features, *, bias, quantize=None, compute_dtype=torch.float32,
                double_quant=True):
    """An `nn.Linear`, or a `bnb.nn.Linear4bit` when `quantize` is "nf4" / "fp4".

    Built on whatever device is current (the loader uses "meta"); `set_linear_weight` fills it.
    """
    if quantize is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {quantize!r}")
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
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


def dequantize_weight(layer):
    """The (out, in) full-precision weight of a linear layer, dequantized if it is 4-bit."""
    if is_4bit(layer):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data
