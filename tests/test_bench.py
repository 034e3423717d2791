"""bench.py runs end to end on a tiny random model, and both sides compute the same thing."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_runs_and_compares_like_with_like(tmp_path):
    table = tmp_path / "bench.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--markdown", str(table)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = table.read_text()
    for row in ("tokens/s", "train tiny 2x64 squad: peak MiB", "load tiny: peak MiB", "batch 4: answers/s",
                "all supervised: step MiB above weights and input"):
        assert re.search(rf"\| [^|]*{re.escape(row)} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text), row
    # Same weights, same batch, LoRA B = 0: the first training loss is the base model's on both sides.
    ours, theirs = map(float, re.search(r"first loss ours ([\d.]+), theirs ([\d.]+)", text).groups())
    assert abs(ours - theirs) < 0.01 * theirs
    ours, naive = map(float, re.search(r"loss ours ([\d.]+), naive ([\d.]+)", text).groups())
    assert abs(ours - naive) < 1e-3 * naive
