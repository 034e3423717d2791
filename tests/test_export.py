"""export.py: the merged model that transformers loads computes what our base + adapter computes."""
import json
import os

import pytest
import torch

import export
from conftest import STORIES
from errors import UserError
from generate import generate
from lora import apply_lora, lora_layers, save_adapter
from model import load_model
from tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


def random_base(tmp_path, kind):
    """A tiny random checkpoint written by transformers itself: an untied GQA Llama or a GPT-2."""
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def trained_adapter(base, directory, seed=1):
    """Our fp32 model of `base` with an adapter whose B is far from zero, saved in the PEFT format."""
    model = load_model(base, dtype=torch.float32)
    apply_lora(model, 4, 8.0, 0.0, "all-linear")
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.2)
    save_adapter(model, directory)
    return model


def hf_greedy(model, prompt, n, eos):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_transformers_loads_the_export_with_our_logits_and_greedy_tokens(tmp_path, kind):
    base = random_base(tmp_path, kind)
    ours = trained_adapter(base, tmp_path / "adapter")
    export.main(["--model", base, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    assert {"model.safetensors", "config.json", "generation_config.json"} <= set(os.listdir(tmp_path / "out"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ours(ids), theirs(ids).logits
        base_logits = load_model(base, dtype=torch.float32)(ids)
    assert (expected - base_logits).abs().max() > 0.1            # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    prompt = ids[0, :8].tolist()
    with torch.no_grad():
        assert generate(ours, [prompt], max_new_tokens=16, stop_ids={2})[0] == hf_greedy(theirs, prompt, 16, 2)


def test_stories260k_export_generates_the_same_text_with_its_own_tokenizer(tmp_path):
    ours = trained_adapter(STORIES, tmp_path / "adapter")
    export.main(["--model", STORIES, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    tok = load_tokenizer(STORIES)
    prompt = tok.encode("Once upon a time, a little girl", bos=True)
    with torch.no_grad():
        text = tok.decode(generate(ours, [prompt], max_new_tokens=40, stop_ids=tok.stop_ids)[0])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")     # the copied tokenizer files
    assert hf_tok("Once upon a time, a little girl").input_ids == prompt
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert hf_tok.decode(hf_greedy(theirs, prompt, 40, tok.eos_id)) == text and len(text) > 20


def test_output_dtypes_follow_the_base_and_out_is_never_silently_replaced(tmp_path):
    base = random_base(tmp_path, "llama")
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    model.model.norm.weight.data += 0.1       # a mixed checkpoint: bf16 matrices, fp32 norms
    model.to(torch.bfloat16)
    for layer in model.model.layers:
        layer.input_layernorm.float()
    model.model.norm.float()
    model.save_pretrained(tmp_path / "mixed")
    trained_adapter(str(tmp_path / "mixed"), tmp_path / "adapter")
    argv = ["--model", str(tmp_path / "mixed"), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]
    export.main(argv)
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as out, \
            safe_open(tmp_path / "mixed" / "model.safetensors", "pt") as src:
        assert out.keys() == src.keys()
        for key in src.keys():
            assert out.get_tensor(key).dtype == src.get_tensor(key).dtype, key
            if "proj" not in key:             # what the adapter does not touch is copied bit for bit
                assert torch.equal(out.get_tensor(key), src.get_tensor(key)), key
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="--out .*out exists \\(pass --overwrite"):
        export.main(argv)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    export.main(argv + ["--overwrite"])
    assert not (tmp_path / "out" / "mine.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "mixed", "out"]       # no temp directories
    with pytest.raises(UserError, match="the base model's or the adapter's own directory"):
        export.main(argv[:4] + ["--out", str(tmp_path / "mixed"), "--overwrite"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
