"""Evaluation: the official SQuAD scores of a predictions file, or of a model's greedy answers with
their latency, throughput and memory; free-form metrics and answer perplexity for instruction data.

  python evaluate.py --data dev-v2.0.json --predictions pred.json       # the official script's output
  python evaluate.py --model M --adapter A --data dev-v2.0.json --compare --out results
  python evaluate.py --model M --adapter A --ask --context "..." --question "..."
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics
from errors import UserError, run_cli, write_atomic
from download import SQUAD_NAMES, resolve_data, resolve_model
from generate import generate
from lora import load_adapter, lora_disabled
from model import Config, load_model
from tokenizer import load_tokenizer

RUN_FILE = "run.json"  # train.py's settings, in its --out folder, the parent of the adapters best/ and final/
DEFAULT_NEW_TOKENS = {"squad1": 32, "squad2": 32, "instruct": 256}  # SQuAD answers are short spans
LATENCY_NOTE = "per question: wall time of the batch it was generated in"


def peak_memory(device):
    """(bytes, what): CUDA's peak of allocated tensors, else the peak RSS of the whole process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"  # Linux: KiB


def _sync(device):
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def generate_answers(model, tok, prompts, *, batch_size, max_new_tokens, prompt_lookup=0):
    """Greedy continuations of token-id prompts: (texts, stopped, seconds per prompt, tokens, total s).

    Batches are formed longest prompt first, so a batch holds similar lengths (little padding) and an
    out-of-memory error shows in the first batch."""
    device = model.lm_head.weight.device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts, stopped, seconds = [""] * len(prompts), [False] * len(prompts), [0.0] * len(prompts)
    tokens, total = 0, 0.0
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch"):
        rows = order[start:start + batch_size]
        _sync(device)
        t0 = time.perf_counter()
        outs = generate(model, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                        stop_ids=tok.stop_ids, pad_id=tok.pad_id, prompt_lookup=prompt_lookup)  # greedy
        _sync(device)
        dt = time.perf_counter() - t0
        total += dt
        for i, out in zip(rows, outs):
            stopped[i] = len(out) < max_new_tokens  # `out` excludes the stop token it ended with
            texts[i], seconds[i] = tok.decode(out, skip_special=True), dt
            tokens += len(out) + stopped[i]
    return texts, stopped, seconds, tokens, total


@torch.no_grad()
def answer_perplexity(model, tok, examples, *, fmt, max_seq_len, batch_size, chunk=1024):
    """(perplexity, mean NLL, tokens, dropped) of the reference answers, teacher-forced: only the
    supervised tokens of data.encode_for_training count (the answer and its end token)."""
    encoded, stats = data.prepare(tok, examples, fmt, max_seq_len)
    device = model.lm_head.weight.device
    nll, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        ids, labels = (t.to(device) for t in data.collate(encoded[start:start + batch_size], tok.pad_id))
        hidden = model(ids, return_hidden=True)[:, :-1]           # (B, T-1, C): position t predicts t+1
        targets = labels[:, 1:]                                    # (B, T-1)
        keep = targets != data.IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]              # (N, C), (N,) supervised only
        # The head in chunks: (N, vocab) fp32 logits at once would be 4 GB for N=8k, vocab 128k.
        for j in range(0, len(targets), chunk):
            logits = model.lm_head(hidden[j:j + chunk]).float()   # (chunk, vocab)
            nll += F.cross_entropy(logits, targets[j:j + chunk], reduction="sum").item()
        count += len(targets)
    if count == 0:
        raise UserError(f"no reference answer fits in --max-seq-len {max_seq_len}")
    return math.exp(nll / count), nll / count, count, stats["n_dropped"]


def squad_json(examples, kind):
    """A SQuAD dataset of just `examples` (one paragraph each, in their order) for the official scoring."""
    def qa(ex):
        answers = [{"text": a, "answer_start": s} for a, s in zip(ex.answers, ex.answer_starts)]
        return {"id": ex.id, "question": ex.question, "answers": answers, "is_impossible": ex.is_impossible}
    return {"version": "1.1" if kind == "squad1" else "v2.0",
            "data": [{"title": ex.title, "paragraphs": [{"context": ex.context, "qas": [qa(ex)]}]}
                     for ex in examples]}


def evaluate_model(model, tok, examples, kind, *, fmt, batch_size, max_new_tokens, max_seq_len, prompt_lookup):
    """Greedy answers to `examples` and their scores: (predictions {id: answer}, report).

    SQuAD: official scores (+ abstention for v2.0). Instruction data: token F1, ROUGE-L, BLEU and the
    perplexity of the reference answers. Plus latency, tokens/s, peak memory and truncation counts."""
    device = model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encoded = [data.encode_prompt(tok, ex, fmt, max_seq_len, max_new_tokens) for ex in examples]
    texts, stopped, seconds, tokens, total = generate_answers(
        model, tok, [ids for ids, _ in encoded], batch_size=batch_size, max_new_tokens=max_new_tokens,
        prompt_lookup=prompt_lookup)
    if kind == "instruct":
        predictions = {ex.id: text.strip() for ex, text in zip(examples, texts)}
        scores = metrics.freeform_scores([ex.answers[0] for ex in examples], list(predictions.values()))
        ppl, nll, n_tokens, dropped = answer_perplexity(model, tok, examples, fmt=fmt, max_seq_len=max_seq_len,
                                                        batch_size=batch_size)
        report = dict(f1=scores["f1"], rougeL=scores["rougeL"], bleu=scores["bleu"], perplexity=ppl,
                      answer_nll=nll, answer_tokens=n_tokens, perplexity_dropped=dropped)
    else:
        predictions = {ex.id: data.answer_from_generation(text) for ex, text in zip(examples, texts)}
        dataset = squad_json(examples, kind)
        scores = metrics.squad_scores(dataset, predictions)
        report = dict(em=scores.get("exact_match", scores.get("exact")), f1=scores["f1"])
        if kind == "squad2":
            # An output "parsed" when the model ended its answer (end token or line break) in time.
            parsed = {ex.id: s or "\n" in t.strip() for ex, s, t in zip(examples, stopped, texts)}
            report["abstention"] = metrics.abstention_metrics(dataset, predictions, parsed)
    memory, measure = peak_memory(device)
    p50, p95 = np.percentile(seconds, [50, 95]).tolist()
    report.update(
        scores=scores, questions=len(examples), truncated=sum(t for _, t in encoded),
        unfinished=len(examples) - sum(stopped),  # still talking after max_new_tokens
        latency_s=dict(p50=p50, p95=p95, mean=float(np.mean(seconds)), note=LATENCY_NOTE),
        generated_tokens=tokens, generation_s=total, tokens_per_s=tokens / total if total else 0.0,
        peak_memory_bytes=memory, peak_memory_measure=measure)
    return predictions, report


def select_examples(examples, *, holdout=None, seed=0, limit=None):
    """The held-out articles (the `data.split_examples` call train.py makes), then a seeded sample of
    `limit` of them, kept in file order: the official scripts sum scores in that order."""
    if holdout:
        _, examples = data.split_examples(examples, holdout, seed)
    if limit and limit < len(examples):
        keep = set(random.Random(seed).sample(range(len(examples)), limit))
        examples = [ex for i, ex in enumerate(examples) if i in keep]
    return examples


def format_table(runs, kind):
    """One row per run (base, fine-tuned), with the columns of published SQuAD / QA results tables."""
    cols = {"instruct": [("F1", "f1"), ("ROUGE-L", "rougeL"), ("BLEU", "bleu"), ("PPL", "perplexity")],
            "squad1": [("EM", "em"), ("F1", "f1")],
            "squad2": [("EM", "em"), ("F1", "f1"), ("HasAns EM", "HasAns_exact"), ("HasAns F1", "HasAns_f1"),
                       ("NoAns acc", "noans_recall")]}[kind]
    cols += [("p50 s", "p50"), ("p95 s", "p95"), ("tok/s", "tokens_per_s"), ("peak MiB", "peak_mib")]
    lines = ["model".ljust(10) + "".join(header.rjust(11) for header, _ in cols)]
    for name, r in runs.items():
        row = {**r, **r["scores"], **r.get("abstention", {}), **r["latency_s"],
               "peak_mib": r["peak_memory_bytes"] / 2**20}
        lines.append(name.ljust(10) + "".join(f"{row.get(key, float('nan')):11.2f}" for _, key in cols))
    first = next(iter(runs.values()))
    lines.append(f"{first['questions']} questions, {first['truncated']} prompts truncated to fit; "
                 f"latency {LATENCY_NOTE}; peak memory: {first['peak_memory_measure']}")
    return "\n".join(lines)


def write_json(path, obj):
    """Write atomically: a reader (or a crash) sees the old file or the whole new one."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    write_atomic(path, write)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 through run_cli, like every other UserError
        raise UserError(message)


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="SQuAD v1.1 / v2.0 JSON, instruction data (JSON list or JSONL), or squad1 / "
                   "squad2: the official dev file, downloaded once")
    p.add_argument("--predictions", help="score this {question id: answer} file and print the official JSON")
    p.add_argument("--model", help="base model directory (Hugging Face format) or Hugging Face id")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format)")
    p.add_argument("--compare", action="store_true", help="evaluate the base, then base + adapter")
    p.add_argument("--holdout", type=float, help="evaluate the articles train.py held out (same --seed)")
    p.add_argument("--seed", type=int, help="the holdout split and the --limit sample (default: the run's, else 0)")
    p.add_argument("--limit", type=int, help="evaluate a fixed sample of N questions")
    p.add_argument("--format", choices=data.FORMATS, help="prompt format (default: the adapter's run's, "
                   "else the tokenizer's chat format)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-lookup", type=int, default=8,
                   help="at --batch-size 1, draft up to N tokens copied from the prompt and verify them in one pass "
                        "(prompt lookup decoding: greedy's answers in fewer passes); 0: off")
    p.add_argument("--max-new-tokens", type=int, help="default 32 for SQuAD, 256 for instruction data")
    p.add_argument("--max-seq-len", type=int,
                   help="prompt + answer tokens (default: the adapter's run's, else the model's, at most 2048)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on CUDA where supported, else float32")
    p.add_argument("--quantize", choices=("nf4", "fp4", "none"),
                   help="4-bit base weights (default: as the adapter was trained if its run recorded it, else nf4)")
    p.add_argument("--out", default="eval-out", help="directory for predictions.json and metrics.json")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--ask", action="store_true", help="print the model's answer to --question / --file")
    p.add_argument("--context", default="", help="--ask: the passage to answer from")
    p.add_argument("--question", help="--ask: the question")
    p.add_argument("--file", help="--ask: a JSON list of {context, question}")
    return p.parse_args(argv)


def _need_file(path, option):
    if not os.path.isfile(path):
        raise UserError(f"{option} {path}: no such file")


def check_args(args):
    """Every mistake in the options, found before any model is loaded."""
    if args.predictions:
        if args.model or args.ask:
            raise UserError("--predictions scores a file: it takes --data, not --model or --ask")
        if not args.data:
            raise UserError("--predictions needs --data (the SQuAD dataset file)")
        return
    if not args.model:
        raise UserError("give --model DIR (to evaluate a model) or --predictions FILE (to score a file)")
    if os.path.isdir(args.model):       # else a Hugging Face id, fetched once the options are checked
        _need_file(os.path.join(args.model, "config.json"), "--model")
    if args.adapter:
        _need_file(os.path.join(args.adapter, "adapter_config.json"), "--adapter")
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter (it compares the base model with base + adapter)")
    if args.prompt_lookup < 0:
        raise UserError(f"--prompt-lookup must be >= 0, got {args.prompt_lookup}")
    for option in ("limit", "batch_size", "max_new_tokens", "max_seq_len"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            raise UserError(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.holdout is not None and not 0 < args.holdout < 1:
        raise UserError(f"--holdout must be a fraction in (0, 1), got {args.holdout}")
    if args.ask:
        if bool(args.question) == bool(args.file) or args.data:
            raise UserError("--ask takes either --question (with --context) or --file, and no --data")
        if args.file:
            _need_file(args.file, "--file")
        return
    if args.question or args.file or args.context:
        raise UserError("--question, --context and --file go with --ask")
    if not args.data:
        raise UserError("--data is required to evaluate a model")
    if args.data not in SQUAD_NAMES:
        _need_file(args.data, "--data")
    outputs = ["predictions.json", "metrics.json"] + (["predictions-base.json"] if args.compare else [])
    existing = [f for f in outputs if os.path.exists(os.path.join(args.out, f))]
    if existing and not args.overwrite:
        raise UserError(f"--out {args.out} already holds {existing[0]} (pass --overwrite to replace it)")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    return torch.device(name)


def resolve_dtype(name, device):
    if name == "auto":  # bf16 where CUDA supports it; elsewhere fp32, the reference numbers (see --dtype)
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def read_run_config(adapter):
    """The settings of the train.py run that wrote `adapter` (its run.json beside or above it), as
    {quantize, double_quant, format, max_seq_len, seed, holdout}; {} without an adapter or a run.json."""
    paths = [os.path.join(adapter, RUN_FILE), os.path.join(adapter, os.pardir, RUN_FILE)] if adapter else []
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        cfg = run["config"]
        keys = ("quantize", "double_quant", "max_seq_len", "seed", "holdout")
        return dict({k: cfg[k] for k in keys if k in cfg}, format=run.get("format") or cfg.get("format"))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{os.path.normpath(path)}: not a train.py run.json ({type(err).__name__}: {err})") from None


def read_questions(args):
    """--ask's questions as Examples. With a context it is extractive QA, allowed to be unanswerable."""
    items = [{"context": args.context, "question": args.question}]
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except ValueError as err:
                raise UserError(f"--file {args.file}: not valid JSON ({err})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("question"), str)
                                                  and isinstance(i.get("context", ""), str) for i in items):
            raise UserError(f"--file {args.file}: expected a JSON list of {{context, question}} strings")
    # is_impossible=True makes build_prompt use the SQuAD prompt, whose instruction allows abstaining.
    return [data.Example(str(n), i["question"], i.get("context", ""), [], [], bool(i.get("context")), "")
            for n, i in enumerate(items)]


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    # Every option checked: now fetch what is named but not here (a Hub model, squad1 / squad2's dev file).
    if args.model:
        args.model = resolve_model(args.model)
    if args.data in SQUAD_NAMES:
        args.data = resolve_data(args.data, "dev")
    if args.predictions:
        print(metrics.format_official(metrics.score_files(args.data, args.predictions)))
        return
    device, run = resolve_device(args.device), read_run_config(args.adapter)
    dtype = resolve_dtype(args.dtype, device)
    # The base as the adapter was trained on it (its run.json), else NF4 as in QLoRA, on every device:
    # a base stored differently would shift the numbers that a base / fine-tuned comparison reports.
    quantize = args.quantize or run.get("quantize") or "nf4"
    if quantize != "none" and device.type == "mps":
        raise UserError("--quantize on MPS: bitsandbytes 4-bit layers need CUDA or a CPU; use --quantize none")
    tok = load_tokenizer(args.model)
    fmt = args.format or run.get("format") or tok.chat_format
    seed = args.seed if args.seed is not None else run.get("seed", 0)
    model_len = Config.from_hf(args.model).max_seq_len
    max_seq_len = args.max_seq_len or run.get("max_seq_len") or min(model_len, 2048)
    if max_seq_len > model_len:
        raise UserError(f"--max-seq-len {max_seq_len} is beyond the model's {model_len} positions")
    if args.ask:
        examples, kind = read_questions(args), "ask"
    else:
        if run.get("holdout") and args.holdout is None:
            print(f"note: the adapter's run held out {run['holdout']} of the articles; --holdout "
                  f"{run['holdout']} evaluates on those only", file=sys.stderr)
        kind, examples = data.load_examples(args.data)
        examples = select_examples(examples, holdout=args.holdout, seed=seed, limit=args.limit)
        if not examples:
            raise UserError(f"--holdout {args.holdout}: {args.data} has too few articles to hold any out")
    max_new_tokens = args.max_new_tokens or DEFAULT_NEW_TOKENS.get(kind, 64)
    if max_new_tokens >= max_seq_len:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {max_seq_len}")

    model = load_model(args.model, quantize=None if quantize == "none" else quantize, device=device, dtype=dtype,
                       double_quant=run.get("double_quant", True))
    if args.ask:
        if args.adapter:
            load_adapter(model, args.adapter)
        prompts = [data.encode_prompt(tok, ex, fmt, max_seq_len, max_new_tokens)[0] for ex in examples]
        texts = generate_answers(model, tok, prompts, batch_size=args.batch_size, max_new_tokens=max_new_tokens,
                                 prompt_lookup=args.prompt_lookup)[0]
        answers = [(data.answer_from_generation(t) or "(no answer)") if ex.context else t.strip()
                   for ex, t in zip(examples, texts)]
        print(answers[0] if not args.file else json.dumps(
            [{"question": ex.question, "answer": a} for ex, a in zip(examples, answers)], indent=2))
        return

    settings = dict(model=args.model, adapter=args.adapter, data=args.data, kind=kind, holdout=args.holdout,
                    seed=seed, limit=args.limit, format=fmt, batch_size=args.batch_size,
                    max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, decoding="greedy",
                    prompt_lookup=args.prompt_lookup if args.batch_size == 1 else 0,
                    device=str(device), dtype=str(dtype).removeprefix("torch."), quantize=quantize)
    common = dict(fmt=fmt, batch_size=args.batch_size, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len,
                  prompt_lookup=args.prompt_lookup)
    runs, predictions = {}, {}
    if args.adapter:  # onto the base already in memory (a second copy would double the peak), and checked
        load_adapter(model, args.adapter)   # before the base is scored: --compare runs it switched off
    if not args.adapter or args.compare:
        with lora_disabled(model):
            predictions["base"], runs["base"] = evaluate_model(model, tok, examples, kind, **common)
    if args.adapter:
        predictions["adapter"], runs["adapter"] = evaluate_model(model, tok, examples, kind, **common)

    os.makedirs(args.out, exist_ok=True)
    main_run = "adapter" if args.adapter else "base"
    write_json(os.path.join(args.out, "predictions.json"), predictions[main_run])
    if args.compare:
        write_json(os.path.join(args.out, "predictions-base.json"), predictions["base"])
    write_json(os.path.join(args.out, "metrics.json"), dict(settings=settings, **runs))
    print(format_table(runs, kind))
    print(f"wrote {args.out}/predictions.json and metrics.json")


if __name__ == "__main__":
    run_cli(main)
