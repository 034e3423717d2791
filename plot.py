"""Plot a training run: `python plot.py runs/X/metrics.jsonl [-o plot.png]`.

Train loss and validation loss against the optimizer step on top, the learning rate below, as a PNG
(default: plot.png beside the metrics file).
"""
import argparse
import json
import os

from errors import UserError, run_cli


def read_metrics(path):
    """train.py's metrics.jsonl as a list of dicts; a malformed line is a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}: line {n}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}: line {n}: not a metrics record (a JSON object with an integer 'step')")
        records.append(record)
    if not any("loss" in r or "val_loss" in r for r in records):
        raise UserError(f"{path}: no loss records to plot")
    return records


def plot(records, out, title=""):
    """Write the PNG: losses on top, learning rate below, both against the step."""
    import matplotlib
    matplotlib.use("Agg")               # files only: no display needed
    import matplotlib.pyplot as plt

    def series(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), gridspec_kw=dict(height_ratios=(2, 1)))
    top.plot(*series("loss"), label="train loss", lw=1)
    top.plot(*series("val_loss"), "o-", label="validation loss")
    top.set_ylabel("loss (nats per supervised token)")
    top.legend()
    top.grid(alpha=0.3)
    top.set_title(title)
    bottom.plot(*series("lr"), color="tab:green")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{out}.tmp-{os.getpid()}.png"     # the suffix tells matplotlib the format
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)                # a reader never sees half a file
    except OSError as err:
        raise UserError(f"{out}: cannot write ({err.strerror})") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by train.py")
    parser.add_argument("-o", "--out", help="PNG to write (default: plot.png beside the metrics file)")
    args = parser.parse_args(argv)
    records = read_metrics(args.metrics)
    out = args.out or os.path.join(os.path.dirname(args.metrics), "plot.png")
    plot(records, out, title=os.path.basename(os.path.dirname(os.path.abspath(args.metrics))))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
