"""Data: SQuAD v1.1 / v2.0 and instruction files -> Examples -> prompt text -> (input_ids, labels).

Training and evaluation build prompts with the same `build_prompt`; only the answer is supervised.
"""
import json
import math
import os
import random
from dataclasses import dataclass, replace
from itertools import groupby

import torch

from errors import UserError
from tokenizer import END_PIECES

IGNORE_INDEX = -100  # the label of every position the loss skips (prompt, padding); torch's default
NO_ANSWER = "unanswerable"  # what unanswerable (v2.0) questions train the model to say
FORMATS = ("plain", "llama2", "llama3", "chatml")
INSTRUCTION = ("Answer the question with a short span copied exactly from the context. "
               f"If the context does not contain the answer, reply: {NO_ANSWER}")
SQUAD_VERSIONS = {"1.1": "squad1", "v1.1": "squad1", "2.0": "squad2", "v2.0": "squad2"}


@dataclass
class Example:
    """One question. SQuAD: answers are the gold spans, `answer_starts` their character offsets,
    `title` the article. Instruction data: answers = [output], answer_starts = [], title = document."""
    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    is_impossible: bool
    title: str


# ---------------------------------------------------------------- reading files

def _read_text(path):
    """The file as text; a one-line UserError if it is missing or not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte offset {err.start})") from None


def _field(path, where, obj, key, kind):
    """obj[key], checked to be of type `kind`."""
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{path}: {where}: missing field '{key}'")
    if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
        raise UserError(f"{path}: {where}: '{key}' should be of type {kind.__name__}")
    return obj[key]


def _squad(path, data):
    """SQuAD's nested articles -> paragraphs -> qas, validated, flattened to Examples."""
    kind = SQUAD_VERSIONS.get(str(data.get("version")))
    if kind is None:
        raise UserError(f"{path}: unknown SQuAD version {data.get('version')!r} (expected 1.1 or v2.0)")
    examples = []
    for a, article in enumerate(_field(path, "top level", data, "data", list)):
        title = _field(path, f"data[{a}]", article, "title", str)
        for p, para in enumerate(_field(path, f"data[{a}]", article, "paragraphs", list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(path, where, para, "context", str)
            if not context.strip():
                raise UserError(f"{path}: {where}: empty context")
            for q, qa in enumerate(_field(path, where, para, "qas", list)):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qid, question = _field(path, where, qa, "id", str), _field(path, where, qa, "question", str)
                if not question.strip():
                    raise UserError(f"{path}: {where}: empty question (id {qid})")
                impossible = kind == "squad2" and _field(path, where, qa, "is_impossible", bool)
                answers = _field(path, where, qa, "answers", list)
                if not answers and not impossible:
                    raise UserError(f"{path}: {where}: no answers for answerable question {qid}")
                texts, starts = [], []
                for i, ans in enumerate(answers):
                    text = _field(path, f"{where}.answers[{i}]", ans, "text", str)
                    start = _field(path, f"{where}.answers[{i}]", ans, "answer_start", int)
                    if start < 0 or context[start:start + len(text)] != text:
                        raise UserError(f"{path}: {where}.answers[{i}]: answer_start {start} does not match "
                                        f"the answer {text!r} (context there: {context[start:start + len(text)]!r})")
                    texts.append(text)
                    starts.append(start)
                examples.append(Example(qid, question, context, texts, starts, impossible, title))
    return kind, examples


def _instruction(path, where, n, rec):
    """An instruction record ({instruction, input, output} or {question, answer}) -> Example."""
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: expected a JSON object, got {type(rec).__name__}")
    question, answer = rec.get("instruction", rec.get("question")), rec.get("output", rec.get("answer"))
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{path}: {where}: needs a non-empty 'instruction' or 'question' string")
    if not isinstance(answer, str) or not answer.strip():
        raise UserError(f"{path}: {where}: needs a non-empty 'output' or 'answer' string")
    context = rec.get("input") or ""
    if not isinstance(context, str):
        raise UserError(f"{path}: {where}: 'input' should be a string")
    # The split keeps a document's questions together: MedQuAD's `focus`, else any title field.
    title = str(rec.get("focus") or rec.get("document") or rec.get("title") or "")
    qid = str(rec.get("id", f"{os.path.basename(path)}:{n}"))
    return Example(qid, question, context, [answer], [], False, title)


def _jsonl(path, text):
    """(line number, record) for each non-blank line of a JSONL file."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {n}: not valid JSON ({err.msg})") from None


def load_examples(path):
    """(kind, examples) from a SQuAD JSON file (kind "squad1" / "squad2") or from instruction
    data as a JSON list or JSONL (kind "instruct"). Malformed input raises UserError."""
    text = _read_text(path)
    if path.endswith(".jsonl"):
        kind, examples = "instruct", [_instruction(path, f"line {n}", n, r) for n, r in _jsonl(path, text)]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        if isinstance(data, dict) and "data" in data:
            kind, examples = _squad(path, data)
        elif isinstance(data, list):
            kind, examples = "instruct", [_instruction(path, f"record {i}", i, r) for i, r in enumerate(data)]
        else:
            raise UserError(f"{path}: wrong structure: neither SQuAD ({{'version', 'data'}}) "
                            "nor a list of instruction records")
    if not examples:
        raise UserError(f"{path}: no examples")
    seen = set()
    for ex in examples:  # predictions are keyed by id, so ids must be unique
        if ex.id in seen:
            raise UserError(f"{path}: duplicate id {ex.id!r}")
        seen.add(ex.id)
    return kind, examples


def split_examples(examples, val_fraction, seed):
    """(train, val) split by `title` group (a SQuAD article, a MedQuAD document), so no paragraph
    or document appears on both sides; deterministic given `seed`. Untitled examples stand alone."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    keys = sorted({ex.title or ex.id for ex in examples})
    random.Random(seed).shuffle(keys)
    n_val = round(len(keys) * val_fraction)
    if val_fraction > 0 and len(keys) > 1:
        n_val = min(max(n_val, 1), len(keys) - 1)  # never an empty side when asked for both
    val_keys = set(keys[:n_val])
    train = [ex for ex in examples if (ex.title or ex.id) not in val_keys]
    val = [ex for ex in examples if (ex.title or ex.id) in val_keys]
    return train, val


def sample_examples(examples, limit, unanswerable_share, seed):
    """At most `limit` of `examples` (0: no limit) drawn at random. With `unanswerable_share` in [0, 1], that share
    of them is unanswerable: half of SQuAD v2.0's dev set is, a third of its official train set is, and a small
    model trained on the dev set's half learns to abstain on most answerable questions too (README, v2.0)."""
    rng = random.Random(seed)
    if unanswerable_share < 0:
        return rng.sample(examples, min(limit, len(examples))) if limit else examples
    unanswerable = [ex for ex in examples if ex.is_impossible]
    answerable = [ex for ex in examples if not ex.is_impossible]
    if unanswerable_share > 0 and not unanswerable:
        raise UserError("an unanswerable share needs SQuAD v2.0 data; these examples have no unanswerable question")
    # the largest sample with exactly this share that the data allows (an infinite bound where a side is unused)
    total = min(limit or len(examples), len(unanswerable) / unanswerable_share if unanswerable_share else math.inf,
                len(answerable) / (1 - unanswerable_share) if unanswerable_share < 1 else math.inf)
    n_unanswerable = round(total * unanswerable_share)
    picked = rng.sample(unanswerable, n_unanswerable) + rng.sample(answerable, int(total) - n_unanswerable)
    rng.shuffle(picked)
    return picked


# ---------------------------------------------------------------- prompts

def build_prompt(example, fmt):
    """The full prompt text, up to where the answer starts. BOS is not text: encoding adds it."""
    if example.is_impossible or example.answer_starts:  # extractive QA (SQuAD)
        system, user = INSTRUCTION, f"Context: {example.context}\n\nQuestion: {example.question}"
    else:  # free-form instruction data: just the question (+ input)
        system, user = None, example.question + (f"\n\n{example.context}" if example.context else "")
    if fmt == "plain":  # ends in a newline so a byte-level BPE answer starts a fresh word, as in chat
        return (f"{system}\n\n" if system else "") + f"{user}\n\nAnswer:\n"
    if fmt == "llama2":  # Llama 2 chat: [INST] <<SYS>> ... <</SYS>> ... [/INST]
        sys = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"[INST] {sys}{user} [/INST]"
    if fmt == "llama3":
        turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>".format
        return (turn("system", system) if system else "") + turn("user", user) + \
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if fmt == "chatml":
        turn = "<|im_start|>{}\n{}<|im_end|>\n".format
        return (turn("system", system) if system else "") + turn("user", user) + "<|im_start|>assistant\n"
    raise UserError(f"unknown prompt format {fmt!r} (choose from {', '.join(FORMATS)})")


def end_token(tok, fmt):
    """The id that closes an answer: eos for plain / llama2, <|eot_id|> for llama3, <|im_end|> for chatml."""
    piece = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(fmt)
    if piece is None:
        return tok.eos_id
    if tok.token_id(piece) is None:
        raise UserError(f"prompt format {fmt} needs the token {piece}, which this tokenizer lacks")
    return tok.token_id(piece)


def answer_from_generation(text):
    """The SQuAD prediction in generated text: up to the first end token or line break, stripped;
    the abstention phrase becomes "" (no answer)."""
    for piece in END_PIECES:
        text = text.split(piece)[0]
    text = text.strip().split("\n")[0].strip()
    return "" if text.rstrip(".!?").strip().lower() == NO_ANSWER else text


# ---------------------------------------------------------------- tokenization

def _fit_prompt(tok, example, fmt, budget, span):
    """(prompt ids, truncated) within `budget` tokens, or None if impossible.

    A long context is cut at character level to a window around `span` (char start, end), never
    inside it: drop as many characters as the excess tokens cover on average, re-encode, repeat.
    Cutting characters (not tokens) keeps the answer text intact whatever the tokenizer."""
    ids = tok.encode(build_prompt(example, fmt), bos=tok.add_bos)
    context, (start, end) = example.context, span
    chars_per_token = len(context) / max(1, len(tok.encode(context))) if len(ids) > budget else 0
    keep = len(context)
    while len(ids) > budget:
        keep -= max(1, math.ceil((len(ids) - budget) * chars_per_token))
        if keep < end - start:
            return None
        left = max(0, min(start - (keep - (end - start)) // 2, len(context) - keep))  # centred on span
        cut = replace(example, context=context[left:left + keep])
        ids = tok.encode(build_prompt(cut, fmt), bos=tok.add_bos)
    return ids, keep < len(context)


def encode_for_training(tok, example, fmt, max_seq_len):
    """dict(input_ids, labels, truncated), or None if it cannot fit in max_seq_len.

    Prompt and answer are tokenized separately, so the boundary is exact: labels are IGNORE_INDEX
    over the prompt and equal input_ids over the answer and its end token (the loss shifts by one)."""
    impossible = example.is_impossible or not example.answers
    answer = NO_ANSWER if impossible else example.answers[0].strip()
    answer_ids = tok.encode(answer) + [end_token(tok, fmt)]
    if impossible or not example.answer_starts:
        span = (0, 0)  # nothing to keep: cut the context from the end
    else:
        span = (example.answer_starts[0], example.answer_starts[0] + len(example.answers[0]))
    fit = _fit_prompt(tok, example, fmt, max_seq_len - len(answer_ids), span)
    if fit is None:
        return None
    prompt_ids, truncated = fit
    return dict(input_ids=prompt_ids + answer_ids, labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                truncated=truncated)


def encode_prompt(tok, example, fmt, max_seq_len, max_new_tokens):
    """(prompt ids, truncated) for generation, leaving room for max_new_tokens. The answer's position
    is unknown at evaluation, so a long context is cut from the end."""
    fit = _fit_prompt(tok, example, fmt, max_seq_len - max_new_tokens, (0, 0))
    if fit is None:
        raise UserError(f"example {example.id}: the prompt does not fit in max_seq_len {max_seq_len} "
                        f"- max_new_tokens {max_new_tokens} tokens even without its context")
    return fit


def prepare(tok, examples, fmt, max_seq_len):
    """(encoded examples, stats): n_examples read, n_truncated (context cut), n_dropped (did not fit)."""
    encoded = [e for e in (encode_for_training(tok, ex, fmt, max_seq_len) for ex in examples) if e]
    stats = dict(n_examples=len(examples), n_truncated=sum(e["truncated"] for e in encoded),
                 n_dropped=len(examples) - len(encoded))
    return encoded, stats


def collate(batch, pad_id):
    """(input_ids, labels), LongTensors (B, T), T the longest in the batch. Right padding: with a
    causal mask real tokens never attend to the pads after them, and pad labels are IGNORE_INDEX."""
    T = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        input_ids[i, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
        labels[i, :len(b["labels"])] = torch.tensor(b["labels"])
    return input_ids, labels


def show_example(tok, input_ids, labels):
    """The decoded sequence with the supervised tokens wrapped in [[...]]: what the loss trains on."""
    pairs = zip((int(i) for i in input_ids), (int(t) for t in labels))
    out = []
    for supervised, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX):
        text = tok.decode([i for i, _ in run])
        out.append(f"[[{text}]]" if supervised else text)
    return "".join(out)
