"""Plot training runs from their metrics.jsonl: one PNG, several runs overlaid.

    python scripts/plot.py RUN_DIR [RUN_DIR ...] [--out FILE.png]

Panels: train and val loss against tokens seen, learning rate, gradient norm, tokens/s, and expert load
(the busiest expert's share over an even share, worst layer). Default output: RUN_DIR/metrics.png of the
first run. It reads metrics.jsonl through `read_metrics`, so a run still being written (or killed mid-row)
plots what it has, and a damaged file is one line naming it.
"""

import io
from pathlib import Path

from groundwork.cli import ArgumentParser, run_main
from groundwork.folders import write_durably
from train.metrics import MetricsError, read_metrics

PANELS = [  # (title, metric, y scale)
    ("loss (train: line, val: dots)", "loss", "log"),
    ("learning rate", "lr", "linear"),
    ("gradient norm (before clipping)", "grad_norm", "log"),
    ("tokens / s", "tokens_per_s", "linear"),
    ("expert load: busiest / even (worst layer)", "expert_load_max", "linear"),
]


def read_rows(run: Path) -> list[dict]:
    """One row per step: a resumed run logs the steps since its checkpoint again, the last one stands."""
    last = {row["step"]: row for row in read_metrics(run)}
    if not last:
        raise MetricsError(f"{run / 'metrics.jsonl'}: no rows yet; plot once the run has logged a step")
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
    import matplotlib  # here, not at import: choosing the Agg backend is this function's business alone

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    every_run = [(run, read_rows(run)) for run in runs]  # all read before drawing: a bad one fails first
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.flatten()
    for run, rows in every_run:
        for ax, (_, key, _) in zip(axes, PANELS):
            (line,) = ax.plot(*series(rows, key), label=run.name)
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
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_durably(out, png.getvalue())  # a reader never sees half a PNG
    return out


def plot_scaling(curves: dict[str, list[tuple[int, float]]], title: str, out: Path) -> Path:
    """Predicted tokens/day against GPU count, one curve per label (the planner's best layout at each count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        ax.plot([g for g, _ in points], [t / 1e12 for _, t in points], "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted tokens/day (T)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    write_durably(out, png.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/plot.py", description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: FIRST_RUN/metrics.png)")
    args = parser.parse_args(argv)
    out = args.out or args.runs[0] / "metrics.png"
    if args.out and out.is_dir():
        parser.error(f"argument --out: {out} is a folder; name the PNG file to write")
    if args.out and not out.parent.is_dir():
        parser.error(f"argument --out: {out.parent} is not a folder; create it or write elsewhere")

    def work():
        print(f"plot: {plot(args.runs, out)}")

    return run_main(work)
