"""evaluate.py: official scores from the CLI, the generation path on stories260K, perplexity against
transformers, abstention mapping, batching, --ask, and options refused before any model is loaded."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import evaluate as E
import metrics
from conftest import MEDQUAD, ROOT, SQUAD_V1, SQUAD_V2, STORIES
from errors import UserError
from generate import generate
from lora import apply_lora, lora_layers, save_adapter
from model import load_model
from tokenizer import load_tokenizer

PREDICTIONS = os.path.join(os.path.dirname(SQUAD_V1), "predictions")
# stdout of the official scripts, copied from ../shared/assets/squad/README.md.
OFFICIAL = {
    ("dev-v1.1.json", "bert-ensemble-google-dev-v1.1.json"):
        '{"exact_match": 86.20624408703878, "f1": 92.19557978351145}\n',
    ("dev-v2.0.json", "nlnet-single-msra-dev-v2.0.json"): """{
  "exact": 75.82750779078582,
  "f1": 78.77776770381462,
  "total": 11873,
  "HasAns_exact": 69.61875843454791,
  "HasAns_f1": 75.52773885752187,
  "HasAns_total": 5928,
  "NoAns_exact": 82.01850294365012,
  "NoAns_f1": 82.01850294365012,
  "NoAns_total": 5945
}
""",
}
# One thread: on this shared 2-core machine a second OpenMP thread spin-waits for a busy core, which
# made a stories260K generation 70x slower (3.3 s instead of 0.05 s) whenever another job ran.
torch.set_num_threads(1)
SMALL = dict(fmt="plain", max_new_tokens=6, max_seq_len=512,  # stories260K: plain prompts, 512 positions
             prompt_lookup=8)                                 # used at batch 1 (generate_with_lookup)


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def tiny_squad(tmp_path_factory):
    """The first three articles of dev-v2.0, two paragraphs each (answerable and unanswerable questions)."""
    with open(SQUAD_V2) as f:
        dev = json.load(f)
    dev["data"] = [dict(a, paragraphs=a["paragraphs"][:2]) for a in dev["data"][:3]]
    path = tmp_path_factory.mktemp("squad") / "tiny-v2.0.json"
    path.write_text(json.dumps(dev))
    return str(path)


@pytest.fixture(scope="module")
def stories():
    return load_model(STORIES, quantize="nf4"), load_tokenizer(STORIES)


@pytest.mark.parametrize("dataset,predictions", list(OFFICIAL))
def test_predictions_cli_prints_the_official_output(dataset, predictions):
    out = cli("--data", os.path.join(os.path.dirname(SQUAD_V1), dataset),
              "--predictions", os.path.join(PREDICTIONS, predictions))
    assert out.returncode == 0, out.stderr
    assert out.stdout == OFFICIAL[dataset, predictions]


def test_scoring_a_subset_rebuilt_from_examples_is_official():
    """The model path scores through squad_json(examples): on the whole file it gives the official line."""
    kind, examples = data.load_examples(SQUAD_V2)
    with open(os.path.join(PREDICTIONS, "nlnet-single-msra-dev-v2.0.json")) as f:
        predictions = json.load(f)
    scores = metrics.squad_scores(E.squad_json(examples, kind), predictions)
    assert metrics.format_official(scores) + "\n" == OFFICIAL["dev-v2.0.json", "nlnet-single-msra-dev-v2.0.json"]


@pytest.mark.parametrize("text", ["unanswerable", " Unanswerable.", "unanswerable\n", "UNANSWERABLE </s>",
                                  "unanswerable.<|im_end|>", "\tunanswerable<|eot_id|>junk", "unanswerable\nMore."])
def test_abstention_phrase_means_no_answer(text):
    assert data.answer_from_generation(text) == ""


@pytest.mark.parametrize("text,answer", [("the unanswerable riddle", "the unanswerable riddle"),
                                         (" Denver Broncos</s>", "Denver Broncos"), ("1998\nunanswerable", "1998")])
def test_answers_are_kept(text, answer):
    assert data.answer_from_generation(text) == answer


def test_abstentions_are_scored_as_no_answer(monkeypatch, stories, tiny_squad):
    """Scripted generations through evaluate_model: the abstention phrase becomes "" and counts as abstaining."""
    model, tok = stories
    examples = data.load_examples(tiny_squad)[1][:4]
    said = {0: "unanswerable.", 1: " Unanswerable", 2: "Norway", 3: "unanswerable"}
    replies = iter([tok.encode(said[i]) for i in range(4)])
    monkeypatch.setattr(E, "generate", lambda m, prompts, **kw: [next(replies) for _ in prompts])
    predictions, report = E.evaluate_model(model, tok, examples, "squad2", batch_size=1, **SMALL)
    by_length = sorted(range(4), key=lambda i: -len(data.encode_prompt(tok, examples[i], "plain", 512, 6)[0]))
    assert [predictions[examples[i].id] for i in by_length] == ["", "", "Norway", ""]
    assert report["abstention"]["abstentions"] == 3


def test_batched_generation_equals_one_at_a_time(stories, tiny_squad):
    """Batches of 3 and 4 (left padding, longest first), and prompt lookup decoding at batch 1, give each
    question the answer plain greedy decoding gives it alone."""
    model, tok = stories
    examples = data.load_examples(tiny_squad)[1][:8]
    alone = {}
    for ex in examples:
        ids = data.encode_prompt(tok, ex, "plain", 512, 6)[0]
        out = generate(model, [ids], max_new_tokens=6, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
        alone[ex.id] = data.answer_from_generation(tok.decode(out, skip_special=True))
    assert len(set(alone.values())) > 1  # different questions, different answers: a mix-up would show
    for batch_size in (1, 3, 4):
        predictions, report = E.evaluate_model(model, tok, examples, "squad2", batch_size=batch_size, **SMALL)
        assert predictions == alone and list(predictions) == [ex.id for ex in examples]
    assert report["generated_tokens"] > 0 and report["latency_s"]["p95"] >= report["latency_s"]["p50"] > 0


def test_cli_smoke_on_stories260k(tmp_path, tiny_squad):
    out = tmp_path / "eval"
    run = cli("--model", STORIES, "--data", tiny_squad, "--limit", "4", "--max-new-tokens", "4",
              "--batch-size", "3", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "EM" in run.stdout and "NoAns acc" in run.stdout and "wall time of the batch" in run.stdout
    predictions = json.loads((out / "predictions.json").read_text())
    kind, examples = data.load_examples(tiny_squad)
    assert list(predictions) == [ex.id for ex in E.select_examples(examples, seed=0, limit=4)]
    assert len(predictions) == 4 and set(predictions) <= {ex.id for ex in examples}
    result = json.loads((out / "metrics.json").read_text())
    base = result["base"]
    assert result["settings"]["quantize"] == "nf4" and result["settings"]["limit"] == 4
    assert base["scores"]["total"] == base["questions"] == 4
    for key in ("em", "f1", "truncated", "tokens_per_s", "peak_memory_bytes", "abstention"):
        assert key in base
    assert base["latency_s"]["p95"] >= base["latency_s"]["p50"] > 0 and base["peak_memory_bytes"] > 2**20
    assert not list(out.glob("*.tmp"))


def test_compare_holdout_and_the_runs_settings(tmp_path, tiny_squad):
    """--compare: base then base + adapter; settings the adapter's run.json records; held-out articles only."""
    model = load_model(STORIES)
    apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    torch.manual_seed(0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # an adapter that changes the answers
    save_adapter(model, str(tmp_path / "run" / "final"))
    run = dict(config=dict(quantize="none", seed=3, max_seq_len=400, holdout=0.5), format="plain")
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    out = tmp_path / "eval"
    E.main(["--model", STORIES, "--adapter", str(tmp_path / "run" / "final"), "--compare", "--data", tiny_squad,
            "--holdout", "0.5", "--max-new-tokens", "6", "--out", str(out)])
    result = json.loads((out / "metrics.json").read_text())
    assert {k: result["settings"][k] for k in ("quantize", "seed", "max_seq_len")} == \
        {"quantize": "none", "seed": 3, "max_seq_len": 400}
    base, tuned = (json.loads((out / f).read_text()) for f in ("predictions-base.json", "predictions.json"))
    _, heldout = data.split_examples(data.load_examples(tiny_squad)[1], 0.5, 3)
    assert list(base) == list(tuned) == [ex.id for ex in heldout]
    assert base != tuned and result["base"]["questions"] == result["adapter"]["questions"] == len(heldout)
    # the base, scored with the adapter loaded and switched off, answers as the model that never had one
    alone, _ = E.evaluate_model(load_model(STORIES), load_tokenizer(STORIES), heldout, "squad2", fmt="plain",
                                batch_size=8, max_new_tokens=6, max_seq_len=400, prompt_lookup=0)
    assert base == alone


def test_compare_checks_the_adapter_before_scoring_the_base(tmp_path, tiny_squad, monkeypatch):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=4)))
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: pytest.fail("the base was scored first"))
    with pytest.raises(UserError, match="cannot read the adapter"):
        E.main(["--model", STORIES, "--adapter", str(tmp_path / "adapter"), "--compare", "--data", tiny_squad,
                "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_freeform_metrics_and_perplexity_match_transformers(stories):
    """Answer perplexity == exp(token-weighted mean of transformers' loss) with the same labels."""
    transformers = pytest.importorskip("transformers")
    model, tok = load_model(STORIES), stories[1]  # fp32, so the oracle can agree to rounding
    _, medquad = data.load_examples(MEDQUAD)
    examples = [ex for ex in medquad if len(ex.answers[0]) < 300][:3]
    predictions, report = E.evaluate_model(model, tok, examples, "instruct", batch_size=2, **SMALL)
    assert set(predictions) == {ex.id for ex in examples}
    assert all(0 <= report[k] <= 100 for k in ("f1", "rougeL", "bleu"))
    assert report["perplexity_dropped"] == 0 and math.isfinite(report["perplexity"])

    ref = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for ex in examples:
        enc = data.encode_for_training(tok, ex, "plain", 512)
        n = sum(t != data.IGNORE_INDEX for t in enc["labels"][1:])
        with torch.no_grad():
            loss = ref(torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
        nll, count = nll + loss.item() * n, count + n
    assert report["answer_tokens"] == count
    assert report["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    chunked = E.answer_perplexity(model, tok, examples, fmt="plain", max_seq_len=512, batch_size=3, chunk=5)
    assert chunked[0] == pytest.approx(report["perplexity"], rel=1e-6)


def test_ask_prints_an_answer(tmp_path, capsys):
    run = cli("--model", STORIES, "--ask", "--context", "Lily had a red ball. She played in the park.",
              "--question", "What color was the ball?", "--max-new-tokens", "5")
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 1 and run.stdout.strip()
    questions = [{"context": "Tom saw a big dog.", "question": "What did Tom see?"}, {"question": "Who is Tom?"}]
    (tmp_path / "qa.json").write_text(json.dumps(questions))
    E.main(["--model", STORIES, "--ask", "--file", str(tmp_path / "qa.json"), "--max-new-tokens", "5"])
    answers = json.loads(capsys.readouterr().out)
    assert [a["question"] for a in answers] == [q["question"] for q in questions]
    assert all(isinstance(a["answer"], str) and a["answer"] for a in answers)


BAD = [
    (["--compare"], "--compare needs --adapter"),
    (["--limit", "0"], "--limit must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--holdout", "1.5"], "--holdout"),
    (["--max-new-tokens", "600"], "--max-new-tokens 600 leaves no room"),
    (["--max-seq-len", "4096"], "beyond the model's 512"),
    (["--format", "alpaca"], "--format"),
    (["--adapter", "/nonexistent"], "--adapter /nonexistent/adapter_config.json: no such file"),
    (["--ask"], "--ask takes either --question"),
    (["--question", "Why?"], "go with --ask"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_options_fail_before_the_model_loads(monkeypatch, tiny_squad, tmp_path, extra, message):
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--model", STORIES, "--out", str(tmp_path)] + ([] if "--ask" in extra else ["--data", tiny_squad])
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        E.main(argv + extra)


@pytest.mark.parametrize("argv,message", [
    (["--data", "missing.json", "--predictions", "p.json"], "missing.json: cannot read"),
    (["--predictions", "p.json"], "--predictions needs --data"),
    (["--model", STORIES, "--data", "missing.json"], "--data missing.json: no such file"),
    (["--data", SQUAD_V1], "give --model"),
])
def test_errors_without_a_model(monkeypatch, argv, message):
    monkeypatch.setattr(E, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=message):
        E.main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_error_is_one_line_with_status_2(tiny_squad):
    run = cli("--model", STORIES, "--data", tiny_squad, "--device", "cuda")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: --device cuda: no CUDA device is available\n"


def test_existing_output_is_not_overwritten(tmp_path, tiny_squad):
    (tmp_path / "metrics.json").write_text("keep")
    argv = ["--model", STORIES, "--data", tiny_squad, "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path)]
    with pytest.raises(UserError, match="already holds metrics.json .*--overwrite"):
        E.main(argv)
    assert (tmp_path / "metrics.json").read_text() == "keep" and not (tmp_path / "predictions.json").exists()
    E.main(argv + ["--overwrite"])
    assert json.loads((tmp_path / "metrics.json").read_text())["base"]["questions"] == 1
