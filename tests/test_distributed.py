"""Data-parallel training under torchrun: 2 CPU processes (gloo, loopback) == 1 process on the same global batches."""
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, SQUAD_V1, STORIES

COMMON = ["--model", STORIES, "--data", SQUAD_V1, "--max-seq-len", "192", "--grad-accum", "2", "--limit", "40",
          "--val-max", "4", "--eval-every", "2", "--log-every", "1", "--dropout", "0", "--lr", "1e-3",
          "--dtype", "float32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")      # two processes on two cores: no oversubscription


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out, ranks, *extra):
    # Each of W ranks takes batch 2; one process takes batch 2 * W: the same global batch.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if ranks > 1 else [sys.executable]
    cmd = launcher + ["train.py", *COMMON, "--batch-size", str(4 // ranks), "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    return result


def adapter(out):
    return load_file(os.path.join(out, "final", "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)   # only summation order differs


def test_two_ranks_equal_one_process_and_checkpoints_resume_in_both_modes(tmp_path):
    single = tmp_path / "single"
    run(single, 1, "--max-steps", "4")
    ddp = tmp_path / "ddp"
    result = run(ddp, 2, "--max-steps", "4")
    assert result.stdout.count("done:") == 1                  # only rank 0 reports
    assert_same_adapter(adapter(ddp), adapter(single))
    assert max(v.abs().max() for k, v in adapter(ddp).items() if "lora_B" in k) > 0   # it really trained
    log = lambda d: [line for line in open(d / "metrics.jsonl") if "val_loss" in line]  # noqa: E731
    assert log(ddp) == log(single)

    # A checkpoint written by rank 0 after 2 steps resumes under 2 ranks and in one process.
    for resumed_ranks in (2, 1):
        half = tmp_path / f"half-then-{resumed_ranks}"
        run(half, 2, "--max-steps", "2")
        run(half, resumed_ranks, "--max-steps", "4", "--resume")
        assert_same_adapter(adapter(half), adapter(single))
