"""quant.estimate_memory against what torch really holds: autograd's saved tensors and the loaded model."""
import pytest
import torch

from conftest import SQUAD_V1, STORIES
from lora import apply_lora, parameter_report
from model import Config, GPT2Block, LlamaBlock, Transformer, rope_cos_sin, rope_inv_freq
from quant import (activation_bytes_per_token, estimate_memory, is_4bit, make_linear, memory_report,
                   set_linear_weight)

LLAMA = Config(vocab_size=512, dim=256, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=640)
GPT2 = Config(arch="gpt2", vocab_size=512, dim=256, n_layers=1, n_heads=4, hidden_dim=1024, max_seq_len=64,
              attn_bias=True, mlp_bias=True)


def saved_bytes_per_token(cfg, *, quantize, dropout, targets, B=2, T=64, rank=8):
    """Bytes per token of the tensors autograd saves in one block's forward (not parameters, not RoPE's)."""
    torch.manual_seed(0)
    linear = lambda i, o, bias: make_linear(i, o, bias=bias, quantize=quantize, compute_dtype=torch.bfloat16)  # noqa: E731
    block = (GPT2Block if cfg.arch == "gpt2" else LlamaBlock)(cfg, linear)
    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            set_linear_weight(m, 0.02 * torch.randn(m.out_features, m.in_features), device="cpu", dtype=torch.bfloat16)
    for name, p in block.named_parameters():
        p.data = p.data.to(torch.bfloat16) if p.dtype != torch.uint8 else p.data
    apply_lora(block, rank, 2 * rank, dropout, targets)
    block.train()
    x = torch.randn(B, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = None if cfg.arch == "gpt2" else rope_cos_sin(rope_inv_freq(cfg), torch.arange(T).expand(B, T), torch.bfloat16)
    skip = {t.untyped_storage().data_ptr() for t in [*(rope or ()), *block.parameters()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.dim() > 1 and t.shape[0] in (B, B * T):    # per-token tensors
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope, None, 0, None)
    return sum(saved.values()) / (B * T)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("quantize", ["nf4", None])
@pytest.mark.parametrize("dropout", [0.05, 0.0])
@pytest.mark.parametrize("targets", ["all-linear", "attn"])
def test_activation_formula_equals_what_autograd_saves(cfg, quantize, dropout, targets):
    if targets == "attn":
        targets = ["c_attn"] if cfg.arch == "gpt2" else ["q_proj", "v_proj"]
    measured = saved_bytes_per_token(cfg, quantize=quantize, dropout=dropout, targets=targets)
    formula = activation_bytes_per_token(cfg, rank=8, targets=targets, dtype=torch.bfloat16, dropout=dropout,
                                         device="cpu")
    assert formula == measured


SMALL = Config(vocab_size=4096, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=640)


def random_4bit_model(cfg):
    """A Transformer with random NF4 block linears and bf16 embedding, head and norms, as load_model builds."""
    torch.manual_seed(0)
    linear = lambda i, o, bias: make_linear(i, o, bias=bias, quantize="nf4", compute_dtype=torch.bfloat16)  # noqa: E731
    model = Transformer(cfg, linear)
    for m in list(model.modules()):
        if is_4bit(m):
            set_linear_weight(m, 0.02 * torch.randn(m.out_features, m.in_features), device="cpu", dtype=torch.bfloat16)
    for p in model.parameters():
        if p.dtype != torch.uint8:
            p.data = p.data.to(torch.bfloat16)
    return model


def test_estimated_weights_and_adapter_size_equal_the_model():
    targets = ["q_proj", "v_proj", "down_proj"]
    model = random_4bit_model(SMALL)
    apply_lora(model, 8, 16, 0.0, targets)
    e = estimate_memory(SMALL, quantize="nf4", rank=8, targets=targets, batch_size=1, max_seq_len=8,
                        dtype=torch.bfloat16, grad_checkpointing=False)
    assert e["lora_params"] == parameter_report(model)["trainable"]
    report = memory_report(model)     # counts the fp32 LoRA weights and the RoPE buffer too
    held = report["total_bytes"] - 4 * e["lora_params"] - model.inv_freq.nbytes
    assert e["weights"] == pytest.approx(held, rel=1e-4)


def tensor_peak(step):
    """Peak bytes of tensors allocated during `step()` above those alive before it (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimated_peak_of_a_training_step_is_within_15_percent(checkpointing):
    import train
    cfg, B, T = SMALL, 4, 96
    model = random_4bit_model(cfg)
    apply_lora(model, 16, 32, 0.05, "all-linear")
    model.grad_checkpointing = checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    labels = torch.full((B, T), -100)
    labels[:, -32:] = ids[:, -32:]      # 32 supervised tokens per example, as the estimate assumes

    def step():
        nll, n = train.masked_loss_sum(model, ids, labels)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()      # AdamW allocates its moments in the first step
    steady = memory_report(model)["total_bytes"] + sum(8 * p.numel() for p in params)
    measured = steady + tensor_peak(step)
    e = estimate_memory(cfg, quantize="nf4", rank=16, targets="all-linear", batch_size=B, max_seq_len=T,
                        dtype=torch.bfloat16, grad_checkpointing=checkpointing, device="cpu")
    assert measured <= e["total"] <= 1.15 * measured


def test_estimate_cli_plans_from_a_preset_a_directory_or_a_list_without_loading(monkeypatch, capsys):
    import train
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    train.train(train.parse_args(["--estimate", "--device", "cuda", "--model", "llama-3-8b"]))
    settings, line = capsys.readouterr().out.splitlines()
    assert "batch 4 x 512 tokens, gradient checkpointing on" in settings and "dtype bfloat16" in settings
    assert line.startswith("memory estimate 7.21 GiB: weights 5.31 + LoRA with AdamW 0.62")   # docs/memory.md
    train.train(train.parse_args(["--estimate", "--model", STORIES, "--device", "cpu", "--rank", "8"]))
    assert "batch 8 x 256 tokens" in capsys.readouterr().out
    train.train(train.parse_args(["--estimate", "--device", "cuda", "--model", "llama-2-7b,mistral-7b"]))
    table = capsys.readouterr().out.splitlines()[1:]
    assert table[0].startswith("| model |") and [row.split(" | ")[0] for row in table[2:]] == ["| llama-2-7b",
                                                                                              "| mistral-7b"]


def test_a_training_run_prints_its_estimate_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import train
    loaded = train.load_model
    monkeypatch.setattr(train, "load_model", lambda *a, **k: (print("<loading>"), loaded(*a, **k))[1])
    train.train(train.parse_args(["--model", STORIES, "--data", SQUAD_V1, "--out", str(tmp_path), "--limit", "8",
                                  "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--val-max", "2",
                                  "--max-seq-len", "192", "--dtype", "float32"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("device cpu, dtype float32, base nf4")
    assert lines[1].startswith("memory estimate ") and lines[2] == "<loading>"
