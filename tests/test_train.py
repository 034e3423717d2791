"""The training loop: the masked loss, token-weighted accumulation, resume, and a CLI smoke run."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train as T
from conftest import ROOT, SQUAD_V1, STORIES
from data import IGNORE_INDEX, collate
from lora import apply_lora, lora_layers
from model import Config, Transformer
from quant import dequantize_weight, is_4bit, make_linear, set_linear_weight

from safetensors.torch import load_file


def tiny_lora_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48))
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    for _, layer in lora_layers(model):           # non-zero B, so gradients reach A too
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model.train()


def batch(seed, B=3, T_=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, T_), generator=g)
    labels = ids.clone()
    labels[:, : T_ // 2] = IGNORE_INDEX                          # the prompt
    labels[0, -2:] = IGNORE_INDEX                                # padding of a shorter row
    return ids, labels


def test_masked_loss_equals_hand_computation():
    model = tiny_lora_model()
    ids, labels = batch(0)
    total, n = T.masked_loss_sum(model, ids, labels, chunk=2)   # several chunks
    logits = model(ids)
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    n_hand = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert n == n_hand
    torch.testing.assert_close(total / n, per_token.sum() / n_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_gradient_written_out_in_forward_equals_autograd_of_full_logits(dtype):
    """ChunkedCrossEntropy forms d loss / d hidden = (softmax - onehot) @ W in forward; it must equal what
    autograd gives for F.cross_entropy over the full logits, for several chunks and a scaled loss."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(300, 16, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, 300, (37,), generator=g)
    total = T.ChunkedCrossEntropy.apply(hidden, weight, targets, 8)
    (total / 5).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    reference = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    (reference / 5).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(total, reference, **tol)
    torch.testing.assert_close(ours, hidden.grad, **tol)
    with torch.no_grad():                          # validation: no gradient formed, same loss
        torch.testing.assert_close(T.ChunkedCrossEntropy.apply(hidden, weight, targets, 8), total)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_token_weighted_accumulation_equals_one_big_batch():
    big_ids, big_labels = torch.cat([batch(1)[0], batch(2)[0]]), torch.cat([batch(1)[1], batch(2)[1]])
    big_labels[4, :] = IGNORE_INDEX                             # micro-batches with unequal token counts
    big_labels[4, -1] = 7
    model = tiny_lora_model()
    total, n = T.masked_loss_sum(model, big_ids, big_labels)
    (total / n).backward()
    one = grads(model)

    model = tiny_lora_model()
    micro = [(big_ids[:3], big_labels[:3]), (big_ids[3:], big_labels[3:])]
    n_window = sum(int((lab[:, 1:] != IGNORE_INDEX).sum()) for _, lab in micro)
    for ids, labels in micro:
        total, _ = T.masked_loss_sum(model, ids, labels)
        (total / n_window).backward()
    accumulated = grads(model)
    assert one.keys() == accumulated.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-5, atol=1e-7)


def test_gradients_through_4bit_layers_stay_right_after_an_evaluation():
    """DESIGN.md: an eval-mode no-grad forward must not cut or corrupt the gradient path of 4-bit layers.

    After validation, the LoRA gradients of a 4-bit model equal those of an fp32 twin holding the
    dequantized weights; only LoRA parameters get gradients.
    """
    cfg = Config(vocab_size=64, dim=64, n_layers=2, n_heads=4, hidden_dim=172)   # 172: a shape bnb's kernel rejects
    torch.manual_seed(0)
    q4 = Transformer(cfg, linear=lambda i, o, bias: make_linear(i, o, bias=bias, quantize="nf4"))
    fp = Transformer(cfg)
    for (name, m4), (_, m32) in zip(q4.named_modules(), fp.named_modules()):
        if is_4bit(m4):
            set_linear_weight(m4, torch.randn(m4.out_features, m4.in_features) * 0.05, device="cpu",
                              dtype=torch.float32)
            m32.weight.data = dequantize_weight(m4).clone()
    q4.lm_head.weight, q4.model.embed_tokens.weight = fp.lm_head.weight, fp.model.embed_tokens.weight
    q4.model.norm.weight = fp.model.norm.weight
    for model in (q4, fp):
        apply_lora(model, rank=4, alpha=8, dropout=0.0, targets="all-linear")
    for (_, a), (_, b) in zip(lora_layers(q4), lora_layers(fp)):
        torch.nn.init.normal_(a.lora_B.weight, std=0.1)
        b.lora_A.weight.data, b.lora_B.weight.data = a.lora_A.weight.data.clone(), a.lora_B.weight.data.clone()
    ids, labels = batch(3)
    T.validation_loss(q4, [dict(input_ids=ids[0].tolist(), labels=labels[0].tolist())],
                      T.TrainConfig(batch_size=1), 0, lambda: torch.autocast("cpu", enabled=False))
    for model in (q4, fp):
        model.train()
        total, n = T.masked_loss_sum(model, ids, labels)
        (total / n).backward()
    g4, g32 = grads(q4), grads(fp)
    assert g4.keys() == g32.keys() and "model.layers.0.self_attn.q_proj.lora_A.weight" in g4
    for name in g4:
        torch.testing.assert_close(g4[name], g32[name], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in q4.parameters() if not p.requires_grad)


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = T.TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [T.lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert T.lr_at(100, cfg, 100) == pytest.approx(1e-4)


def test_batches_are_deterministic_and_resumable():
    data = list(range(10))
    stream = T.batches(data, 3, seed=5, start=0)
    first = [next(stream) for _ in range(7)]                    # crosses two epoch boundaries
    resumed = T.batches(data, 3, seed=5, start=4)
    assert [next(resumed) for _ in range(3)] == first[4:]
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))   # no repeats within an epoch


def run_train(out, *extra):
    cmd = [sys.executable, "train.py", "--model", STORIES, "--data", SQUAD_V1, "--out", str(out),
           "--max-seq-len", "192", "--batch-size", "2", "--grad-accum", "2", "--limit", "40",
           "--val-max", "4", "--eval-every", "2", "--log-every", "1", "--dropout", "0.1", "--lr", "1e-3",
           "--dtype", "float32", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_smoke_run_writes_adapter_checkpoint_and_log(tmp_path):
    result = run_train(tmp_path / "run", "--max-steps", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "run"
    for f in ("run.json", "metrics.jsonl", "checkpoint.pt", "best/adapter_model.safetensors",
              "final/adapter_config.json", "final/adapter_model.safetensors"):
        assert (out / f).exists(), f
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in records if "loss" in r)
    assert "trainable params" in result.stdout and "[[" in result.stdout     # report + marked example
    config = json.load(open(out / "final/adapter_config.json"))
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    again = run_train(out, "--max-steps", "4")                  # refuses to overwrite the earlier run
    assert again.returncode == 2 and "earlier run" in again.stderr and again.stderr.count("\n") == 1


def test_resume_gives_the_same_adapter_as_a_straight_run(tmp_path):
    straight = run_train(tmp_path / "a", "--max-steps", "4")
    assert straight.returncode == 0, straight.stderr[-2000:]
    half = run_train(tmp_path / "b", "--max-steps", "2")
    assert half.returncode == 0, half.stderr[-2000:]
    # Same total schedule: rewrite the saved config's max_steps by resuming with --max-steps 4.
    resumed = run_train(tmp_path / "b", "--max-steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "a/final/adapter_model.safetensors")
    b = load_file(tmp_path / "b/final/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b/metrics.jsonl")
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_optimizers_train_the_adapters(kind):
    model = tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = T.make_optimizer(T.TrainConfig(optimizer=kind, lr=1e-2), params)
    before = [p.detach().clone() for p in params]
    ids, labels = batch(4)
    losses = []
    for _ in range(3):
        total, n = T.masked_loss_sum(model, ids, labels)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item() / n)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert losses[-1] < losses[0]
