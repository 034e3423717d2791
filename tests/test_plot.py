"""plot.py: a valid PNG from train.py's metrics.jsonl, and a one-line error naming a bad line."""
import json
import struct
import subprocess
import sys

import pytest

import plot
from conftest import ROOT
from errors import UserError


def write_metrics(path, n=30):
    """Lines as train.py writes them: a train record per step, validation every 10 steps, one skipped step."""
    with open(path, "w") as f:
        for step in range(n + 1):
            if step:
                f.write(json.dumps(dict(step=step, loss=2.5 - step / n, lr=2e-4 * min(1, step / 5), grad_norm=0.5,
                                        tokens_per_s=480.0, peak_mem_mb=900)) + "\n")
            if step % 10 == 0:
                f.write(json.dumps(dict(step=step, val_loss=2.6 - step / (2 * n))) + "\n")
        f.write(json.dumps(dict(step=n + 1, skipped="non-finite loss or gradient")) + "\n")


def test_writes_a_png_beside_the_metrics(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    plot.main([str(tmp_path / "metrics.jsonl")])
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (960, 720)          # 8 x 6 inches at 120 dpi
    import matplotlib.pyplot as plt
    pixels = plt.imread(tmp_path / "plot.png")                       # decodes: a complete file
    assert pixels.shape[:2] == (720, 960) and pixels.std() > 0.05    # not blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "plot.png"]   # no temp left


@pytest.mark.parametrize("bad,message", [
    ('{"step": 3, "loss": 1.0', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: not a metrics record"),
    ('{"loss": 1.0}', "line 2: not a metrics record"),
])
def test_a_bad_line_is_a_one_line_error_with_its_number(tmp_path, bad, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n' + bad + "\n")
    with pytest.raises(UserError, match=f"metrics.jsonl: {message}"):
        plot.main([str(path), "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()
    run = subprocess.run([sys.executable, "plot.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr


def test_nothing_to_plot_or_no_file_are_errors(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 0, "skipped": "x"}\n')
    with pytest.raises(UserError, match="no loss records"):
        plot.main([str(tmp_path / "m.jsonl")])
    with pytest.raises(UserError, match="missing.jsonl: cannot read"):
        plot.main([str(tmp_path / "missing.jsonl")])
