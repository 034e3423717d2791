"""LoRA math, merging, the parameter report, and adapters that round-trip with peft (the oracle)."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import model as M
from errors import UserError
from lora import (LoRALinear, apply_lora, format_parameter_report, load_adapter, lora_disabled, lora_layers,
                  merge_lora, parameter_report, save_adapter, unmerge_lora)
from quant import dequantize_weight, is_4bit, make_linear, set_linear_weight

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden=64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def quantize_linears(model, quant_type="nf4"):
    """Swap every linear but lm_head for a 4-bit one holding the same weight (what load_model does)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
            q = make_linear(mod.in_features, mod.out_features, bias=mod.bias is not None, quantize=quant_type)
            set_linear_weight(q, mod.weight.data, device="cpu", dtype=torch.float32)
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


def randomize_B(model, seed=1, std=0.05):
    """Non-zero B (PEFT's and ours) so an adapter changes the logits and a swapped key would show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * std


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)  # transformers returns an output object, our model a tensor


# --- the math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_forward_is_W_plus_scaled_BA(quantize):
    torch.manual_seed(0)
    base = make_linear(64, 96, bias=True, quantize=quantize)
    set_linear_weight(base, torch.randn(96, 64) * 0.1, device="cpu", dtype=torch.float32)
    base.bias = nn.Parameter(torch.randn(96), requires_grad=False)
    layer = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    W = dequantize_weight(base)  # the 4-bit weight as the matmul sees it
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(2, 5, 64)
    expected = x @ W.T + base.bias + (8 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_init_and_rslora_scaling():
    layer = LoRALinear(nn.Linear(64, 32), rank=16, alpha=32)
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(64, 32), rank=16, alpha=32, rslora=True).scaling == 8.0
    assert torch.all(layer.lora_B.weight == 0)
    # PEFT's kaiming_uniform_(a=sqrt(5)) bound: 1 / sqrt(fan_in) = 1/8
    assert 0.1 < layer.lora_A.weight.abs().max() <= 1 / 8
    # rsLoRA through PEFT's own scaling, with the same r and alpha
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=32, use_rslora=True,
                                                         target_modules=["q_proj"]))
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 8.0


def test_zero_B_leaves_logits_unchanged():
    model = tiny_llama()
    before = logits(model)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradients_reach_only_A_and_B(quantize):
    model = tiny_llama()
    if quantize:
        quantize_linears(model, quantize)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=LLAMA_TARGETS)
    randomize_B(model)
    model.train()
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_lora, name
        if is_lora:  # the first layer's adapter too: the 4-bit path passes gradients down
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_all_linear_and_names_match_peft():
    ours, theirs = tiny_llama(), tiny_llama()
    names = apply_lora(ours, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_names = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert sorted(names) == sorted(peft_names) and "lm_head" not in names
    assert len(names) == 14


def test_parameter_report_counts_4bit_weights_and_matches_peft():
    fp, q = tiny_llama(), quantize_linears(tiny_llama())
    for m in (fp, q):
        apply_lora(m, rank=4, alpha=8, dropout=0.0, targets=LLAMA_TARGETS)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    trainable, total = peft_model.get_nb_trainable_parameters()
    report = parameter_report(fp)
    assert (report["trainable"], report["total"]) == (trainable, total)
    assert parameter_report(q) == report  # packing to 4 bits changes no parameter count
    assert format_parameter_report(report) == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


# --- merge / unmerge ------------------------------------------------------------------------------

def test_merge_unmerge_fp32():
    model = tiny_llama()
    base_logits = logits(model)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=LLAMA_TARGETS)
    randomize_B(model)
    lora_logits = logits(model)
    merge_lora(model)
    merge_lora(model)  # a second merge is a no-op, not a second W += BA
    torch.testing.assert_close(logits(model), lora_logits, atol=1e-5, rtol=0)  # branch not added twice
    unmerge_lora(model)
    for name, p in model.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(p, weights[name.replace(".base_layer", "")], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), lora_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # B really is non-zero


def test_lora_disabled_computes_the_base_alone_and_restores_the_adapter():
    model = tiny_llama()
    base_logits = logits(model)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=LLAMA_TARGETS)
    randomize_B(model)
    lora_logits = logits(model)
    with lora_disabled(model):
        torch.testing.assert_close(logits(model), base_logits, atol=0, rtol=0)
    torch.testing.assert_close(logits(model), lora_logits, atol=0, rtol=0)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        with lora_disabled(model):
            pass


def test_merge_unmerge_4bit_drift():
    """Re-quantizing W + BA adds noise of about the size of quantizing W in the first place."""
    fp_logits = logits(tiny_llama())
    model = quantize_linears(tiny_llama())
    base_logits = logits(model)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=LLAMA_TARGETS)
    randomize_B(model)
    lora_logits = logits(model)
    merge_lora(model)
    assert all(is_4bit(m.base_layer) for _, m in lora_layers(model))
    merge_drift = (logits(model) - lora_logits).abs()
    unmerge_lora(model)  # the base after dequantize, add, re-quantize, dequantize, subtract, re-quantize
    unmerge_drift = (logits(model) - lora_logits).abs()
    quant_error = (base_logits - fp_logits).abs()  # fp32 model vs its NF4 copy
    lora_effect = (lora_logits - base_logits).abs()
    for name, d in [("merge drift", merge_drift), ("merge+unmerge drift", unmerge_drift),
                    ("NF4 quantization error", quant_error), ("LoRA effect", lora_effect)]:
        print(f"{name}: mean {d.mean():.4f} max {d.max():.4f}")
    # Measured (figures in lora._add_to_base): merge 0.016 / 0.083, merge+unmerge 0.022 / 0.098,
    # quantization error 0.012 / 0.067, LoRA effect 0.098 / 0.54 (mean / max |logit difference|).
    assert merge_drift.mean() < 2 * quant_error.mean() and unmerge_drift.mean() < 2 * quant_error.mean()
    assert merge_drift.mean() < lora_effect.mean() / 3  # the merged model is still the adapted one


# --- adapters in the PEFT format ------------------------------------------------------------------

@pytest.mark.parametrize("targets,rslora", [(LLAMA_TARGETS, False), ("all-linear", True),
                                            (["self_attn.q_proj", "v_proj"], False)])
def test_our_adapter_loads_in_peft(tmp_path, targets, rslora):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    apply_lora(ours, rank=4, alpha=8, dropout=0.05, targets=targets, rslora=rslora)
    randomize_B(ours)
    save_adapter(ours, tmp_path, base_model_path="tiny-llama")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no .tmp left
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()  # injects in place
    assert theirs.peft_config["default"].use_rslora == rslora
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base), logits(ours), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_here(tmp_path, rslora):
    base = tiny_llama()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, use_rslora=rslora,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_B(theirs)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)  # no LoRA yet: applied from adapter_config.json
    assert len(lora_layers(ours)) == 6
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-5, rtol=0)
    # into a model that already has matching LoRA (as train.py --resume would), alpha from the file
    again = copy.deepcopy(base)
    apply_lora(again, rank=8, alpha=1, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again), logits(theirs), atol=1e-5, rtol=0)


def test_save_refuses_to_overwrite(tmp_path):
    model = tiny_llama()
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["q_proj"])
    save_adapter(model, tmp_path)
    with pytest.raises(UserError, match="already holds an adapter"):
        save_adapter(model, tmp_path)
    randomize_B(model)
    save_adapter(model, tmp_path, overwrite=True)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)


# --- the same with our model.py -------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_our_model_adapters_round_trip_with_peft(tmp_path, quantize):
    """fp32: exact parity with PEFT on transformers' Llama. NF4: our QLoRA model equals PEFT over a
    transformers Llama holding our dequantized weights (W of the 4-bit model, as its matmul sees it)."""
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "base")
    ours = M.load_model(str(tmp_path / "base"), quantize=quantize)
    apply_lora(ours, rank=4, alpha=16, dropout=0.1, targets=LLAMA_TARGETS)
    randomize_B(ours)
    if quantize:
        for name, layer in lora_layers(ours):
            hf.get_submodule(name).weight.data = dequantize_weight(layer.base_layer).clone()
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)

    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    randomize_B(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "peft")
    again = M.load_model(str(tmp_path / "base"), quantize=quantize)
    load_adapter(again, tmp_path / "peft")
    torch.testing.assert_close(logits(again), logits(peft_model.eval()), atol=1e-5, rtol=0)


def test_our_gpt2_adapter_loads_in_peft_over_conv1d(tmp_path):
    """GPT-2: our nn.Linear layers against transformers' Conv1D ones; LoRA on attn.c_proj but not
    mlp.c_proj, so target_modules must name full modules ("c_proj" alone would select both)."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = M.load_model(str(tmp_path / "base"))
    names = apply_lora(ours, rank=4, alpha=8, dropout=0.0, targets=["c_attn", "attn.c_proj", "c_fc"])
    assert names[:3] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    randomize_B(ours)
    save_adapter(ours, tmp_path / "adapter")
    targets = json.load(open(tmp_path / "adapter" / "adapter_config.json"))["target_modules"]
    assert "transformer.h.1.attn.c_proj" in targets and "c_proj" not in targets
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def _adapter(tmp_path, name, targets=("q_proj", "v_proj"), rank=4, hidden=64):
    model = tiny_llama(hidden=hidden)
    apply_lora(model, rank=rank, alpha=8, dropout=0.0, targets=list(targets))
    save_adapter(model, tmp_path / name)
    return str(tmp_path / name)


def test_mismatched_adapters_raise_user_error(tmp_path):
    def lora_model(rank=8, targets=("q_proj", "v_proj")):
        model = tiny_llama()
        apply_lora(model, rank=rank, alpha=8, dropout=0.0, targets=list(targets))
        return model

    d = _adapter(tmp_path, "r4", rank=4)
    with pytest.raises(UserError, match=r"adapter_config.json r=4 but model has r=8"):
        load_adapter(lora_model(rank=8), d)
    d = _adapter(tmp_path, "q_only", targets=["q_proj"], rank=8)
    with pytest.raises(UserError, match=r"target_modules=\['q_proj'\] but model has LoRA on \['q_proj', 'v_proj'\]"):
        load_adapter(lora_model(), d)
    d = _adapter(tmp_path, "hidden32", hidden=32)  # same r and targets, another model's shapes
    with pytest.raises(UserError, match=r"key base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight "
                                        r"has shape \(4, 32\), model expects \(4, 64\)"):
        load_adapter(tiny_llama(), d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no adapter_config.json in {tmp_path / 'empty'}"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    with pytest.raises(UserError, match="no adapter_config.json in"):
        load_adapter(tiny_llama(), tmp_path / "missing")
    os.remove(os.path.join(_adapter(tmp_path, "no_weights"), "adapter_model.safetensors"))
    with pytest.raises(UserError, match=f"no adapter_model.safetensors in {tmp_path / 'no_weights'}"):
        load_adapter(tiny_llama(), tmp_path / "no_weights")
    d = _adapter(tmp_path, "gpt2_targets")
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    json.dump(dict(cfg, target_modules=["c_attn"]), open(os.path.join(d, "adapter_config.json"), "w"))
    with pytest.raises(UserError, match=r"adapter_config.json: LoRA targets \['c_attn'\] match no linear layer"):
        load_adapter(tiny_llama(), d)


def test_apply_lora_rejects_unknown_targets():
    with pytest.raises(UserError, match=r"LoRA targets \['c_fc'\] match no linear layer"):
        apply_lora(tiny_llama(), rank=4, alpha=8, dropout=0.0, targets=["q_proj", "c_fc"])


def test_bf16_base_keeps_fp32_adapter_and_bf16_output():
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0
    ref = (x.float() @ base.weight.float().T + base.bias.float()
           + 2 * x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)  # bf16 rounding


def test_lora_dropout_keep_rate_is_unbiased_and_off_in_eval():
    from lora import LoRADropout
    torch.manual_seed(0)
    drop = LoRADropout(0.05)
    x = torch.ones(256, 1024)
    kept, scale = drop(x)
    keep_rate = (kept != 0).float().mean().item()
    assert abs(keep_rate - 0.95) < 0.003                       # P(keep) = 1 - round(0.05 * 65536) / 65536
    assert abs((kept * scale).mean().item() - 1.0) < 0.003      # inverted dropout: the expectation is unchanged
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    again, _ = drop(x)
    assert not torch.equal(again, kept)                         # a fresh mask each call
    drop.eval()
    out, scale = drop(x)
    assert out is x and scale == 1.0
