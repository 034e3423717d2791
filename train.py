"""QLoRA fine-tuning, the loop written out: `python train.py --model DIR --data FILE`.

A frozen (4-bit) base, LoRA adapters on its linears, a masked next-token loss over the answer tokens,
AdamW, warmup + cosine schedule, periodic validation with early stopping, and one resumable checkpoint.

With no options it runs the main job on defaults suited to the hardware it finds (defaults_for):
  CUDA GPU    meta-llama/Llama-3.1-8B-Instruct in NF4 (gated: accept its licence, then HF_TOKEN or
              `hf auth login`), all of SQuAD 2.0 train, batch 4 x 512 tokens, gradient checkpointing
  CPU / MPS   SmolLM2-135M-Instruct (weights/smollm2-135m-instruct if present), 1000 SQuAD 2.0 train
              questions, batch 8 x 256 tokens: minutes on a laptop (MPS: --quantize none)
--model takes a model directory or a Hugging Face id, --data a file or squad1 / squad2 (the official
training file); what is missing is downloaded once into $QLORA_CACHE (default ~/.cache/qlora-from-scratch).
--estimate prints the memory plan and exits without loading weights (--model may also be a preset such
as llama-3-8b, or a comma list of them for a table).
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from checkpoint import load_checkpoint, log_metrics, prepare_out_dir, save_checkpoint
from data import (FORMATS, IGNORE_INDEX, collate, load_examples, prepare, sample_examples, show_example,
                  split_examples)
from distributed import all_ranks_sum, finish, init_distributed
from errors import UserError, run_cli
from lora import apply_lora, format_parameter_report, parameter_report, save_adapter
from download import resolve_data, resolve_model
from model import PRESETS, Config, load_model
from quant import estimate_memory, format_estimate, format_memory_report, memory_report
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    # "" / 0 / -1 / None below: chosen for the device by defaults_for
    model: str = ""                 # model directory (config.json, safetensors, tokenizer) or Hugging Face id
    data: str = ""                  # SQuAD v1.1 / v2.0 JSON, instruction JSON / JSONL, or squad1 / squad2
    out: str = "runs/qlora"         # adapter, checkpoint and metrics.jsonl go here
    quantize: str = ""              # nf4 | fp4 | none: how the frozen base is stored; "": nf4 (none on MPS)
    double_quant: bool = True       # 8-bit absmax scales: ~0.37 fewer bits per parameter
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all-linear"     # or a comma list, e.g. q_proj,v_proj (GPT-2: c_attn,c_proj,c_fc)
    rslora: bool = False
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1       # the cosine ends at lr * min_lr_ratio
    batch_size: int = 0             # examples per micro-batch; 0: 4 on a GPU, 8 on a CPU
    grad_accum: int = 4             # micro-batches per optimizer step
    max_steps: int = 0              # optimizer steps; 0: derived from epochs
    epochs: float = 1.0
    max_seq_len: int = 0            # longer prompts get their context cut around the answer; 0: 512 GPU, 256 CPU
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"        # adamw | adamw8bit | paged_adamw8bit (bitsandbytes)
    grad_checkpointing: bool = None  # recompute each block in backward; None: on for a GPU, off for a CPU
    holdout: float = 0.0            # share of articles never trained on (evaluate.py --holdout selects them)
    val_fraction: float = 0.05      # share of the remaining articles used for validation loss
    val_max: int = 200              # at most this many validation examples (keeps evaluation cheap)
    eval_every: int = 50            # optimizer steps between validations (and checkpoints)
    patience: int = 0               # stop after this many validations without improvement; 0: never
    limit: int = -1                 # train on at most this many examples; 0: all; -1: all on a GPU, 1000 on a CPU
    unanswerable_share: float = -1.0  # SQuAD v2.0: share of unanswerable training questions; -1: as drawn from the data
    format: str = ""                # prompt format; "": the tokenizer's own (plain, llama2, llama3, chatml)
    device: str = "auto"            # auto: cuda > mps > cpu
    dtype: str = "auto"             # auto: bfloat16 where supported on the device, else float32
    seed: int = 0
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: bool = False    # skip a batch whose loss is NaN / inf instead of stopping
    estimate: bool = False          # print the memory estimate for these settings and exit (loads no weights)


# ----------------------------------------------------------------------------- setup

def validate(cfg):
    """Reject impossible options before anything is loaded."""
    checks = [(cfg.quantize in ("nf4", "fp4", "none"), f"--quantize {cfg.quantize!r}: use nf4, fp4 or none"),
              (cfg.optimizer in ("adamw", "adamw8bit", "paged_adamw8bit"), f"--optimizer {cfg.optimizer!r}"),
              (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"), (cfg.rank > 0, f"--rank must be > 0, got {cfg.rank}"),
              (cfg.max_seq_len > 0, f"--max-seq-len must be > 0, got {cfg.max_seq_len}"),
              (cfg.batch_size > 0 and cfg.grad_accum > 0, "--batch-size and --grad-accum must be > 0"),
              (cfg.max_steps > 0 or cfg.epochs > 0, "give --max-steps > 0 or --epochs > 0"),
              (0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
              (0 <= cfg.holdout < 1 and 0 <= cfg.val_fraction < 1, "--holdout and --val-fraction are in [0, 1)"),
              (cfg.eval_every > 0 and cfg.log_every > 0, "--eval-every and --log-every must be > 0"),
              (cfg.unanswerable_share == -1 or 0 <= cfg.unanswerable_share <= 1,
               f"--unanswerable-share must be in [0, 1] (or -1: as in the data), got {cfg.unanswerable_share}"),
              (cfg.val_max >= 0, f"--val-max must be >= 0, got {cfg.val_max}"),
              (cfg.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {cfg.max_grad_norm}"),
              (cfg.dtype in ("auto", "float32", "bfloat16"), f"--dtype {cfg.dtype!r}: use auto, float32 or bfloat16"),
              (cfg.format in ("", *FORMATS), f"--format {cfg.format!r}: use one of {', '.join(FORMATS)}"),
              (cfg.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"), f"--device {cfg.device!r}: use auto, "
               "cpu, cuda or mps"),
              (not os.path.isfile(cfg.out), f"--out {cfg.out} is a file, not a directory"),
              (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    positions = model_config(cfg.model).max_seq_len
    if cfg.max_seq_len > positions:
        raise UserError(f"--max-seq-len {cfg.max_seq_len} is beyond the model's {positions} positions")
    if cfg.quantize != "none" and resolve_device(cfg.device) == "mps":
        raise UserError("--quantize on MPS: bitsandbytes 4-bit layers need CUDA or a CPU; use --quantize none")
    done = os.path.exists(os.path.join(cfg.out, "checkpoint.pt"))
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{cfg.out} holds an earlier run: pass --resume to continue it or --overwrite")
    if cfg.resume and not done:
        hint = "; the run stopped before its first checkpoint: start it again with --overwrite" \
            if os.path.isdir(cfg.out) and os.listdir(cfg.out) else ""
        raise UserError(f"--resume: no checkpoint.pt in {cfg.out}{hint}")


def resolve_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(name, device):
    if name != "auto":
        return getattr(torch, name)
    # bf16 halves activation memory; on this 2-core AVX512 CPU it also trained SmolLM2 1.5x faster than fp32
    # (490 vs ~330 tokens/s, 8x256 batches). MPS bf16 support is patchy, so fp32 there.
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32   # fp16 would need loss scaling
    return torch.bfloat16 if device == "cpu" else torch.float32


GPU_MODEL = "meta-llama/Llama-3.1-8B-Instruct"     # a chat Llama that trains in 4 bits on one 12 GB+ GPU
CPU_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a real instruct Llama small enough to train on a CPU
LOCAL_CPU_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "smollm2-135m-instruct")


def defaults_for(cfg, device):
    """`cfg` with the fields left empty filled for `device`: the model, the data and the sizes (see --help)."""
    gpu = device.startswith("cuda")
    small = LOCAL_CPU_MODEL if os.path.isdir(LOCAL_CPU_MODEL) else CPU_MODEL
    return dataclasses.replace(
        cfg, model=cfg.model or (GPU_MODEL if gpu else small), data=cfg.data or "squad2",
        quantize=cfg.quantize or ("none" if device == "mps" else "nf4"),     # bitsandbytes has no MPS kernels
        batch_size=cfg.batch_size or (4 if gpu else 8), max_seq_len=cfg.max_seq_len or (512 if gpu else 256),
        limit=cfg.limit if cfg.limit >= 0 else (0 if gpu else 1000),
        # an 8B at 4 x 512 needs ~22 GiB without checkpointing, ~8 GiB with it (--estimate)
        grad_checkpointing=gpu if cfg.grad_checkpointing is None else cfg.grad_checkpointing)


def model_config(name):
    """The Config of a preset name, a model directory or a Hugging Face id (fetching only its config.json)."""
    return Config.preset(name) if name in PRESETS else Config.from_hf(resolve_model(name, config_only=True))


def memory_plan(cfg, name, device, dtype):
    """quant.estimate_memory for model `name` under `cfg`'s settings."""
    return estimate_memory(model_config(name), quantize=None if cfg.quantize == "none" else cfg.quantize,
                           rank=cfg.rank, targets="all-linear" if cfg.targets == "all-linear" else cfg.targets.split(","),
                           batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, dtype=dtype,
                           grad_checkpointing=cfg.grad_checkpointing, dropout=cfg.dropout,
                           double_quant=cfg.double_quant, device=device)


def print_estimate(cfg, device):
    """--estimate: the memory plan of --model (a comma list: a table), from shapes alone."""
    # Planning for a GPU we may not be on: assume one with bf16 (Ampere or newer).
    dtype = torch.bfloat16 if cfg.dtype == "auto" and device == "cuda" else resolve_dtype(cfg.dtype, device)
    plans = {name: memory_plan(cfg, name, device, dtype) for name in cfg.model.split(",")}
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, base {cfg.quantize}, LoRA r={cfg.rank} on "
          f"{cfg.targets}, batch {cfg.batch_size} x {cfg.max_seq_len} tokens, gradient checkpointing "
          f"{'on' if cfg.grad_checkpointing else 'off'}, AdamW")
    if len(plans) == 1:
        print(format_estimate(*plans.values()))
        return
    print("| model | weights | LoRA + AdamW | activations | backward | total |\n|---|--:|--:|--:|--:|--:|")
    for name, e in plans.items():
        print(f"| {name} | " + " | ".join(f"{e[k] / 2**30:.2f} GiB" for k in
                                          ("weights", "lora", "activations", "working", "total")) + " |")


def batches(dataset, batch_size, seed, start, rank=0, world=1):
    """This rank's micro-batches forever, from micro-batch `start` on.

    Each epoch is a fresh seeded permutation, dealt round-robin to the ranks by PyTorch's
    DistributedSampler (one rank: the whole permutation); the ragged end is skipped. The order depends
    only on (seed, index), so a resumed run sees exactly the batches it would have seen, and W ranks with
    batch B together see the same global batches as one process with batch W * B.
    """
    sampler = DistributedSampler(range(len(dataset)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    for index in itertools.count(start):
        epoch, k = divmod(index, per_epoch)
        if k == 0 or index == start:
            sampler.set_epoch(epoch)
            order = list(sampler)
        yield [dataset[i] for i in order[k * batch_size:(k + 1) * batch_size]]


def lr_at(step, cfg, total_steps):
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb
    # 8-bit Adam keeps both moments in uint8 with per-block scales (4x less state); the paged variant
    # lets CUDA evict that state to CPU memory under pressure instead of failing with out-of-memory.
    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- the loss

class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed negative log-likelihood of `targets` (N,) under logits hidden (N, C) @ head_weight.T (V, C),
    `chunk` rows at a time, so only a (chunk, V) block of logits ever exists.

    The cross-entropy and its gradient are written out: -log softmax(z)[y] = logsumexp(z) - z[y], and its
    gradient w.r.t. the logits z is softmax(z) - onehot(y). Each chunk's gradient w.r.t. its hidden rows,
    (softmax - onehot) @ head_weight, is formed in forward while the logits are at hand, and backward only
    scales it: two head matmuls per chunk instead of three for recomputing logits in backward (bench.py,
    vocab 128k, 8x256 all supervised: 1.50x faster training step than checkpointed chunks). The head is
    frozen (LoRA never targets it), so no gradient for head_weight is needed.
    """

    @staticmethod
    def forward(ctx, hidden, head_weight, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for i in range(0, len(targets), chunk):
            h, y = hidden[i:i + chunk], targets[i:i + chunk]
            logits = (h @ head_weight.T).float()                      # (n, V), fp32 for the softmax
            logsumexp = torch.logsumexp(logits, dim=-1)                # (n,)
            total += (logsumexp - logits.gather(-1, y[:, None]).squeeze(-1)).sum()
            if grad_hidden is not None:
                probs = logits.sub_(logsumexp[:, None]).exp_()         # softmax, in the logits' memory
                probs[torch.arange(len(y), device=y.device), y] -= 1   # - onehot(y)
                grad_hidden[i:i + chunk] = probs.to(h.dtype) @ head_weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def masked_loss_sum(model, input_ids, labels, chunk=256):
    """(sum of the NLL over supervised tokens, their count), for one micro-batch.

    Position t predicts token t+1: hidden[:, :-1] is scored against labels[:, 1:]. Only the supervised
    positions reach the LM head, `chunk` at a time, so the (B, T, V) logits tensor never exists: for SQuAD
    most positions are prompt and cost nothing.
    """
    # A chunk holds ~8 bytes per logit (logits in bf16, fp32 for the softmax, the bf16 gradient). bench.py,
    # vocab 128k, 2048 tokens all supervised: chunks of 256 keep the step far below naive full logits'
    # 4017 MiB; larger chunks did not make the head's matmuls measurably faster.
    hidden = model(input_ids, return_hidden=True)[:, :-1]          # (B, T-1, C)
    head_weight = getattr(model, "module", model).lm_head.weight    # under DDP, model is the wrapper
    targets = labels[:, 1:]                                          # (B, T-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]                    # (N, C), (N,)
    return ChunkedCrossEntropy.apply(hidden, head_weight, targets, chunk), len(targets)


@torch.no_grad()
def validation_loss(model, dataset, cfg, pad_id, autocast):
    """Mean NLL per supervised token over the validation set."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(dataset), cfg.batch_size):
        input_ids, labels = collate(dataset[i:i + cfg.batch_size], pad_id)
        with autocast():
            nll, n = masked_loss_sum(model, input_ids.to(model.lm_head.weight.device),
                                     labels.to(model.lm_head.weight.device))
        total, count = total + nll.item(), count + n
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the loop

def train(cfg):
    """Fine-tune LoRA adapters on `cfg.data`; returns the final state dict (step, val losses...)."""
    cfg = defaults_for(cfg, resolve_device(cfg.device))
    if cfg.estimate:
        return print_estimate(cfg, resolve_device(cfg.device))
    validate(cfg)
    rank, world, device = init_distributed(resolve_device(cfg.device))
    main = rank == 0                      # only rank 0 logs, validates, downloads and writes files
    # Only now, every option checked, is anything downloaded (a model or SQuAD named but not cached):
    # rank 0 fetches while the other ranks wait, then they find it in the cache. The barrier also
    # means every rank has checked --out before rank 0 writes to it.
    if world > 1 and not main:
        dist.barrier()
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model), data=resolve_data(cfg.data, "train"))
    if world > 1 and main:
        dist.barrier()
    dtype = resolve_dtype(cfg.dtype, device.split(":")[0])
    say = print if main else (lambda *args, **kwargs: None)

    tok = load_tokenizer(cfg.model)
    fmt = cfg.format or tok.chat_format
    kind, examples = load_examples(cfg.data)
    rest, _heldout = split_examples(examples, cfg.holdout, cfg.seed)
    train_examples, val_examples = split_examples(rest, cfg.val_fraction, cfg.seed)
    train_examples = sample_examples(train_examples, cfg.limit, cfg.unanswerable_share, cfg.seed)
    val_examples = random.Random(cfg.seed).sample(val_examples, min(cfg.val_max, len(val_examples)))
    train_set, stats = prepare(tok, train_examples, fmt, cfg.max_seq_len)
    val_set, _ = prepare(tok, val_examples, fmt, cfg.max_seq_len)
    if len(train_set) < cfg.batch_size:
        raise UserError(f"{cfg.data}: {len(train_set)} training examples fit in --max-seq-len "
                        f"{cfg.max_seq_len}, fewer than --batch-size {cfg.batch_size}")
    steps_per_epoch = max(1, len(train_set) // (cfg.batch_size * cfg.grad_accum * world))
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))

    say(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, base {cfg.quantize}, format {fmt}"
        + (f", {world} ranks" if world > 1 else ""))
    say(format_estimate(memory_plan(cfg, cfg.model, device.split(":")[0], dtype)))
    model = load_model(cfg.model, quantize=None if cfg.quantize == "none" else cfg.quantize,
                       device=device, dtype=dtype, double_quant=cfg.double_quant)
    targets = "all-linear" if cfg.targets == "all-linear" else cfg.targets.split(",")
    torch.manual_seed(cfg.seed)                       # the same LoRA init on every rank
    lora_names = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, targets, cfg.rslora)
    if any(name.endswith("lm_head") for name in lora_names):
        raise UserError("--targets: LoRA on lm_head is not supported; the loss takes the head as frozen")
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    use_bf16 = dtype == torch.bfloat16 and device.startswith("cuda")
    autocast = lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    # Data parallel: DDP averages the gradients of the trainable (LoRA) parameters across ranks in
    # backward; the frozen 4-bit base is loaded by every rank and never communicated after the start.
    ddp = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda")
                                  else None, broadcast_buffers=False) if world > 1 else model

    state = dict(step=0, best_val=float("inf"), bad_evals=0, last_eval=-1, tokens=0)
    if cfg.resume:
        state = load_checkpoint(cfg, model, optimizer)
    if not main:
        return train_loop(cfg, ddp, model, optimizer, state, train_set, val_set, tok, total_steps, rank, world,
                          device, autocast, say)
    prepare_out_dir(cfg, state["step"], dict(config=dataclasses.asdict(cfg), format=fmt, kind=kind, data_stats=stats,
                                             n_train=len(train_set), n_val=len(val_set), total_steps=total_steps))

    print(f"{format_memory_report(memory_report(model))}")
    print(format_parameter_report(parameter_report(model)))
    print(f"train {len(train_set)} examples ({stats['n_truncated']} contexts cut, {stats['n_dropped']} "
          f"dropped as too long), val {len(val_set)}, {total_steps} steps of "
          f"{cfg.batch_size}x{cfg.grad_accum}x{world} examples")
    print("first example, supervised tokens in [[ ]]:\n" + show_example(tok, train_set[0]["input_ids"],
                                                                         train_set[0]["labels"]))
    return train_loop(cfg, ddp, model, optimizer, state, train_set, val_set, tok, total_steps, rank, world,
                      device, autocast, say)


def train_loop(cfg, ddp, model, optimizer, state, train_set, val_set, tok, total_steps, rank, world, device,
               autocast, say):
    """The optimizer steps, run by every rank; `ddp` is `model`, wrapped in DDP when there are several ranks."""
    main = rank == 0
    params = [p for p in model.parameters() if p.requires_grad]
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))   # finish the step, then save
    stream = batches(train_set, cfg.batch_size, cfg.seed, state["step"] * cfg.grad_accum, rank, world)
    pad_id = tok.pad_id
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not (main and sys.stderr.isatty()))
    t0, tokens_since = time.time(), 0
    stopped_early = bool(cfg.patience) and state["bad_evals"] >= cfg.patience   # resumed after it stopped
    while not stopped_early and state["step"] < total_steps:
        step = state["step"]
        # 1. learning rate for this step
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 2. validate (step 0 gives the base model's loss) and checkpoint, on rank 0
        if step % cfg.eval_every == 0 and state["last_eval"] != step:
            keep_going = evaluate_and_checkpoint(cfg, model, optimizer, state, val_set, pad_id, autocast) \
                if main else True
            if all_ranks_sum(not keep_going, world, device) > 0:       # rank 0 decides for all
                say(f"early stopping at step {step}: no improvement in {cfg.patience} validations")
                stopped_early = True
                break
            state["last_eval"] = step
        # 3. accumulate gradients over micro-batches, each token weighted equally across the window
        # (and across ranks: DDP averages gradients, so each rank scales by world / global token count)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)    # dropout: resumable, per rank
        raw = [next(stream) for _ in range(cfg.grad_accum)]
        window = [collate(batch, pad_id) for batch in raw]
        n_window = all_ranks_sum(sum(int((lab[:, 1:] != IGNORE_INDEX).sum()) for _, lab in window), world, device)
        loss_sum = 0.0
        for i, (input_ids, labels) in enumerate(window):
            # Gradients are all-reduced only after the last micro-batch of the window.
            sync = ddp.no_sync() if world > 1 and i < len(window) - 1 else contextlib.nullcontext()
            with sync, autocast():
                nll, _ = masked_loss_sum(ddp, input_ids.to(device), labels.to(device))
                (nll * world / n_window).backward()
            loss_sum += nll.item()
        loss = all_ranks_sum(loss_sum, world, device) / n_window
        # 4. clip, step, zero; a NaN / inf loss or gradient must never reach the weights (nor a checkpoint)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if cfg.skip_nonfinite:
                say(f"step {step}: loss {loss}, gradient norm {grad_norm}: batch skipped")
                if main:
                    log_metrics(cfg, dict(step=step + 1, skipped="non-finite loss or gradient"))
                state["step"] += 1
                continue
            raise UserError(f"step {step}: loss {loss}, gradient norm {grad_norm}; stopped. The last good "
                            f"checkpoint is {os.path.join(cfg.out, 'checkpoint.pt')} (--resume --skip-nonfinite "
                            "continues from it, skipping such batches)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        n_tokens = all_ranks_sum(sum(len(ex["input_ids"]) for batch in raw for ex in batch), world, device)
        state["tokens"] += n_tokens
        tokens_since += n_tokens
        # 5. log
        if main and (state["step"] % cfg.log_every == 0 or state["step"] == total_steps):
            elapsed = time.time() - t0
            record = dict(step=state["step"], loss=round(loss, 5), lr=lr, grad_norm=round(grad_norm, 4),
                          tokens_per_s=round(tokens_since / elapsed, 1), peak_mem_mb=round(peak_memory_mb(device)))
            log_metrics(cfg, record)
            if bar.disable:
                print(json.dumps(record))
            else:
                bar.set_postfix(loss=f"{loss:.4f}")
            t0, tokens_since = time.time(), 0
        bar.update(1)
        if all_ranks_sum(len(interrupted), world, device):
            if main:
                save_checkpoint(cfg, model, optimizer, state)
            say(f"interrupted: checkpoint saved at step {state['step']} in {cfg.out}; --resume continues")
            finish(world)
            sys.exit(130)
    if main:
        if not stopped_early and state["last_eval"] != state["step"]:   # resumed after the final checkpoint
            evaluate_and_checkpoint(cfg, model, optimizer, state, val_set, pad_id, autocast)
        save_adapter(model, os.path.join(cfg.out, "final"), base_model_path=os.path.abspath(cfg.model),
                     overwrite=True)
        print(f"done: {state['step']} steps, best val loss {state['best_val']:.4f}; adapters in "
              f"{cfg.out}/best and {cfg.out}/final")
    finish(world)
    return state


def evaluate_and_checkpoint(cfg, model, optimizer, state, val_set, pad_id, autocast):
    """Validate, keep the best adapter, write the checkpoint; False when patience has run out."""
    state["last_eval"] = state["step"]
    if val_set:
        val = validation_loss(model, val_set, cfg, pad_id, autocast)
        log_metrics(cfg, dict(step=state["step"], val_loss=round(val, 5)))
        print(f"step {state['step']}: val loss {val:.4f}")
        if val < state["best_val"]:
            state["best_val"], state["bad_evals"] = val, 0
            save_adapter(model, os.path.join(cfg.out, "best"), base_model_path=os.path.abspath(cfg.model),
                         overwrite=True)
        else:
            state["bad_evals"] += 1
    save_checkpoint(cfg, model, optimizer, state)
    return not (cfg.patience and state["bad_evals"] >= cfg.patience)


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux reports KiB


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 through run_cli, like every other UserError
        raise UserError(message)


def parse_args(argv=None):
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run_cli(lambda: train(parse_args()))
