"""Scores: the official SQuAD v1.1 / v2.0 evaluation, abstention on unanswerable questions, and
free-form answer metrics (token F1, ROUGE-L, corpus BLEU-4).

The SQuAD part follows `evaluate-v1.1.py` and `evaluate-v2.0.py` operation by operation (same
normalisation, same order of summation), so its floats equal the official output to the last digit.
"""
import json
import math
import re
import string
import sys
from collections import Counter

from errors import UserError

# v1.1 writes r"\b(a|an|the)\b", v2.0 adds re.UNICODE. In Python 3 a str pattern is Unicode already,
# so both scripts remove the same words: "the" inside "éthe" is not a word of its own in either.
ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCTUATION = set(string.punctuation)  # ASCII only: "“" and "¿" survive normalisation


def normalize_answer(text):
    """Lowercase, drop ASCII punctuation, drop the articles a / an / the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(gold, pred):
    """1 if the two answers normalise to the same string, else 0."""
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold, pred, version="v2.0"):
    """Token F1 of the normalised answers; v2.0 reads an empty side as "no answer" (1 if both are)."""
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if version == "v2.0" and (not gold_toks or not pred_toks):
        return int(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:  # v1.1 also lands here for empty answers, even when both are empty
        return 0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _version(dataset_json):
    """'v1.1' or 'v2.0' from the dataset's version field ("1.1" in v1.1 files, "v2.0" in v2.0 files)."""
    version = str(dataset_json.get("version", "")).lstrip("v")
    if version not in ("1.1", "2.0"):
        raise UserError(f"SQuAD version {dataset_json.get('version')!r} is neither 1.1 nor v2.0")
    return "v" + version


def _questions(dataset_json):
    for article in dataset_json["data"]:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def squad_scores(dataset_json, predictions):
    """Official scores of `predictions` (question id -> answer text) on a parsed SQuAD dataset.

    v1.1 returns {exact_match, f1}; v2.0 adds total and the HasAns_ / NoAns_ breakdown. Percentages.
    """
    version = _version(dataset_json)
    exact, f1, has_ans = {}, {}, {}  # question id -> score, in dataset order (the scripts' order)
    for qa in _questions(dataset_json):
        qid = qa["id"]
        golds = [a["text"] for a in qa["answers"]]
        has_ans[qid] = bool(golds)
        if version == "v2.0":
            # Gold answers that normalise to nothing are dropped; unanswerable means gold [""].
            golds = [g for g in golds if normalize_answer(g)] or [""]
        if qid not in predictions:
            # Both scripts give 0. v2.0 prints this line on stdout and then fails with a KeyError in its
            # HasAns / NoAns breakdown; we score it 0 and keep stdout for the scores.
            message = ("Unanswered question %s will receive score 0." if version == "v1.1"
                       else "Missing prediction for %s")
            print(message % qid, file=sys.stderr)
            exact[qid] = f1[qid] = 0
            continue
        pred = predictions[qid]
        exact[qid] = max(exact_match(g, pred) for g in golds)
        f1[qid] = max(f1_score(g, pred, version) for g in golds)

    def percent(qids):
        # 100.0 * sum / n, in that order: the scripts' expression, needed for last-digit equality.
        return (100.0 * sum(exact[q] for q in qids) / len(qids),
                100.0 * sum(f1[q] for q in qids) / len(qids))

    em, f = percent(list(exact))
    if version == "v1.1":
        return {"exact_match": em, "f1": f}
    scores = {"exact": em, "f1": f, "total": len(exact)}
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in exact if has_ans[q] == answerable]
        if qids:  # the script leaves a group out when the dataset has none of it
            em, f = percent(qids)
            scores.update({f"{prefix}_exact": em, f"{prefix}_f1": f, f"{prefix}_total": len(qids)})
    return scores


def _rate(count, total):
    return 100.0 * count / total if total else 0.0


def abstention_metrics(dataset_json, predictions, parsed=None):
    """How well a model abstains on a v2.0 dataset, in percent (0.0 where a denominator is 0).

    `parsed` (question id -> bool) says whether each raw output parsed; ids it lacks count as unparsed.
    """
    has_ans = {qa["id"]: bool(qa["answers"]) for qa in _questions(dataset_json)}
    # Abstaining = an answer that normalises to nothing, which is what v2.0 scores 1 on a NoAns question.
    # A missing prediction is no abstention: the scores give it 0 there.
    abstained = {q: q in predictions and not normalize_answer(predictions[q]) for q in has_ans}
    no_ans = [q for q in has_ans if not has_ans[q]]
    answerable = [q for q in has_ans if has_ans[q]]
    right = sum(abstained[q] for q in no_ans)
    scores = {
        "noans_recall": _rate(right, len(no_ans)),  # abstains when it should (== NoAns_exact)
        "wrong_abstention_rate": _rate(sum(abstained[q] for q in answerable), len(answerable)),
        "abstention_precision": _rate(right, sum(abstained.values())),
        "abstentions": sum(abstained.values()),
    }
    if parsed is not None:
        scores["parse_rate"] = _rate(sum(bool(parsed.get(q)) for q in has_ans), len(has_ans))
    return scores


def _rouge_tokens(text):
    # rouge-score's default tokenizer: lowercase, runs of [a-z0-9] (so "café" -> "caf"), no stemming.
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(reference, prediction):
    """ROUGE-L F-measure of one pair, as rouge-score's RougeScorer(["rougeL"]) computes it."""
    ref, pred = _rouge_tokens(reference), _rouge_tokens(prediction)
    if not ref or not pred:
        return 0.0
    # Longest common subsequence by dynamic programming, one row of the table at a time:
    # row[j] = LCS length of the reference tokens read so far and pred[:j].
    row = [0] * (len(pred) + 1)
    for r in ref:
        new = [0]
        for j, p in enumerate(pred):
            new.append(row[j] + 1 if r == p else max(row[j + 1], new[j]))
        row = new
    precision, recall = row[-1] / len(pred), row[-1] / len(ref)
    return 2 * precision * recall / (precision + recall) if row[-1] else 0.0


# mteval-v13a's rules as sacrebleu applies them, in order: split off all ASCII punctuation except
# ' , - . ; then "." and "," unless between digits (3.5, 1,000); then "-" after a digit (5-10).
TOKENIZE_13A = [
    (re.compile(r"([\x20-\x26\x28-\x2b\x2f\x3a-\x40\x5b-\x60\x7b-\x7e])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(text):
    """Tokens of sacrebleu's default "13a" tokenizer (after the rstrip sacrebleu's BLEU applies)."""
    text = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in TOKENIZE_13A:
        text = pattern.sub(replacement, text)
    return text.split()


def corpus_bleu(references, predictions):
    """Corpus BLEU-4 in percent: sacrebleu.corpus_bleu(predictions, [references]) with its defaults."""
    correct, total, pred_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for reference, prediction in zip(references, predictions):
        ref, pred = tokenize_13a(reference), tokenize_13a(prediction)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, 5):
            ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            pred_ngrams = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
            total[n - 1] += sum(pred_ngrams.values())
            correct[n - 1] += sum((ref_ngrams & pred_ngrams).values())
    if not any(correct):
        return 0.0
    brevity = math.exp(1 - ref_len / pred_len) if pred_len < ref_len else 1.0
    logs, smooth = [], 1.0
    for c, t in zip(correct, total):
        if t == 0:  # no n-grams of this order at all: sacrebleu floors log(0), the score is exactly 0
            return 0.0
        if c == 0:  # "exp" smoothing (mteval's): 1/2, 1/4, ... of a match for each order with none
            smooth *= 2
            logs.append(math.log(100.0 / (smooth * t)))
        else:
            logs.append(math.log(100.0 * c / t))
    return brevity * math.exp(sum(logs) / 4)


def freeform_scores(references, predictions):
    """Mean token F1 (SQuAD normalisation), mean ROUGE-L F and corpus BLEU-4, in percent."""
    if not references or len(references) != len(predictions):
        raise ValueError(f"got {len(references)} references and {len(predictions)} predictions")
    n = len(references)
    return {
        "f1": 100.0 * sum(f1_score(r, p) for r, p in zip(references, predictions)) / n,
        "rougeL": 100.0 * sum(rouge_l(r, p) for r, p in zip(references, predictions)) / n,
        "bleu": corpus_bleu(references, predictions),
        "count": n,
    }


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({err})") from None


def score_files(data_path, predictions_path):
    """Official scores of a predictions file (JSON: question id -> answer) on a SQuAD dataset file."""
    dataset_json, predictions = _read_json(data_path), _read_json(predictions_path)
    if not isinstance(dataset_json, dict) or not isinstance(dataset_json.get("data"), list):
        raise UserError(f"{data_path}: not a SQuAD dataset (expected an object with a 'data' list)")
    if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
        raise UserError(f"{predictions_path}: expected a JSON object of question id -> answer string")
    try:
        return squad_scores(dataset_json, predictions)
    except UserError as err:
        raise UserError(f"{data_path}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{data_path}: malformed SQuAD dataset ({type(err).__name__}: {err})") from None


def format_official(scores):
    """The official script's stdout for `scores`: v1.1 prints one line of JSON, v2.0 indents by 2."""
    return json.dumps(scores) if "exact_match" in scores else json.dumps(scores, indent=2)
