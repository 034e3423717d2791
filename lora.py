"""LoRA (Hu et al., 2021) around any frozen linear layer, and adapters in the Hugging Face PEFT format.

A frozen weight W (out, in) learns only a low-rank update B @ A, B (out, r) and A (r, in), r << in:

                   h = x W^T + scaling * x A^T B^T               (B, T, out)
                   ^
                  (+) <---------- * scaling -----------+
                   ^                                   |
     +-------------+-------------+             +-------+-------+
     |        W (out, in)        |             |  B (out, r)   |  zeros at init
     |  frozen, maybe NF4 4-bit  |             +-------+-------+
     +-------------+-------------+                     ^  (B, T, r)
                   ^                           +-------+-------+
                   |                           |   A (r, in)   |  Kaiming-uniform
                   |                           +-------+-------+
                   |                                   ^
                   |                                dropout
                   +------------ x (B, T, in) ---------+

scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
With B initialised to zero the wrapped model starts exactly where the base model is (QLoRA trains A
and B over an NF4 W). Module and parameter names follow PEFT, so `<module>.lora_A.weight` is a PEFT
key once `base_model.model.` is put in front of it.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UserError, write_atomic
from quant import dequantize_weight, set_linear_weight

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class LoRADropout(nn.Module):
    """Inverted dropout that returns the kept inputs and their scale 1 / P(keep) apart, for the caller
    to fold into the LoRA scaling. p is rounded to a multiple of 1/65536."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type != "cpu":
            return F.dropout(x, self.p), 1.0
        # On the CPU, 16 random bits per element, four from each 64-bit draw: torch's bernoulli_ (nn.Dropout)
        # draws 64 per element, a fifth of a SmolLM2 QLoRA step (bf16, 8x256, 1 thread: 378 tokens/s, not 327).
        drop = round(self.p * 65536)
        bits = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-2**63, None)
        keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= drop - 32768  # P(keep) = 1 - drop / 65536
        return x * keep.to(x.dtype), 65536 / (65536 - drop)  # a mask in x's dtype multiplies faster than bool


class LoRALinear(nn.Module):
    """A frozen base linear (`nn.Linear` or `bnb.nn.Linear4bit`) plus a trainable low-rank update."""

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base_layer = base  # PEFT's name for the wrapped layer
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.lora_dropout = LoRADropout(dropout)
        # A and B stay fp32 whatever the base holds: they are tiny (r * (in + out) values) and the
        # optimizer updates them in full precision; forward casts them to the input's dtype.
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.disabled = False   # lora_disabled(model): the base alone

    def forward(self, x):
        h = self.base_layer(x)  # (B, T, out); a Linear4bit dequantizes W inside its matmul
        if self.merged or self.disabled:  # merged: W already holds W + scaling * B A
            return h
        # The branch runs in x's dtype (the base's compute dtype, e.g. bf16): casting the small
        # A and B costs less than casting the activations up to fp32. Llama-7B q_proj, r=16:
        # (4, 512, 4096) @ A^T (4096, 16) -> (4, 512, 16) @ B^T (16, 4096) -> (4, 512, 4096)
        A, B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        kept, keep_scale = self.lora_dropout(x)
        z = F.linear(kept, A)  # (B, T, r)
        # h + scaling * z @ B^T, with the scales and the add done inside one matmul (addmm): done apart, each
        # is a pass over the (B, T, out) output forward and backward. SmolLM2 QLoRA step on the CPU (bf16,
        # 8x256, 1 thread): gate_proj's branch 3.8 ms instead of 10, the step 319 tokens/s instead of 298.
        out = torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]), B.t(),
                          alpha=self.scaling * keep_scale)
        return out.view(h.shape)

    @property
    def scaling(self):
        # rsLoRA (Kalajdzievski, 2023): alpha / sqrt(r) keeps the update's size stable as r grows.
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def delta_weight(self):
        """scaling * B @ A in fp32: (out, r) @ (r, in) -> (out, in), the update merging adds to W."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def lora_layers(model):
    """(name, LoRALinear) for every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _matches(name, targets):
    # PEFT's rule: a string is a regex over the full name, a list holds names or name suffixes.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _find_targets(model, targets):
    """Names of the linear layers `targets` selects; "all-linear" is every linear but the LM head."""
    # A LoRALinear counts as the linear it wraps; the layers inside it (base_layer, lora_A/B) don't.
    inside = {f"{n}.{c}" for n, m in lora_layers(model) for c, _ in m.named_modules() if c}
    linears = [n for n, m in model.named_modules()  # bnb's Linear4bit is an nn.Linear too
               if isinstance(m, (nn.Linear, LoRALinear)) and n not in inside]
    if targets == "all-linear":
        return [n for n in linears if n.rsplit(".", 1)[-1] != "lm_head"]
    return [n for n in linears if _matches(n, targets)]


def apply_lora(model, rank, alpha, dropout, targets, rslora=False):
    """Freeze every parameter of `model` and wrap the target linears in LoRALinear; returns their names."""
    if lora_layers(model):
        raise UserError("model already has LoRA layers: apply_lora runs once per model")
    names = _find_targets(model, targets)
    if isinstance(targets, str):
        unmatched = [] if names else [targets]
    else:
        unmatched = [t for t in targets if not any(_matches(n, [t]) for n in names)]
    if unmatched:
        raise UserError(f"LoRA targets {unmatched} match no linear layer in the model")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        lora = LoRALinear(base, rank, alpha, dropout, rslora).train(base.training)  # keep eval mode
        setattr(parent, child, lora)
    return names


def _numel(p):
    # A packed 4-bit weight of numel n holds 2n values; its quant_state knows the (out, in) shape.
    qs = getattr(p, "quant_state", None)
    return math.prod(qs.shape) if qs is not None else p.numel()


def parameter_report(model):
    """Trainable and total parameters, counting each packed 4-bit weight as the values it holds."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return dict(trainable=trainable, total=total, percent=100 * trainable / total)


def format_parameter_report(report):
    return (f"trainable params: {report['trainable']:,} || all params: {report['total']:,} "
            f"|| trainable%: {report['percent']:.4f}")


def _add_to_base(layer, sign):
    base = layer.base_layer
    w = dequantize_weight(base)  # (out, in) fp weight; a copy for a 4-bit base
    # A 4-bit base is re-quantized, which adds noise about as large as quantizing W did at first.
    # Measured (tests/test_lora.py, tiny random Llama hidden 64, NF4, B ~ N(0, 0.05)): mean / max
    # |logit change| from merging 0.016 / 0.083, from merge + unmerge 0.022 / 0.098, against 0.012 /
    # 0.067 for quantizing the fp32 model to NF4 and 0.098 / 0.54 for what the adapter changes.
    set_linear_weight(base, w.float() + sign * layer.delta_weight(), device=w.device, dtype=w.dtype)


def merge_lora(model):
    """Fold every adapter into its base, W += scaling * B @ A (4-bit: dequantize, add, re-quantize)."""
    for _, layer in lora_layers(model):
        if not layer.merged:
            _add_to_base(layer, +1)
            layer.merged = True


@contextlib.contextmanager
def lora_disabled(model):
    """Inside the block `model` computes with its base weights alone (PEFT's disable_adapter): evaluate.py
    --compare loads, and so checks, the adapter before it spends time scoring the base."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("the model's LoRA is merged into its weights: unmerge_lora(model) first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def unmerge_lora(model):
    """Undo merge_lora: W -= scaling * B @ A (exact to rounding in fp; re-quantized for 4-bit)."""
    for _, layer in lora_layers(model):
        if layer.merged:
            _add_to_base(layer, -1)
            layer.merged = False


def _target_modules(model, wrapped):
    """PEFT's form, the last name components ("q_proj"), unless those also select layers left alone."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    # e.g. GPT-2 with LoRA on attn.c_proj only: "c_proj" would also select mlp.c_proj in PEFT.
    return suffixes if set(_find_targets(model, suffixes)) == set(wrapped) else sorted(wrapped)


def save_adapter(model, directory, base_model_path=None, overwrite=False):
    """Write adapter_model.safetensors and adapter_config.json, loadable by peft.PeftModel.from_pretrained."""
    layers = lora_layers(model)
    if not layers:
        raise UserError(f"cannot save an adapter to {directory}: the model has no LoRA layers")
    if not overwrite and any(os.path.exists(os.path.join(directory, f)) for f in (WEIGHTS_NAME, CONFIG_NAME)):
        raise UserError(f"{directory} already holds an adapter (pass overwrite=True to replace it)")
    os.makedirs(directory, exist_ok=True)
    first = layers[0][1]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_path,
                  r=first.rank, lora_alpha=first.alpha, use_rslora=first.rslora,
                  lora_dropout=getattr(first.lora_dropout, "p", 0.0),
                  target_modules=_target_modules(model, [n for n, _ in layers]),
                  bias="none", fan_in_fan_out=False, init_lora_weights=True, inference_mode=True,
                  modules_to_save=None, use_dora=False)
    tensors = {f"{PEFT_PREFIX}{n}.{ab}.weight": getattr(m, ab).weight.detach().contiguous()
               for n, m in layers for ab in ("lora_A", "lora_B")}
    # safetensors reports a full disk as SafetensorError
    write_atomic(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}),
                 errors=(OSError, SafetensorError))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2)
    write_atomic(os.path.join(directory, CONFIG_NAME), write_config)


def load_adapter(model, directory):
    """Load a PEFT LoRA adapter into `model`; a model without LoRA gets it from the adapter's config."""
    config_path, weights_path = (os.path.join(directory, f) for f in (CONFIG_NAME, WEIGHTS_NAME))
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise UserError(f"no {os.path.basename(path)} in {directory}")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
        tensors = load_file(weights_path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # bad JSON, a truncated safetensors file
        raise UserError(f"cannot read the adapter in {directory}: {err}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{config_path}: not an adapter config (a JSON object)")
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    if not isinstance(cfg.get("r"), int) or not cfg.get("target_modules"):
        raise UserError(f"{config_path}: a LoRA config needs r and target_modules")
    # Shapes that do not fit usually mean another base model: say which one the adapter names.
    trained_on = f" (the adapter was trained on {cfg['base_model_name_or_path']})" \
        if cfg.get("base_model_name_or_path") else ""
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias",
                               "layers_to_transform", "exclude_modules", "target_parameters",
                               "trainable_token_indices", "layer_replication") if cfg.get(k)]
    if unsupported or cfg.get("bias", "none") != "none":
        raise UserError(f"{config_path}: unsupported PEFT options {unsupported or ['bias']}")
    r, targets = cfg["r"], cfg["target_modules"]
    if not lora_layers(model):
        try:
            apply_lora(model, r, cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), targets,
                       cfg.get("use_rslora", False))
        except UserError as err:
            raise UserError(f"{config_path}: {err}") from None
    layers = dict(lora_layers(model))
    if any(m.merged for m in layers.values()):
        raise ValueError("the model's LoRA is merged: unmerge_lora(model) before load_adapter")
    model_r = next(iter(layers.values())).rank
    if r != model_r:
        raise UserError(f"{config_path} r={r} but model has r={model_r}")
    if set(_find_targets(model, targets)) != set(layers):
        raise UserError(f"{config_path} target_modules={targets} but model has LoRA on "
                        f"{_target_modules(model, list(layers))}")
    params = {f"{PEFT_PREFIX}{n}.{ab}.weight": getattr(m, ab).weight
              for n, m in layers.items() for ab in ("lora_A", "lora_B")}
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise UserError(f"{weights_path}: {len(missing)} missing and {len(unexpected)} unexpected keys, "
                        f"e.g. {(missing + unexpected)[0]}{trained_on}")
    for key, p in params.items():  # check every shape before changing anything
        if tensors[key].shape != p.shape:
            raise UserError(f"{weights_path}: key {key} has shape {tuple(tensors[key].shape)}, "
                            f"model expects {tuple(p.shape)}{trained_on}")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    for m in layers.values():  # the adapter was trained with its own scaling
        m.alpha, m.rslora = cfg["lora_alpha"], cfg.get("use_rslora", False)
