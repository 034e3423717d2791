"""Benchmark: ours against the Hugging Face stack (transformers + peft + bitsandbytes) for QLoRA.

    python bench.py                              # everything (about half an hour on a 2-core CPU)
    python bench.py --only train,loss --repeats 5
    python bench.py --quick                      # a tiny random model: checks that the benchmark runs

Both sides get the same model config, the same weights (one checkpoint on disk), 4-bit NF4 with double
quantization, LoRA r=16 / alpha 32 / dropout 0.05 on every linear but the head, and the same batches.
Speed: both models live in one process and their runs alternate (ours, theirs, theirs, ours, ...), so a
machine shared with other jobs slows both alike; a figure is the median over --repeats runs and the ratio
is the median of the per-pair ratios. Memory: each side runs alone in a fresh subprocess. On the CPU it
is the process's peak resident memory (Linux VmHWM, reset just before the measured region, so it counts
the model, the libraries and everything else resident); on CUDA it is torch's peak allocated memory.
--quick runs every measurement in one process, for speed: its memory figures are not comparable.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import IGNORE_INDEX
from lora import apply_lora
from model import Config, Transformer, load_model
from quant import memory_report
from train import masked_loss_sum, resolve_device, resolve_dtype

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "bench")       # random checkpoints, written once (git-ignored)
SMOLLM = os.path.join(ROOT, "weights", "smollm2-135m-instruct")
SQUAD = os.path.join(ROOT, "..", "shared", "assets", "squad", "dev-v1.1.json")
LORA = dict(rank=16, alpha=32.0, dropout=0.05)
# Random Llama checkpoints (bf16). 300m-128k: Llama 3's vocabulary, where the LM head and the loss dominate.
RANDOM_MODELS = {
    "tiny": dict(vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256,
                 max_seq_len=512, tie_embeddings=True),
    "llama-300m-128k": dict(vocab_size=128256, dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, hidden_dim=2816,
                            max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama-500m": dict(vocab_size=32000, dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, hidden_dim=4096,
                       max_seq_len=4096),
}


# ----------------------------------------------------------------------------- memory and processes

def reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: "5" resets VmHWM to the current RSS
            f.write("5")


def memory_mb(device, peak=True):
    """Peak (VmHWM) or current (VmRSS) resident memory of this process in MiB; on CUDA, allocated memory."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_task(args, task, **kwargs):
    """TASKS[task](**kwargs) in a fresh Python process (in this one with --quick), its result a dict."""
    if args.quick:
        return TASKS[task](**kwargs)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps([task, kwargs]),
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"bench worker {task} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- models and data

def random_checkpoint(name, shard_mb=200):
    """A random bf16 Llama checkpoint in Hugging Face format (sharded, with an index) in .cache/bench."""
    path = os.path.join(CACHE, name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from safetensors.torch import save_file
    cfg = Config(**RANDOM_MODELS[name])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(cfg).named_parameters()}  # a tied head appears once
    g = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0
    for n, shape in shapes.items():
        w = torch.ones(shape) if n.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[n] = w.to(torch.bfloat16)
        size += 2 * w.numel()
        if size >= shard_mb * 2**20 or n == list(shapes)[-1]:
            shards.append(shard)
            shard, size = {}, 0
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(dict(metadata={}, weight_map=weight_map), f)
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
              hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", dtype="bfloat16",
              bos_token_id=1, eos_token_id=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    os.replace(tmp, path)
    return path


def model_path(name):
    return SMOLLM if name == "smollm2-135m" else random_checkpoint(name)


def ours_model(path, device, dtype, lora=True):
    torch.manual_seed(0)
    model = load_model(path, quantize="nf4", device=device, dtype=dtype)
    if lora:
        apply_lora(model, LORA["rank"], LORA["alpha"], LORA["dropout"], "all-linear")
    return model


def import_theirs():
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def theirs_model(path, device, dtype, lora=True):
    """transformers' 4-bit model (bitsandbytes NF4, double quant), wrapped by peft if `lora`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, device_map=device)
    if not lora:
        return model
    return get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def make_batch(vocab, batch, seq, supervised, device, seed=0):
    """(input_ids, labels) of shape (B, T), random tokens. "squad": a masked prompt then 10-20 supervised
    answer tokens per row (as data.py builds SQuAD examples); "all": every token supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (batch, seq), generator=g)
    labels = ids.clone()
    if supervised == "squad":
        n_answer = torch.randint(10, 21, (batch, 1), generator=g)
        labels[torch.arange(seq) < seq - n_answer] = IGNORE_INDEX
    return ids.to(device), labels.to(device)


def ours_step(model, optimizer, ids, labels):
    nll, n = masked_loss_sum(model, ids, labels)
    loss = nll / n
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def theirs_step(model, optimizer, ids, labels):
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss   # mean over supervised tokens
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def trainer(side, path, device, dtype):
    """(step function, model, optimizer) for one side, in training mode."""
    model = (ours_model if side == "ours" else theirs_model)(path, device, dtype).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return (ours_step if side == "ours" else theirs_step), model, optimizer


# ----------------------------------------------------------------------------- the measurements (workers)

def matmul_flops(device, dtype, n=2048, reps=5):
    """This machine's FLOP/s on a large matmul in `dtype`, now (best of a few)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def task_train_speed(model, device, dtype, batch, seq, supervised, repeats):
    """Tokens/s of both sides, alternating in this process, with the matmul FLOP/s measured between runs."""
    path = model_path(model)
    dtype = getattr(torch, dtype)
    import_theirs()
    sides = {side: trainer(side, path, device, dtype) for side in ("ours", "theirs")}
    ids, labels = make_batch(Config.from_hf(path).vocab_size, batch, seq, supervised, device)
    # Warm-up, and a check that both compute the same thing: with LoRA's B = 0 the first loss is the base's.
    first_loss = {side: step(m, opt, ids, labels) for side, (step, m, opt) in sides.items()}
    tokens_s, flops = {"ours": [], "theirs": []}, []
    for r in range(repeats):
        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            step, m, opt = sides[side]
            t0 = time.perf_counter()
            step(m, opt, ids, labels)
            tokens_s[side].append(ids.numel() / (time.perf_counter() - t0))
        flops.append(matmul_flops(device, dtype))
    return dict(tokens_s=tokens_s, first_loss=first_loss, matmul_flops=flops,
                supervised_fraction=float((labels[:, 1:] != IGNORE_INDEX).float().mean()))


def task_train_memory(side, model, device, dtype, batch, seq, supervised):
    """Peak memory of one training step (after a warm-up step), one side alone in this process."""
    path = model_path(model)
    import_theirs()   # both sides import the same libraries, so their baselines match
    step, m, opt = trainer(side, path, device, getattr(torch, dtype))
    ids, labels = make_batch(Config.from_hf(path).vocab_size, batch, seq, supervised, device)
    step(m, opt, ids, labels)
    before = memory_mb(device, peak=False)
    reset_peak(device)
    step(m, opt, ids, labels)
    return dict(peak_mb=memory_mb(device), before_mb=before)


def task_load(side, model, device, dtype):
    """Wall time and peak memory of loading a bf16 checkpoint to NF4 (double quant), one side alone."""
    path = model_path(model)
    dtype = getattr(torch, dtype)
    if side == "theirs":
        import_theirs()     # imports are not loading: done before the clock and the baseline
        import peft  # noqa: F401
    before = memory_mb(device, peak=False)
    reset_peak(device)
    t0 = time.perf_counter()
    m = (ours_model if side == "ours" else theirs_model)(path, device, dtype, lora=False)
    sync(device)
    seconds = time.perf_counter() - t0
    size = memory_report(m)["total_bytes"] if side == "ours" else m.get_memory_footprint()
    return dict(seconds=seconds, peak_mb=memory_mb(device), before_mb=before, model_mb=size / 2**20)


def prompts_for(path, n, max_seq_len=512, max_new_tokens=32):
    """(prompts, stop ids, pad id): SQuAD v1.1 dev questions in the model's chat format if the
    checkpoint has a tokenizer, else random token ids of SQuAD-like lengths."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        g = torch.Generator().manual_seed(0)
        vocab = Config.from_hf(path).vocab_size
        return [torch.randint(3, vocab, (int(L),), generator=g).tolist()
                for L in torch.randint(20, 60, (n,), generator=g)], {2}, 0
    import data
    from tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    examples = data.load_examples(SQUAD)[1][:n]
    prompts = [data.encode_prompt(tok, ex, tok.chat_format, max_seq_len, max_new_tokens)[0] for ex in examples]
    return prompts, tok.stop_ids, tok.pad_id


def theirs_generate(model, prompts, max_new_tokens, stop_ids, pad_id, prompt_lookup=None):
    """Greedy continuations by model.generate on a left-padded batch, cut at the first stop id."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=sorted(stop_ids),
                         pad_token_id=pad_id, prompt_lookup_num_tokens=prompt_lookup)
    results = []
    for row in out[:, L:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results


# Generation variants: (side, prompt lookup draft length). At batch 1 both sides also run prompt lookup
# decoding (ours: generate.generate_with_lookup; theirs: model.generate's prompt_lookup_num_tokens).
DRAFT = 8
VARIANTS = {"ours": ("ours", 0), "theirs": ("theirs", 0), "ours lookup": ("ours", DRAFT),
            "theirs lookup": ("theirs", DRAFT)}


def task_generate(model, device, dtype, batch_sizes, n_prompts, max_new_tokens, repeats):
    """Answers/s and tokens/s of batched greedy generation, all variants alternating in this process."""
    from generate import generate
    path = model_path(model)
    dtype = getattr(torch, dtype)
    import_theirs()
    models = {"ours": ours_model(path, device, dtype).eval(), "theirs": theirs_model(path, device, dtype).eval()}
    prompts, stop_ids, pad_id = prompts_for(path, n_prompts, max_new_tokens=max_new_tokens)

    def run(variant, batch):
        side, draft = VARIANTS[variant]
        answers = []
        for i in range(0, len(prompts), batch):
            rows = prompts[i:i + batch]
            if side == "ours":
                answers += generate(models[side], rows, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                    pad_id=pad_id, prompt_lookup=draft)
            else:
                with torch.no_grad():
                    answers += theirs_generate(models[side], rows, max_new_tokens, stop_ids, pad_id, draft or None)
        return answers

    results = {}
    for batch in batch_sizes:
        variants = list(VARIANTS) if batch == 1 else ["ours", "theirs"]
        answers, answers_s, tokens_s = {}, {v: [] for v in variants}, {v: [] for v in variants}
        for r in range(repeats + 1):        # run 0 warms up
            for variant in variants if r % 2 == 0 else variants[::-1]:
                t0 = time.perf_counter()
                answers[variant] = run(variant, batch)
                seconds = time.perf_counter() - t0
                if r:
                    answers_s[variant].append(len(prompts) / seconds)
                    # tokens generated, each answer's stop token included
                    tokens_s[variant].append(sum(min(len(a) + 1, max_new_tokens) for a in answers[variant]) / seconds)
        same = {v: sum(a == b for a, b in zip(answers[v], answers["ours"])) / len(prompts) for v in variants}
        results[str(batch)] = dict(answers_s=answers_s, tokens_s=tokens_s, same_as_ours=same)
    return results


class _FixedHidden(nn.Module):
    """Stands in for the transformer in masked_loss_sum: returns given final hidden states."""

    def __init__(self, hidden, lm_head):
        super().__init__()
        self.hidden, self.lm_head = hidden, lm_head

    def forward(self, idx, return_hidden):
        return self.hidden


def task_loss(side, device, dtype, vocab, dim, seq):
    """Peak memory of the loss alone (forward + backward to the hidden states), every position supervised:
    ours is train.masked_loss_sum (chunked, recomputed), theirs the naive fp32 logits + F.cross_entropy."""
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    head = nn.Linear(dim, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)  # frozen
    hidden = torch.randn(1, seq, dim, device=device, dtype=dtype, requires_grad=True)          # (B, T, C)
    labels = torch.randint(vocab, (1, seq), device=device)
    before = memory_mb(device, peak=False)
    reset_peak(device)
    t0 = time.perf_counter()
    if side == "ours":
        nll, n = masked_loss_sum(_FixedHidden(hidden, head), labels, labels)
        loss = nll / n
    else:
        logits = head(hidden).float()                                                         # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    sync(device)
    return dict(seconds=time.perf_counter() - t0, peak_mb=memory_mb(device), before_mb=before, loss=loss.item())


TASKS = dict(train_speed=task_train_speed, train_memory=task_train_memory, load=task_load,
             generate=task_generate, loss=task_loss)


# ----------------------------------------------------------------------------- the report

def train_flops_per_token(cfg, seq, supervised_fraction, rank):
    """FLOPs our QLoRA step executes per token: the frozen base's matmuls forward and for the input
    gradient (4N), attention (forward + twice that backward), LoRA (forward, input and weight gradients)
    and the LM head at supervised positions only, run twice (logits, and their gradient formed in forward)."""
    C, H, hs, L = cfg.dim, cfg.hidden_dim, cfg.head_dim, cfg.n_layers
    q, kv = cfg.n_heads * hs, cfg.n_kv_heads * hs
    base = C * (2 * q + 2 * kv) + 3 * C * H                              # per layer: q, k, v, o, gate, up, down
    lora = rank * (7 * C + 2 * q + 2 * kv + 3 * H)                        # r * (in + out) summed over them
    attention = 2 * 2 * (seq / 2) * q                                     # QK^T and AV, causal: seq/2 keys
    per_layer = 4 * base + 6 * lora + 3 * attention
    return L * per_layer + 2 * 2 * C * cfg.vocab_size * supervised_fraction


def median_ratio(ours, theirs):
    return statistics.median(o / t for o, t in zip(ours, theirs))


class Report:
    """Rows of (measurement, ours, theirs, ours/theirs, target), printed as they come and as markdown."""

    def __init__(self):
        self.rows, self.notes = [], []

    def add(self, name, ours, theirs, ratio=None, target=None, fmt="{:.1f}"):
        ratio = ours / theirs if ratio is None else ratio
        goal = ""
        if target is not None:   # (">=", 1.3): ratio >= 1.3 meets it
            op, value = target
            goal = f"{op} {value} " + ("met" if (ratio >= value if op == ">=" else ratio <= value) else "NOT met")
        row = [name, fmt.format(ours), fmt.format(theirs), f"{ratio:.2f}", goal]
        self.rows.append(row)
        print(f"{row[0]:<58} {row[1]:>10} {row[2]:>10} {row[3]:>7}  {row[4]}", flush=True)

    def note(self, text):
        self.notes.append(text)
        print(text, flush=True)

    def markdown(self):
        lines = ["| measurement | ours | theirs | ours / theirs | target |", "| --- | ---: | ---: | ---: | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"


def bench_train(report, args, models, batch, seq, masks=("squad", "all")):
    for name in models:
        path = model_path(name)
        for supervised in masks:
            label = f"train {name} {batch}x{seq} {supervised}"
            kw = dict(model=name, device=args.device, dtype=args.dtype, batch=batch, seq=seq, supervised=supervised)
            speed = run_task(args, "train_speed", repeats=args.repeats, **kw)
            mem = {side: run_task(args, "train_memory", side=side, **kw) for side in ("ours", "theirs")}
            t = speed["tokens_s"]
            report.add(f"{label}: tokens/s", statistics.median(t["ours"]), statistics.median(t["theirs"]),
                       median_ratio(t["ours"], t["theirs"]), (">=", 1.3))
            report.add(f"{label}: peak MiB", mem["ours"]["peak_mb"], mem["theirs"]["peak_mb"],
                       target=("<=", 1.0), fmt="{:.0f}")
            report.add(f"{label}: step MiB above the resident model", mem["ours"]["peak_mb"] - mem["ours"]["before_mb"],
                       mem["theirs"]["peak_mb"] - mem["theirs"]["before_mb"], fmt="{:.0f}")
            flops = train_flops_per_token(Config.from_hf(path), seq, speed["supervised_fraction"], LORA["rank"])
            utilization = [flops * o / f for o, f in zip(t["ours"], speed["matmul_flops"])]
            loss = speed["first_loss"]
            report.note(f"{label}: first loss ours {loss['ours']:.4f}, theirs {loss['theirs']:.4f}; ours runs "
                        f"{flops / 1e9:.2f} GFLOP/token = {statistics.median(utilization):.0%} of a "
                        f"{args.dtype} {statistics.median(speed['matmul_flops']) / 1e9:.0f} GFLOP/s matmul")


def bench_load(report, args, models):
    for name in models:
        runs = {"ours": [], "theirs": []}
        for r in range(args.repeats):
            for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                runs[side].append(run_task(args, "load", side=side, model=name, device=args.device, dtype=args.dtype))
        med = {side: {k: statistics.median(x[k] for x in v) for k in v[0]} for side, v in runs.items()}
        o, t = med["ours"], med["theirs"]
        report.add(f"load {name} bf16 -> nf4: seconds", o["seconds"], t["seconds"],
                   median_ratio([x["seconds"] for x in runs["ours"]], [x["seconds"] for x in runs["theirs"]]))
        report.add(f"load {name}: peak MiB", o["peak_mb"], t["peak_mb"], target=("<=", 0.5), fmt="{:.0f}")
        report.add(f"load {name}: peak MiB above the process before loading", o["peak_mb"] - o["before_mb"],
                   t["peak_mb"] - t["before_mb"], target=("<=", 0.5), fmt="{:.0f}")
        report.add(f"load {name}: quantized model MiB", o["model_mb"], t["model_mb"])


def bench_generate(report, args, name, batch_sizes, n_prompts, max_new_tokens):
    res = run_task(args, "generate", model=name, device=args.device, dtype=args.dtype, batch_sizes=batch_sizes,
                        n_prompts=n_prompts, max_new_tokens=max_new_tokens, repeats=args.repeats)
    for batch, r in res.items():
        a, t = r["answers_s"], r["tokens_s"]
        # (ours, theirs, target). At batch 1: ours with prompt lookup against theirs as users run it, against
        # theirs with prompt lookup too, and both without it.
        pairs = [("ours", "theirs", (">=", 1.5))]
        if batch == "1":
            pairs = [("ours lookup", "theirs", (">=", 1.5)), ("ours lookup", "theirs lookup", None),
                     ("ours", "theirs", None)]
        for ours, theirs, target in pairs:
            label = f"generate {name} greedy, {n_prompts} prompts, batch {batch}"
            if batch == "1":
                label += f", {ours} vs {theirs}"
            report.add(f"{label}: answers/s", statistics.median(a[ours]), statistics.median(a[theirs]),
                       median_ratio(a[ours], a[theirs]), target, fmt="{:.2f}")
            report.add(f"{label}: tokens/s", statistics.median(t[ours]), statistics.median(t[theirs]),
                       median_ratio(t[ours], t[theirs]))
        same = ", ".join(f"{v} {share:.0%}" for v, share in r["same_as_ours"].items() if v != "ours")
        report.note(f"generate batch {batch}: answers token-for-token the same as ours (no lookup): {same}")


def bench_loss(report, args, vocab, dim, seq):
    runs = {"ours": [], "theirs": []}
    for r in range(args.repeats):
        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            runs[side].append(run_task(args, "loss", side=side, device=args.device, dtype=args.dtype, vocab=vocab,
                                            dim=dim, seq=seq))
    extra = {side: statistics.median(x["peak_mb"] - x["before_mb"] for x in v) for side, v in runs.items()}
    peak = {side: statistics.median(x["peak_mb"] for x in v) for side, v in runs.items()}
    label = f"loss alone, vocab {vocab}, C {dim}, seq {seq}, all supervised"
    report.add(f"{label}: peak MiB", peak["ours"], peak["theirs"], fmt="{:.0f}")
    report.add(f"{label}: step MiB above weights and input", extra["ours"], extra["theirs"],
               target=("<=", 0.25), fmt="{:.0f}")
    seconds = {side: [x["seconds"] for x in v] for side, v in runs.items()}
    report.add(f"{label}: seconds", statistics.median(seconds["ours"]), statistics.median(seconds["theirs"]),
               median_ratio(seconds["ours"], seconds["theirs"]), fmt="{:.2f}")
    report.note(f"{label}: loss ours {runs['ours'][0]['loss']:.4f}, naive {runs['theirs'][0]['loss']:.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="train,load,generate,loss", help="comma list of the sections to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, one repeat: checks it runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="compute dtype; auto: bfloat16 where supported")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default, one per core); on a machine shared with other jobs "
                             "1 avoids threads waiting on each other (a 2-core step took 47 s with 2, 6 s with 1)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        task, kwargs = json.loads(args.worker)
        print(json.dumps(TASKS[task](**kwargs)))
        return
    args.device = resolve_device(args.device)
    args.dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    if args.quick:
        args.repeats = 1
    sections = args.only.split(",")
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    report = Report()
    report.note(f"bench.py{' --quick' if args.quick else ''}: {machine}, torch {torch.__version__}, "
                f"device {args.device}, {args.dtype}, {torch.get_num_threads()} CPU threads, {args.repeats} repeats; "
                f"load average at start {os.getloadavg()[0]:.1f} (if other jobs share the machine, compare ratios)"
                + ("; --quick: one process, so the memory figures are not comparable" if args.quick else ""))
    print(f"{'measurement':<58} {'ours':>10} {'theirs':>10} {'ratio':>7}  target")
    if "train" in sections:
        if args.quick:
            bench_train(report, args, ["tiny"], 2, 64, masks=["squad"])
        else:
            bench_train(report, args, ["smollm2-135m", "llama-300m-128k"], 8, 256)
    if "load" in sections:
        bench_load(report, args, ["tiny"] if args.quick else ["smollm2-135m", "llama-500m"])
    if "generate" in sections:
        if args.quick:
            bench_generate(report, args, "tiny", [1, 4], 4, 8)
        else:
            bench_generate(report, args, "smollm2-135m", [1, 16], 16, 32)
    if "loss" in sections:
        bench_loss(report, args, *((1024, 64, 256) if args.quick else (128256, 2048, 2048)))
    report.note(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown())


if __name__ == "__main__":
    main()
