"""The run directory train.py writes: one resumable checkpoint, the metrics log and run.json.

    <out>/checkpoint.pt     LoRA weights, optimizer state, loop state (step, best val...), config; never the base
    <out>/metrics.jsonl     one JSON line per logged step or validation
    <out>/run.json          the resolved config, prompt format, data statistics (evaluate.py reads it)
    <out>/best, <out>/final adapters in PEFT format (lora.save_adapter)

Every file is replaced atomically (errors.write_atomic): a kill or a full disk mid-write leaves the old one.
"""
import dataclasses
import json
import os

import torch

from errors import UserError, write_atomic

def save_checkpoint(cfg, model, optimizer, state):
    lora_state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    payload = dict(lora=lora_state, optimizer=optimizer.state_dict(), state=state,
                   config=dataclasses.asdict(cfg))
    write_atomic(os.path.join(cfg.out, "checkpoint.pt"), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(cfg, model, optimizer):
    path = os.path.join(cfg.out, "checkpoint.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several types
        raise UserError(f"{path}: unreadable checkpoint ({err})") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if payload["lora"].keys() != params.keys():
        raise UserError(f"{path}: its LoRA layers differ from this run's (check --rank / --targets)")
    with torch.no_grad():
        for name, p in params.items():
            if payload["lora"][name].shape != p.shape:
                raise UserError(f"{path}: {name} has shape {tuple(payload['lora'][name].shape)}, "
                                f"this run expects {tuple(p.shape)}")
            p.copy_(payload["lora"][name])
    optimizer.load_state_dict(payload["optimizer"])
    return payload["state"]


def log_metrics(cfg, record):
    """Append one JSON line to metrics.jsonl (trim_metrics drops lines past a resumed checkpoint)."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(cfg, step):
    """On resume, drop the lines written after the checkpoint: the log gets no gaps and no duplicates."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= step]

        def write(tmp):  # a line cut short by a full disk has no "}\n" and is dropped too
            with open(tmp, "w") as f:
                f.writelines(kept)
        write_atomic(path, write)


def prepare_out_dir(cfg, step, run):
    """Make cfg.out ready for a run at `step`: on --resume drop log lines past the checkpoint, on --overwrite
    remove an earlier run's files; then write run.json."""
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.resume:
        trim_metrics(cfg, step)
    elif cfg.overwrite:
        # An earlier run's adapters go too: a new run stopped early must not leave them looking like its own.
        for name in ("metrics.jsonl", "checkpoint.pt", "best/adapter_model.safetensors", "best/adapter_config.json",
                     "final/adapter_model.safetensors", "final/adapter_config.json"):
            if os.path.exists(os.path.join(cfg.out, name)):
                os.remove(os.path.join(cfg.out, name))

    def write_run(tmp):
        with open(tmp, "w") as f:
            json.dump(run, f, indent=2)
    write_atomic(os.path.join(cfg.out, "run.json"), write_run)
