"""quant.py against bitsandbytes: the reference NF4 / FP4 quantization gives the same bytes, states and
dequantized values; every 4-bit linear works in train and eval mode; memory_report counts right."""
import copy

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
import torch.nn as nn

from quant import (dequantize_4bit_reference, dequantize_weight, dynamic_map, format_memory_report,
                   fp4_code, make_linear, memory_report, nf4_code, quantize_4bit_reference, set_linear_weight)

# Weight shapes (out, in): a partial last block (172*64 is not a multiple of 128), odd numel, one value, and
# in_features that are not a multiple of the blocksize (the case bnb's AVX512 CPU dequantization gets wrong).
SHAPES = [(172, 64), (64, 172), (48, 48), (33, 7), (1, 1), (257, 256)]
BLOCKSIZES = [32, 64, 128, 256, 4096]  # bitsandbytes accepts 32 ... 4096; 4096 > numel for most shapes


def bnb_dequantize(packed, state):
    """bnb's CPU dequantization of a flat view: its kernel is right for one row (see quant.Linear4bit)."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return BF.dequantize_4bit(packed, flat).view(state.shape)


def test_nf4_table_is_normal_quantiles_and_equals_bitsandbytes():
    code = nf4_code()
    assert torch.equal(code, BF.get_4bit_type("nf4", device="cpu"))
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1
    assert code[0] == -1 and code[-1] == 1
    # Each positive value is a quantile of N(0, 1) divided by the largest: invert with the normal CDF.
    top = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    cdf = torch.special.ndtr(code[8:].double() * top)
    assert torch.allclose(cdf, torch.linspace(0.5, 0.9677083, 9, dtype=torch.float64)[1:], atol=1e-6)


def test_fp4_and_dynamic_tables_equal_bitsandbytes():
    assert torch.equal(fp4_code(), BF.get_4bit_type("fp4", device="cpu"))
    assert fp4_code()[0b0011] == 1 and fp4_code()[0b1011] == -1  # e=01, m=1: 12 / 12
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_equals_bitsandbytes_bit_for_bit(quant_type, dtype, double_quant):
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for blocksize in BLOCKSIZES:
            where = f"{quant_type} {dtype} double_quant={double_quant} shape={shape} blocksize={blocksize}"
            w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
            w[: shape[0] // 2, : shape[1] // 2] = 0  # some all-zero blocks
            packed, qs = BF.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                          compress_statistics=double_quant)
            ref, state = quantize_4bit_reference(w, quant_type, blocksize, double_quant)
            assert ref.shape == packed.shape == ((w.numel() + 1) // 2, 1) and ref.dtype == torch.uint8, where
            assert torch.equal(ref, packed), where
            assert torch.equal(state.absmax, qs.absmax) and state.absmax.dtype == qs.absmax.dtype, where
            if double_quant:
                assert state.absmax.dtype == torch.uint8, where
                assert torch.equal(state.offset, qs.offset), where
                assert torch.equal(state.absmax2, qs.state2.absmax), where
            else:
                assert state.offset is None and qs.offset is None, where
            out = dequantize_4bit_reference(ref, state)
            expected = bnb_dequantize(packed, qs)
            assert out.dtype == dtype and torch.equal(out, expected), where
            if shape[1] % blocksize == 0:  # bnb's 2-D CPU path is right here: compare with it too
                assert torch.equal(out, BF.dequantize_4bit(packed, qs)), where


def test_worked_packing_example_from_the_comment():
    w = torch.zeros(64)
    w[:4] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    packed, state = quantize_4bit_reference(w, "nf4", 64, double_quant=False)
    assert packed[:2, 0].tolist() == [0xC0, 0xA7] and state.absmax.tolist() == [2.0]
    assert torch.equal(packed, BF.quantize_4bit(w, quant_type="nf4", blocksize=64)[0])
    out = dequantize_4bit_reference(packed, state)[:4]
    assert torch.allclose(out, torch.tensor([0.8814, -2.0, 0.4922, 0.0]), atol=1e-4)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="bnb's scalar CPU path is right")
def test_bitsandbytes_avx512_dequantization_misreads_scales_when_rows_split_blocks():
    # Why quant.Linear4bit exists. If this fails, bitsandbytes fixed it and the workaround can go.
    w = torch.randn(48, 48)
    packed, qs = BF.quantize_4bit(w, quant_type="nf4", blocksize=64)
    assert not torch.equal(BF.dequantize_4bit(packed, qs), bnb_dequantize(packed, qs))


def quantized_linear(in_features, out_features, quant_type, *, bias=False, seed=0):
    layer = make_linear(in_features, out_features, bias=bias, quantize=quant_type)
    gen = torch.Generator().manual_seed(seed)
    set_linear_weight(layer, torch.randn(out_features, in_features, generator=gen) * 0.05,
                      device="cpu", dtype=torch.float32)
    return layer


# (in, out): the shapes that break bitsandbytes' CPU inference kernel, or its AVX512 dequantization.
LAYER_SHAPES = [(64, 172), (172, 64), (48, 48), (96, 64), (32, 512), (576, 192)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("in_features,out_features", LAYER_SHAPES)
def test_4bit_linear_eval_then_train_keeps_values_and_gradient(in_features, out_features, quant_type):
    layer = quantized_linear(in_features, out_features, quant_type)
    qs = layer.weight.quant_state
    w = dequantize_weight(layer)  # (out, in)
    assert torch.equal(w, bnb_dequantize(layer.weight.data, qs))  # the oracle is bnb's dequantization
    x = torch.randn(2, 3, in_features)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), x @ w.t())
    assert layer.weight.shape == ((out_features * in_features) // 2, 1)  # not repacked
    layer.train()
    x.requires_grad_(True)
    y = layer(x)
    assert torch.equal(y, (x @ w.t()).detach())
    grad = torch.randn_like(y)
    y.backward(grad)
    assert x.grad is not None and torch.allclose(x.grad, grad @ w, atol=1e-6)


def test_4bit_linear_bias_and_bf16_compute():
    layer = make_linear(48, 40, bias=True, quantize="nf4", compute_dtype=torch.bfloat16)
    set_linear_weight(layer, torch.randn(40, 48) * 0.05, device="cpu", dtype=torch.bfloat16)
    layer.bias = nn.Parameter(torch.randn(40), requires_grad=False)
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    w = dequantize_weight(layer)  # (40, 48) bf16
    assert w.dtype == torch.bfloat16 and torch.equal(w, bnb_dequantize(layer.weight.data, layer.weight.quant_state))
    assert torch.equal(layer(x), x @ w.t() + layer.bias.bfloat16())


@pytest.mark.skipif(not BF.has_avx512bf16(), reason="no AVX512-BF16: bitsandbytes never repacks the weight")
def test_plain_bitsandbytes_linear_loses_the_gradient_after_an_eval_forward():
    # The negative control for make_linear turning the repack off.
    layer = bnb.nn.Linear4bit(576, 192, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    assert layer.support_avx512bf16_for_cpu
    set_linear_weight(layer, torch.randn(192, 576) * 0.05, device="cpu", dtype=torch.float32)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 576))
    assert layer.weight.shape == (192, 288)  # repacked in place
    layer.train()
    x = torch.randn(2, 576, requires_grad=True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layer(x).sum().backward()
    assert x.grad is None


def test_memory_report_counts_by_hand():
    model = nn.Module()
    model.up = quantized_linear(128, 64, "nf4", bias=True)  # double quantization (make_linear's default)
    model.down = make_linear(64, 32, bias=False, quantize="fp4", double_quant=False)
    set_linear_weight(model.down, torch.randn(32, 64), device="cpu", dtype=torch.float32)
    model.norm = nn.LayerNorm(32)
    model.register_buffer("positions", torch.zeros(10, dtype=torch.int64))
    report = memory_report(model)
    # up: 64*128 = 8192 values -> 4096 bytes; 128 blocks -> 128 uint8 codes + 4 (offset) + 1 fp32 scale.
    # down: 32*64 = 2048 values -> 1024 bytes; 32 blocks -> 32 fp32 absmax = 128 bytes.
    assert report["quantized_params"] == 8192 + 2048
    assert report["quantized_weight_bytes"] == 4096 + 1024
    assert report["quant_state_bytes"] == (128 + 4 + 4) + 128
    # other: up.bias 64 fp32 + LayerNorm 2 * 32 fp32 + 10 int64 positions.
    assert report["other_bytes"] == 64 * 4 + 64 * 4 + 80
    assert report["total_bytes"] == 5120 + 264 + 592
    assert report["bf16_bytes"] == 2 * (10240 + 64 + 64) + 80
    assert report["bits_per_param"] == pytest.approx(8 * 5384 / 10240)  # 4.206
    assert "4.206 bits/param" in format_memory_report(report)
    plain = memory_report(nn.Linear(4, 3))
    assert plain["total_bytes"] == 15 * 4 and plain["bf16_bytes"] == 30 and plain["bits_per_param"] is None
