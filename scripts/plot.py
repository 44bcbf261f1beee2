"""Plot training runs from their metrics.jsonl: one PNG, several runs overlaid.

    python scripts/plot.py RUN_DIR [RUN_DIR ...] [--out FILE.png]

Panels: train and val loss against tokens seen, learning rate, gradient norm, tokens/s, and expert load
(the busiest expert's share over an even share, worst layer). Default output: RUN_DIR/metrics.png of the
first run.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [  # (title, metric, y scale)
    ("loss (train: line, val: dots)", "loss", "log"),
    ("learning rate", "lr", "linear"),
    ("gradient norm (before clipping)", "grad_norm", "log"),
    ("tokens / s", "tokens_per_s", "linear"),
    ("expert load: busiest / even (worst layer)", "expert_load_max", "linear"),
]


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl; pass a run folder (run.out_dir of a training run)")
    last = {}
    for line in path.read_text().splitlines():  # a resumed run logs some steps twice: the last one stands
        row = json.loads(line)
        last[row["step"]] = row
    return [last[step] for step in sorted(last)]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, list):
            value = max(value) if value else None
        if value is not None and value == value:  # skip missing and NaN (a skipped update's loss)
            xs.append(row["tokens_seen"] / 1e6)
            ys.append(value)
    return xs, ys


def plot(runs: list[Path], out: Path) -> Path:
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.flatten()
    for run in runs:
        rows = read_rows(run)
        for ax, (_, key, _) in zip(axes, PANELS):
            line, = ax.plot(*series(rows, key), label=run.name)
            if key == "loss":
                ax.plot(*series(rows, "val_loss"), "o", color=line.get_color(), markersize=4)
    for ax, (title, _, scale) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("tokens seen (M)")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[-1].axis("off")
    figure.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/plot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: FIRST_RUN/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.runs, args.out or args.runs[0] / "metrics.png")
    except (FileNotFoundError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
