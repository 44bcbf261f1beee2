"""Plot training runs from their metrics.jsonl: one PNG, several runs overlaid.

    python scripts/plot.py RUN_DIR [RUN_DIR ...] [--out FILE.png]

Panels: train and val loss against tokens seen, learning rate, gradient norm, tokens/s, and expert load
(the busiest expert's share over an even share, worst layer). Default output: RUN_DIR/metrics.png of the
first run. It reads metrics.jsonl through `read_metrics`, so a run still being written (or killed mid-row)
plots what it has, and a damaged file is one line naming it. FILE.png is written new, or replaced only if
it is a plot of this project (a PNG whose Software text says minicolossus); anything else there is refused.
"""

import io
import math
import os
import stat
from pathlib import Path

from groundwork.cli import ArgumentParser, run_main
from groundwork.folders import check_file_writable, write_file
from groundwork.untrusted import UntrustedFileError, regular_file
from train.metrics import MetricsError, read_metrics

SOFTWARE = "minicolossus"  # the PNG text chunk that marks a plot as this project's (and so replaceable)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PANELS = [  # (title, metric, y scale)
    ("loss (train: line, val: dots)", "loss", "log"),
    ("learning rate", "lr", "linear"),
    ("gradient norm (before clipping)", "grad_norm", "log"),
    ("tokens / s", "tokens_per_s", "linear"),
    ("expert load: busiest / even (worst layer)", "expert_load_max", "linear"),
]


def our_png(path: Path) -> bool:
    """A PNG this project wrote: its Software text chunk (written before the image data) names us."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(PNG_SIGNATURE) and b"tEXtSoftware\x00" + SOFTWARE.encode() in head


def check_png_out(out: Path, what: str) -> None:
    """Before any work: the PNG can be written (new, or a plot of ours; never through a symlink)."""
    check_file_writable(out, what, our_png)
    if not Path(out).parent.is_dir():
        raise UntrustedFileError(f"{what} {out}: {Path(out).parent} is not a folder; create it or write elsewhere")


def save_png(figure: object, out: Path, what: str) -> Path:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100, metadata={"Software": SOFTWARE})
    plt.close(figure)
    write_file(out, png.getvalue(), what, our_png)  # whole or not at all: a reader never sees half a PNG
    return out


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_row(row: dict, path: Path, line: int) -> None:
    """A row's plotted values are numbers (a list of them for per-layer values), or one line naming it."""
    problems = [key for key in ("step", "tokens_seen") if not _number(row.get(key))]
    problems += [
        key
        for key in [key for _, key, _ in PANELS] + ["val_loss"]
        if row.get(key) is not None
        and not _number(row[key])
        and not (isinstance(row[key], list) and all(_number(v) for v in row[key]))
    ]
    if problems:
        key = problems[0]
        raise MetricsError(
            f"{path}: line {line}: {key} is {str(row.get(key))[:40]!r}, not a number; restore the file or delete "
            f"that line"
        )


def read_rows(run: Path) -> list[dict]:
    """One row per step: a resumed run logs the steps since its checkpoint again, the last one stands."""
    path = Path(run) / "metrics.jsonl"
    if os.path.lexists(path):  # a FIFO would block the read forever, a link may point anywhere
        regular_file(path, "RUN_DIR", "pass a run folder of the trainer")
    rows = read_metrics(run)
    for line, row in enumerate(rows, 1):  # every line before the last is a row: row i is line i
        check_row(row, path, line)
    last = {row["step"]: row for row in rows}
    if not last:
        raise MetricsError(f"{run / 'metrics.jsonl'}: no rows yet; plot once the run has logged a step")
    return [last[step] for step in sorted(last)]


def series(rows: list[dict], key: str, scale: str = "linear") -> tuple[list, list]:
    """(tokens seen, value) of the rows that have the value: missing, NaN (a skipped update's loss) and, on a
    log scale, values <= 0 are left out."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, list):
            value = max(value) if value else None
        if value is not None and math.isfinite(value) and (scale != "log" or value > 0):
            xs.append(row["tokens_seen"] / 1e6)
            ys.append(value)
    return xs, ys


def plot(runs: list[Path], out: Path) -> Path:
    import matplotlib  # here, not at import: choosing the Agg backend is this function's business alone

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    every_run = [(run, read_rows(run)) for run in runs]  # all read before drawing: a bad one fails first
    check_png_out(out, "--out")
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.flatten()
    drawn = [False] * len(PANELS)
    for run, rows in every_run:
        for i, (ax, (_, key, scale)) in enumerate(zip(axes, PANELS)):
            xs, ys = series(rows, key, scale)
            (line,) = ax.plot(xs, ys, label=run.name)
            drawn[i] = drawn[i] or bool(xs)
            if key == "loss":
                xs, ys = series(rows, "val_loss", scale)
                ax.plot(xs, ys, "o", color=line.get_color(), markersize=4)
                drawn[i] = drawn[i] or bool(xs)
    for ax, (title, _, scale), any_point in zip(axes, PANELS, drawn):
        ax.set_title(title)
        ax.set_xlabel("tokens seen (M)")
        ax.set_yscale(scale if any_point else "linear")  # a log axis with no point cannot place its ticks
        ax.grid(alpha=0.3)
    axes[0].legend()
    expert_heatmap(figure, axes[-1], *every_run[0])
    figure.tight_layout()
    return save_png(figure, out, "--out")


def expert_heatmap(figure: object, ax: object, run: Path, rows: list[dict]) -> None:
    """Each layer's busiest expert over the run (the first run's; the load relative to an even share)."""
    loads = [(row["tokens_seen"] / 1e6, row["expert_load_max"]) for row in rows if row.get("expert_load_max")]
    layers = len(loads[0][1]) if loads else 0
    loads = [(x, load) for x, load in loads if len(load) == layers and all(map(_number, load))]
    if not loads:  # a dense model logs no expert load
        ax.axis("off")
        return
    matrix = [[load[layer] for _, load in loads] for layer in range(layers)]
    image = ax.imshow(
        matrix,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        extent=(loads[0][0], loads[-1][0], -0.5, layers - 0.5),
        cmap="magma",
    )
    figure.colorbar(image, ax=ax, label="busiest / even")
    ax.set_title(f"expert load per layer ({run.name})")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("layer")


def plot_scaling(curves: dict[str, list[tuple[int, float]]], title: str, out: Path, what: str = "--plot") -> Path:
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
    return save_png(figure, out, what)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/plot.py", description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: FIRST_RUN/metrics.png)")
    args = parser.parse_args(argv)
    out = args.out or args.runs[0] / "metrics.png"

    def work():
        if args.out:
            check_png_out(out, "--out")  # before reading a run: a refused --out costs nothing
        print(f"plot: {plot(args.runs, out)}")

    return run_main(work)
