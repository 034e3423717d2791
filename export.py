"""Merge a LoRA adapter into its base and write a Hugging Face model directory:
`python export.py --model BASE --adapter DIR --out OUT`.

The base is loaded in full precision (never 4-bit: merging into NF4 would re-quantize), every adapted
weight becomes W + scaling * B @ A computed in fp32, and each tensor is written in the dtype the base
checkpoint stores it in, under Hugging Face's names, so `AutoModelForCausalLM.from_pretrained(OUT)` loads
it and generates what base + adapter generate here.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from download import resolve_model
from errors import UserError, run_cli
from lora import load_adapter, lora_layers, merge_lora
from model import Config, checkpoint_files, hf_name, load_model

# Copied as they are: the tokenizer in any of its formats, and the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtypes(path, cfg):
    """{our parameter name: the dtype the base checkpoint stores it in}, from the file headers alone."""
    dtypes = {}
    for file in checkpoint_files(path):
        if file.endswith(".bin"):
            found = {k: t.dtype for k, t in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()}
        else:
            with safe_open(file, framework="pt") as f:
                found = {k: SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32) for k in f.keys()}
        for key, dtype in found.items():
            name = hf_name(key, cfg)[0]
            if name is not None:
                dtypes[name] = dtype
    return dtypes


def merged_state_dict(base, adapter):
    """The base's tensors with the adapter merged in, named and laid out as Hugging Face stores them."""
    cfg = Config.from_hf(base)
    dtypes = stored_dtypes(base, cfg)
    # The checkpoint's dtype when it has one, else fp32, which holds bf16 / fp16 values exactly.
    kinds = set(dtypes.values())
    load_dtype = kinds.pop() if len(kinds) == 1 else torch.float32
    model = load_model(base, quantize=None, dtype=load_dtype)
    load_adapter(model, adapter)
    merge_lora(model)            # W + scaling * B @ A in fp32, cast to load_dtype
    for name, layer in lora_layers(model):             # unwrap: q_proj.base_layer.weight -> q_proj.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    tensors = {}
    # Each parameter once, under its first name: a tied LM head is the embedding (config.json's
    # tie_word_embeddings ties it again on load), and the aliases model.embed / model.blocks drop out.
    for name, tensor in model.named_parameters():
        tensor = tensor.detach()
        if hf_name(name, cfg)[1]:
            tensor = tensor.t()  # GPT-2's Conv1D stores (in, out)
        tensors[name] = tensor.to(dtypes.get(name, load_dtype)).contiguous()
    return tensors


def export(base, adapter, out, overwrite=False):
    """Write OUT: model.safetensors, config.json, generation_config.json and the tokenizer files."""
    if os.path.exists(out) and not overwrite:
        raise UserError(f"--out {out} exists (pass --overwrite to replace it)")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UserError(f"--adapter {adapter}: no adapter_config.json there")
    base = resolve_model(base)
    if os.path.realpath(out) in (os.path.realpath(base), os.path.realpath(adapter)):
        raise UserError(f"--out {out} is the base model's or the adapter's own directory")
    tensors = merged_state_dict(base, adapter)
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"   # built beside OUT, then renamed: never half a model
    try:
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if os.path.isfile(os.path.join(base, name)):
                shutil.copyfile(os.path.join(base, name), os.path.join(tmp, name))
        if not os.path.exists(os.path.join(tmp, "generation_config.json")):   # from config.json's ids
            with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
                ids = {k: v for k, v in json.load(f).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(ids, f, indent=2)
        if os.path.exists(out):
            old = f"{out.rstrip(os.sep)}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line and exit status 2 through run_cli, like every other UserError
        raise UserError(message)


def main(argv=None):
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model directory or Hugging Face id")
    parser.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format, e.g. runs/X/best)")
    parser.add_argument("--out", required=True, help="directory to write the merged model to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    export(args.model, args.adapter, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: base {args.model} with {args.adapter} merged")


if __name__ == "__main__":
    run_cli(main)
