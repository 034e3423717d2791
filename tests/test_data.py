"""data.py with the real SQuAD / MedQuAD files and the real tokenizers."""
import copy
import json
import re

import pytest
import torch

import data
from conftest import GPT2_TOKENIZER, LLAMA2_TOKENIZER, MEDQUAD, SMOLLM, SQUAD_V1, SQUAD_V2
from data import IGNORE_INDEX, NO_ANSWER, Example
from errors import UserError
from tokenizer import load_tokenizer

# (tokenizer, prompt format) pairs the label tests cover.
CASES = [("llama2", "llama2"), ("llama2", "plain"), ("gpt2", "plain"), ("smollm", "chatml")]


@pytest.fixture(scope="module")
def toks():
    return {"llama2": load_tokenizer(LLAMA2_TOKENIZER), "gpt2": load_tokenizer(GPT2_TOKENIZER),
            "smollm": load_tokenizer(SMOLLM)}


@pytest.fixture(scope="module")
def squad2():
    return data.load_examples(SQUAD_V2)


@pytest.fixture(scope="module")
def samples(squad2):
    """Answerable with the answer early / late in a long context, and unanswerable."""
    examples = squad2[1]
    answerable = [ex for ex in examples if not ex.is_impossible and len(ex.context) > 1000]
    early = next(ex for ex in answerable if ex.answer_starts[0] < 100)
    late = next(ex for ex in answerable if ex.answer_starts[0] > len(ex.context) - 150)
    unanswerable = next(ex for ex in examples if ex.is_impossible and len(ex.context) > 1000)
    return [early, late, unanswerable]


def supervised(enc):
    return [i for i, t in zip(enc["input_ids"], enc["labels"]) if t != IGNORE_INDEX]


@pytest.mark.parametrize("name,fmt", CASES)
@pytest.mark.parametrize("max_seq_len", [1024, 110])  # 110 forces the context to be cut
def test_labels_supervise_exactly_the_answer(toks, samples, name, fmt, max_seq_len):
    tok = toks[name]
    end = data.end_token(tok, fmt)
    for ex in samples:
        enc = data.encode_for_training(tok, ex, fmt, max_seq_len)
        answer = NO_ANSWER if ex.is_impossible else ex.answers[0]
        assert len(enc["input_ids"]) == len(enc["labels"]) <= max_seq_len
        assert enc["truncated"] == (max_seq_len == 110)
        sup = supervised(enc)
        assert sup[-1] == end and tok.decode(sup) == answer + tok.decode([end])
        # Labels are IGNORE_INDEX over one prefix (the prompt), then equal the inputs to the end.
        n_prompt = len(enc["labels"]) - len(sup)
        assert set(enc["labels"][:n_prompt]) == {IGNORE_INDEX} and enc["input_ids"][n_prompt:] == sup
        prompt = enc["input_ids"][:n_prompt]
        if enc["truncated"]:
            assert answer in tok.decode(prompt) or ex.is_impossible  # the cut kept the answer span
        else:
            assert prompt == tok.encode(data.build_prompt(ex, fmt), bos=tok.add_bos)


def test_chatml_matches_the_model_chat_template(toks, samples):
    """Our ChatML training sequence is what SmolLM2's own chat template renders (transformers)."""
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(SMOLLM)
    for ex in samples[:2]:
        messages = [{"role": "system", "content": data.INSTRUCTION},
                    {"role": "user", "content": f"Context: {ex.context}\n\nQuestion: {ex.question}"},
                    {"role": "assistant", "content": ex.answers[0]}]
        rendered = ref.apply_chat_template(messages, tokenize=False)
        ref_ids = ref.encode(rendered, add_special_tokens=False)
        enc = data.encode_for_training(toks["smollm"], ex, "chatml", 1024)
        # The template also writes "\n" after the closing <|im_end|>; the answer ends at <|im_end|>.
        assert ref_ids[:-1] == enc["input_ids"] and ref.decode(ref_ids[-1:]) == "\n"
        assert ref.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == \
            data.build_prompt(ex, "chatml")


def test_prompt_for_generation(toks, samples):
    tok, ex = toks["gpt2"], samples[0]
    ids, truncated = data.encode_prompt(tok, ex, "plain", 1024, 32)
    assert not truncated and ids == tok.encode(data.build_prompt(ex, "plain"))
    ids, truncated = data.encode_prompt(tok, ex, "plain", 120, 32)
    text = tok.decode(ids)
    assert truncated and 120 - 32 - 8 <= len(ids) <= 120 - 32  # cut, and not much more than needed
    assert ex.context[:40] in text and ex.context[-40:] not in text  # cut from the end
    assert text.endswith(f"Question: {ex.question}\n\nAnswer:\n")
    with pytest.raises(UserError, match=ex.id):
        data.encode_prompt(tok, ex, "plain", 40, 32)


def test_too_long_is_dropped_and_counted(toks, samples):
    tok = toks["smollm"]
    assert data.encode_for_training(tok, samples[0], "chatml", 40) is None  # the prompt alone is longer
    encoded, stats = data.prepare(tok, samples, "chatml", 110)
    assert stats == dict(n_examples=3, n_truncated=3, n_dropped=0) and len(encoded) == 3
    encoded, stats = data.prepare(tok, samples, "chatml", 40)
    assert stats == dict(n_examples=3, n_truncated=0, n_dropped=3) and encoded == []


def test_squad_versions_and_counts(squad2):
    # Counts from the official files (see assets/squad/README.md).
    kind, examples = data.load_examples(SQUAD_V1)
    assert kind == "squad1" and len(examples) == 10570 and not any(ex.is_impossible for ex in examples)
    assert sum(len(ex.answers) for ex in examples) == 34726
    kind, examples = squad2
    assert kind == "squad2" and len(examples) == 11873
    assert sum(ex.is_impossible for ex in examples) == 5945
    assert sum(len(ex.answers) for ex in examples) == 20302 and len({ex.title for ex in examples}) == 35
    ex = examples[0]
    assert ex.context[ex.answer_starts[0]:].startswith(ex.answers[0])


def test_split_by_article(squad2):
    examples = squad2[1]
    train, val = data.split_examples(examples, 0.2, seed=0)
    assert len(train) + len(val) == len(examples) and val
    assert not {ex.title for ex in train} & {ex.title for ex in val}
    assert len({ex.title for ex in val}) == 7  # 20% of 35 articles
    again = data.split_examples(examples, 0.2, seed=0)
    assert [ex.id for ex in again[1]] == [ex.id for ex in val]
    other = data.split_examples(examples, 0.2, seed=1)
    assert {ex.title for ex in other[1]} != {ex.title for ex in val}
    assert data.split_examples(examples, 0.0, seed=0)[1] == []
    with pytest.raises(UserError, match="fraction"):
        data.split_examples(examples, 1.0, seed=0)


def test_medquad():
    kind, examples = data.load_examples(MEDQUAD)
    assert kind == "instruct" and len(examples) == 2051
    with open(MEDQUAD, encoding="utf-8") as f:
        first = json.loads(f.readline())
    ex = examples[0]
    assert (ex.id, ex.question, ex.answers, ex.context, ex.title) == (
        first["id"], first["question"], [first["answer"]], "", first["focus"])
    assert not ex.is_impossible and ex.answer_starts == []
    train, val = data.split_examples(examples, 0.1, seed=0)
    assert not {ex.title for ex in train if ex.title} & {ex.title for ex in val if ex.title}
    # Free-form: no extractive instruction, just the question.
    assert data.build_prompt(ex, "chatml") == f"<|im_start|>user\n{ex.question}<|im_end|>\n<|im_start|>assistant\n"


def test_instruction_json_with_input(tmp_path, toks):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Translate to French.", "input": "cat", "output": "chat"}]))
    kind, [ex] = data.load_examples(str(path))
    assert kind == "instruct" and (ex.question, ex.context, ex.answers) == ("Translate to French.", "cat", ["chat"])
    assert data.build_prompt(ex, "plain") == "Translate to French.\n\ncat\n\nAnswer:\n"
    enc = data.encode_for_training(toks["gpt2"], ex, "plain", 64)
    assert toks["gpt2"].decode(supervised(enc)) == "chat<|endoftext|>"


def _tiny_squad():
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}],
         "is_impossible": False}]}]}]}


def _mutate(change):
    doc = _tiny_squad()
    change(doc, doc["data"][0]["paragraphs"][0], doc["data"][0]["paragraphs"][0]["qas"][0])
    return json.dumps(doc).encode()


BAD_FILES = [
    ("a.json", b'{"version": "v2.0", "data": [', "not valid JSON"),
    ("b.json", b'{"version": "1.1", "data": [{"title": "caf\xe9"}]}', "not UTF-8"),
    ("c.json", b'{"answers": 3}', "wrong structure"),
    ("d.json", _mutate(lambda d, p, q: d.update(version="3.0")), "unknown SQuAD version '3.0'"),
    ("e.json", _mutate(lambda d, p, q: q.pop("question")), "qas[0]: missing field 'question'"),
    ("f.json", _mutate(lambda d, p, q: q.pop("is_impossible")), "missing field 'is_impossible'"),
    ("g.json", _mutate(lambda d, p, q: q["answers"][0].update(answer_start=11)),
     "answer_start 11 does not match the answer 'France'"),
    ("h.json", _mutate(lambda d, p, q: p.update(context="  ")), "paragraphs[0]: empty context"),
    ("i.json", _mutate(lambda d, p, q: q.update(question=" ")), "empty question"),
    ("j.json", _mutate(lambda d, p, q: q["answers"][0].update(answer_start="12")), "'answer_start' should be"),
    ("k.jsonl", b'{"question": "a?", "answer": "b"}\n\n{"question": "c?", "answer": "d"\n', "line 3: not valid JSON"),
    ("l.jsonl", b'{"question": "a?", "answer": "b"}\n{"question": "c?"}\n', "line 2: needs a non-empty 'output'"),
    ("m.jsonl", b'{"question": "a?", "answer": "b"}\n["c?", "d"]\n', "line 2: expected a JSON object"),
    ("n.jsonl", b'{"question": "a?", "answer": "b"}\n{"question": "\xff", "answer": "d"}\n', "line 2: not UTF-8"),
    ("o.json", b'[{"instruction": "a", "output": "b", "id": "x"}, {"question": "c", "answer": "d", "id": "x"}]',
     "duplicate id 'x'"),
]


@pytest.mark.parametrize("name,content,problem", BAD_FILES)
def test_malformed_input(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        data.load_examples(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_valid_tiny_squad(tmp_path):
    path = tmp_path / "ok.json"
    path.write_bytes(_mutate(lambda d, p, q: None))
    assert data.load_examples(str(path)) == ("squad2", [Example("q1", "Where is Paris?", "Paris is in France.",
                                                                ["France"], [12], False, "T")])


def test_collate_and_show_example(toks, samples):
    tok = toks["llama2"]
    batch = [data.encode_for_training(tok, ex, "llama2", 1024) for ex in samples]
    input_ids, labels = data.collate(batch, tok.pad_id)
    lengths = [len(b["input_ids"]) for b in batch]
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.shape == labels.shape == (3, max(lengths))
    for row, b, n in zip(range(3), batch, lengths):
        assert input_ids[row, :n].tolist() == b["input_ids"] and labels[row, :n].tolist() == b["labels"]
        assert (input_ids[row, n:] == tok.pad_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
    for b in batch:
        shown = data.show_example(tok, b["input_ids"], b["labels"])
        sup = supervised(b)
        assert re.findall(r"\[\[(.*?)\]\]", shown, re.S) == [tok.decode(sup)]
        prompt = b["input_ids"][:len(b["input_ids"]) - len(sup)]
        assert shown == tok.decode(prompt) + f"[[{tok.decode(sup)}]]"
    b = batch[0]  # tensors work too
    assert data.show_example(tok, torch.tensor(b["input_ids"]), torch.tensor(b["labels"])) == \
        data.show_example(tok, b["input_ids"], b["labels"])


def test_prompts_and_answers(toks, samples):
    ex = samples[0]
    for fmt in data.FORMATS:
        prompt = data.build_prompt(ex, fmt)
        assert ex.context in prompt and ex.question in prompt and f"reply: {NO_ANSWER}" in prompt
    assert data.build_prompt(ex, "llama2").startswith("[INST] <<SYS>>\n") and \
        data.build_prompt(ex, "llama2").endswith(" [/INST]")
    assert data.build_prompt(ex, "llama3").endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(UserError, match="unknown prompt format"):
        data.build_prompt(ex, "alpaca")
    with pytest.raises(UserError, match="needs the token <\\|im_end\\|>"):
        data.end_token(toks["gpt2"], "chatml")
    assert data.end_token(toks["smollm"], "chatml") == 2 and data.end_token(toks["llama2"], "plain") == 2
    assert data.answer_from_generation(" Denver Broncos<|im_end|>\n") == "Denver Broncos"
    assert data.answer_from_generation("Paris</s>") == "Paris"
    assert data.answer_from_generation("1066\nQuestion: next") == "1066"
    assert data.answer_from_generation(f" {NO_ANSWER}<|eot_id|>") == ""
    assert data.answer_from_generation("Unanswerable.") == ""
    assert data.answer_from_generation("Unanswerable!") == data.answer_from_generation("unanswerable ?") == ""


def test_sample_examples_draws_the_asked_unanswerable_share(squad2):
    _, examples = squad2
    picked = data.sample_examples(examples, 600, 1 / 3, seed=0)
    assert len(picked) == 600 and sum(ex.is_impossible for ex in picked) == 200
    assert len({ex.id for ex in picked}) == 600 and picked == data.sample_examples(examples, 600, 1 / 3, seed=0)
    assert picked != data.sample_examples(examples, 600, 1 / 3, seed=1)
    everything = data.sample_examples(examples, 0, 0.25, seed=0)    # no limit: as many as the share allows
    n_answerable = sum(not ex.is_impossible for ex in examples)
    assert sum(not ex.is_impossible for ex in everything) == n_answerable
    assert sum(ex.is_impossible for ex in everything) == round(len(everything) * 0.25)
    assert sum(ex.is_impossible for ex in data.sample_examples(examples, 50, 0.0, seed=0)) == 0
    assert len(data.sample_examples(examples, 50, -1, seed=0)) == 50           # -1: as drawn from the data


def test_unanswerable_share_needs_squad2_data():
    _, examples = data.load_examples(SQUAD_V1)
    with pytest.raises(UserError, match="needs SQuAD v2.0"):
        data.sample_examples(examples, 100, 0.3, seed=0)
