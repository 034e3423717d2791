"""metrics.py against its oracles: the official SQuAD scripts' printed scores for real leaderboard
predictions, hand-derived official semantics for edge cases, rouge-score and sacrebleu for free-form."""
import json
import os
import re

import pytest

from conftest import ASSETS, MEDQUAD, SQUAD_V1, SQUAD_V2
from errors import UserError
from metrics import (abstention_metrics, corpus_bleu, format_official, freeform_scores, rouge_l,
                     score_files, squad_scores, tokenize_13a)

SQUAD_DIR = os.path.join(ASSETS, "squad")


def official_runs():
    """(prediction file, exact stdout) for every official-script run recorded in the assets README."""
    readme = open(os.path.join(SQUAD_DIR, "README.md"), encoding="utf-8").read()
    pattern = r"^\$ python3? evaluate-v[\d.]+\.py \S+ predictions/(\S+)\n(.*?)\n(?:\n|```)"
    return re.findall(pattern, readme, flags=re.M | re.S)


def test_readme_records_all_eight_runs():
    files = os.listdir(os.path.join(SQUAD_DIR, "predictions"))
    assert len(files) == 8 and sorted(f for f, _ in official_runs()) == sorted(files)


@pytest.mark.parametrize("name,stdout", official_runs(), ids=[f for f, _ in official_runs()])
def test_leaderboard_predictions_reproduce_official_output_exactly(name, stdout):
    data = SQUAD_V2 if "v2.0" in name else SQUAD_V1
    scores = score_files(data, os.path.join(SQUAD_DIR, "predictions", name))
    assert format_official(scores) == stdout  # every digit of every float, key order, layout
    assert scores == json.loads(stdout)


def test_v1_missing_predictions_warned_on_stderr_and_extra_ids_ignored(capsys):
    path = os.path.join(SQUAD_DIR, "predictions", "logistic-regression-baseline-stanford-dev-v1.1.json")
    preds = json.load(open(path))
    dataset = json.load(open(SQUAD_V1))
    ids = [qa["id"] for a in dataset["data"] for p in a["paragraphs"] for qa in p["qas"]]
    missing = [q for q in ids if q not in preds]
    assert len(missing) == 13 and len(set(preds) - set(ids)) == 28  # as the README says
    scores = squad_scores(dataset, preds)
    warned = capsys.readouterr().err.splitlines()
    assert warned == [f"Unanswered question {q} will receive score 0." for q in missing]
    only_dev = {q: a for q, a in preds.items() if q in ids}
    assert squad_scores(dataset, only_dev) == scores


def test_v2_all_empty_predictions_match_readme():
    dataset = json.load(open(SQUAD_V2))
    preds = {qa["id"]: "" for a in dataset["data"] for p in a["paragraphs"] for qa in p["qas"]}
    s = squad_scores(dataset, preds)
    assert (s["exact"], s["HasAns_exact"], s["NoAns_exact"]) == (50.07159100480081, 0.0, 100.0)
    assert (s["total"], s["HasAns_total"], s["NoAns_total"]) == (11873, 5928, 5945)


def make_dataset(version, questions):
    """A one-paragraph dataset from (id, gold answers) pairs; gold [] makes a question unanswerable."""
    qas = [{"id": q, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in golds]}
           for q, golds in questions]
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}


F_2_3 = 2 * (2 / 3) * (2 / 3) / (4 / 3)  # the scripts' formula with precision = recall = 2/3
EDGE_CASES = [  # version, gold answers, prediction, EM, F1
    ("1.1", ["Denver Broncos"], "denver broncos", 1, 1),  # lowercased on both sides
    ("1.1", ["the Broncos"], "Broncos", 1, 1),  # article dropped
    ("1.1", ["Broncos"], "", 0, 0),  # v1.1 empty prediction: no tokens, no overlap
    ("1.1", ["."], "", 1, 0),  # v1.1: both normalise to "" so EM=1, but F1 has no empty rule: 0
    ("1.1", ["The"], "a", 1, 0),  # same quirk: articles alone normalise to ""
    ("1.1", ["Broncos"], "...!?", 0, 0),  # punctuation-only prediction is empty
    ("1.1", ["U.S."], "US", 1, 1),  # punctuation removed, not replaced by a space: "us"
    ("1.1", ["state-of-the-art"], "state of the art", 0, 0),  # "stateoftheart" vs "state of art"
    ("1.1", ["Super  Bowl\n50"], " super\tbowl 50 ", 1, 1),  # whitespace collapsed
    ("1.1", ["Café"], "cafe", 0, 0),  # no accent folding: "café" != "cafe"
    ("1.1", ["Café"], "CAFÉ", 1, 1),  # Unicode lowercasing
    ("1.1", ["Paris"], "“Paris”", 0, 0),  # curly quotes are no ASCII punctuation: token "“paris”"
    ("1.1", ["éthe"], "é", 0, 0),  # "é" is a word character, so "the" in "éthe" is no article
    ("1.1", ["北京"], "北京", 1, 1),  # CJK compared as whole whitespace tokens
    ("1.1", ["北京"], "北京市", 0, 0),  # one token each, different: no partial credit
    ("1.1", ["cat and cat"], "cat cat cat", 0, F_2_3),  # overlap counts min(2, 3) = 2 "cat"
    # max over golds: "denver broncos" gives P=1, R=1/2, F1=2/3; "broncos" gives 0; EM 0 everywhere
    ("1.1", ["Denver Broncos", "Broncos", "the Denver Broncos team"], "Denver", 0, 2 * 1 * 0.5 / 1.5),
    ("1.1", ["Broncos", "Denver Broncos"], "Broncos", 1, 1),  # EM from one gold is enough
    ("v2.0", [], "", 1, 1),  # unanswerable: gold is [""], empty prediction is right
    ("v2.0", [], "the", 1, 1),  # "the" normalises to "", an abstention
    ("v2.0", [], "Broncos", 0, 0),  # unanswerable, answered: F1 = (gold toks == pred toks) = 0
    ("v2.0", ["Broncos"], "", 0, 0),  # answerable, abstained: 0
    ("v2.0", ["."], "", 1, 1),  # gold normalising to "" is dropped, leaving [""]: unlike v1.1, F1 1
    ("v2.0", [".", "Broncos"], "", 0, 0),  # "." dropped, "Broncos" remains: abstaining is wrong
    ("v2.0", ["Café"], "café!", 1, 1),  # same normalisation as v1.1
    ("v2.0", ["cat and cat"], "cat cat cat", 0, F_2_3),
]


@pytest.mark.parametrize("version,golds,pred,em,f1", EDGE_CASES)
def test_edge_cases_follow_official_semantics(version, golds, pred, em, f1):
    scores = squad_scores(make_dataset(version, [("q", golds)]), {"q": pred})
    key = "exact_match" if version == "1.1" else "exact"
    assert (scores[key], scores["f1"]) == (100.0 * em, 100.0 * f1)
    if version == "v2.0":
        group = "HasAns" if golds else "NoAns"
        keys = ["exact", "f1", "total"]
        assert list(scores) == keys + [f"{group}_{k}" for k in keys]


def test_v2_missing_prediction_scores_zero_over_all_questions(capsys):
    # The official v2.0 script would crash here (KeyError in its HasAns breakdown); see metrics.py.
    scores = squad_scores(make_dataset("v2.0", [("a", []), ("b", ["x"])]), {"a": "", "extra": "y"})
    assert capsys.readouterr().err == "Missing prediction for b\n"
    assert (scores["exact"], scores["HasAns_exact"], scores["NoAns_exact"]) == (50.0, 0.0, 100.0)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (2, 1, 1)


def test_abstention_metrics_by_hand():
    dataset = make_dataset("v2.0", [("a1", ["x"]), ("a2", ["y"]), ("n1", []), ("n2", []), ("n3", [])])
    preds = {"a1": "", "a2": "y", "n1": "", "n2": "The.", "n3": "z"}  # 3 abstentions, 2 right
    parsed = {"a1": True, "a2": True, "n1": False, "n2": True}  # n3 absent: counts as unparsed
    assert abstention_metrics(dataset, preds, parsed) == {
        "noans_recall": 100.0 * 2 / 3, "wrong_abstention_rate": 50.0,
        "abstention_precision": 100.0 * 2 / 3, "abstentions": 3, "parse_rate": 60.0}
    never = abstention_metrics(dataset, {q: "w" for q in preds})
    assert (never["abstention_precision"], never["abstentions"]) == (0.0, 0)  # 0/0 reads as 0.0
    assert "parse_rate" not in never


def test_noans_recall_equals_official_noans_exact():
    path = os.path.join(SQUAD_DIR, "predictions", "bert-single-google-dev-v2.0.json")
    dataset, preds = json.load(open(SQUAD_V2)), json.load(open(path))
    assert abstention_metrics(dataset, preds)["noans_recall"] == 83.36417157275021  # README NoAns_exact


def medquad_pairs():
    """~40 (reference, prediction) pairs: MedQuAD answers, perturbed in fixed ways."""
    answers = [json.loads(line)["answer"] for line in open(MEDQUAD, encoding="utf-8")][::50]
    pairs = []
    for i, answer in enumerate(answers):
        words = answer.split()[:70]  # short enough for a fast pure-Python LCS
        ref, kind = " ".join(words), i % 7
        pred = [" ".join(w for j, w in enumerate(words) if j % 4),  # drop every 4th word
                " ".join(words[j ^ 1] for j in range(len(words) - len(words) % 2)),  # swap neighbours
                ref.upper() + " &amp; 3.5 mg, 1,000 cases (5-10 years).",  # case, entities, numbers
                " ".join(words[: len(words) // 2]) + "\n<skipped>-\nand Café naïve “İ” 北京",  # 13a, unicode
                " ".join("xyz" if j % 3 == 0 else w for j, w in enumerate(words)),  # substitutions
                answers[i - 1][:200],  # an unrelated answer
                ""][kind]  # empty prediction
        pairs.append((ref, pred))
    return pairs


def test_rouge_l_matches_rouge_score():
    from rouge_score.rouge_scorer import RougeScorer
    scorer = RougeScorer(["rougeL"])  # default: no stemming, default tokenizer
    pairs = medquad_pairs() + [("Café naïve", "caf na ve"), ("", "x"), ("K-12", "k 12")]
    assert len(pairs) >= 40
    for ref, pred in pairs:
        assert rouge_l(ref, pred) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure, abs=1e-9)


def test_bleu_matches_sacrebleu():
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    pairs = medquad_pairs()
    tricky = ["a,1 b.2 3.c 4,d 5-6 x-7 3.5 1,000", "&quot;q&quot; &amp;lt; <skipped>end-\nline\n",
              "$5 it's e.g. U.S.A. 10% {x} [y] ~z~ `w` @h #t a/b", "Café — “naïve” 北京。  "]
    for text in [p for pair in pairs for p in pair] + tricky:  # the tokenizer itself, token for token
        assert tokenize_13a(text) == Tokenizer13a()(text.rstrip()).split()
    corpora = [pairs, pairs[:7], pairs[2::7], pairs[3::7],
               [("the cat sat on the mat", "the cat sat at the mat")],  # no 4-gram match: exp smoothing
               [("a b c d e", "a b c")],  # no 4-grams at all: 0
               [("a b", "")], [("x y z w", "p q r s")]]  # empty prediction, no match
    for corpus in corpora:
        refs, preds = [r for r, _ in corpus], [p for _, p in corpus]
        expected = sacrebleu.corpus_bleu(preds, [refs]).score
        assert corpus_bleu(refs, preds) == pytest.approx(expected, abs=1e-9)


def test_freeform_scores():
    refs, preds = zip(*medquad_pairs())
    scores = freeform_scores(list(refs), list(preds))
    assert scores["bleu"] == corpus_bleu(refs, preds) and scores["count"] == len(refs)
    assert scores["rougeL"] == pytest.approx(100 * sum(map(rouge_l, refs, preds)) / len(refs))
    assert freeform_scores(["The answer."], ["answer"])["f1"] == 100.0  # SQuAD normalisation
    with pytest.raises(ValueError):
        freeform_scores(["a"], [])


@pytest.mark.parametrize("data,preds,problem", [
    ("missing.json", None, "cannot read"),
    ("bad.json", None, "not valid JSON"),
    (None, "list.json", "expected a JSON object of"),
    ("list.json", None, "not a SQuAD dataset"),
    ("v3.json", None, "neither 1.1 nor v2.0"),
    ("noparagraphs.json", None, "malformed SQuAD dataset"),
])
def test_score_files_reports_bad_input_as_one_line_user_error(tmp_path, data, preds, problem):
    files = {"bad.json": "{", "list.json": "[]", "ok.json": "{}",
             "v3.json": '{"version": "3", "data": []}', "noparagraphs.json": '{"version": "1.1", "data": [{}]}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    data, preds = str(tmp_path / (data or "v3.json")), str(tmp_path / (preds or "ok.json"))
    with pytest.raises(UserError) as err:
        score_files(data, preds)
    message = str(err.value)
    assert problem in message and "\n" not in message
    assert message.startswith(preds if problem == "expected a JSON object of" else data)
