"""Plot training curves: `python plot_loss.py RUN_DIR_OR_CSV [MORE ...] [--out PNG]`.

Train and validation loss per epoch on the left, validation accuracy on the right; several runs
(three seeds, say) are overlaid, each named in the legend by its run folder.
"""
import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on login and compute nodes
import matplotlib.pyplot as plt

COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc")


class PlotError(Exception):
    """A missing, empty or malformed metrics file."""


def read_metrics(path):
    """A run folder or metrics.csv -> (run name, {column: list of floats})."""
    csv_path = os.path.join(path, "metrics.csv") if os.path.isdir(path) else path
    name = os.path.basename(os.path.dirname(os.path.abspath(csv_path)))
    if not os.path.isfile(csv_path):
        raise PlotError(f"{csv_path} not found: pass a run folder (runs/...) or its metrics.csv")
    try:
        with open(csv_path, newline="", encoding="utf-8") as source:
            rows = list(csv.DictReader(source))
    except UnicodeDecodeError:
        raise PlotError(f"{csv_path} is not UTF-8 text; is it a train.py metrics.csv?") from None
    except OSError as error:
        raise PlotError(f"cannot read {csv_path}: {error.strerror}") from None
    missing = [column for column in COLUMNS if rows and column not in rows[0]]
    if not rows or missing:
        raise PlotError(f"{csv_path} has no epoch rows" if not rows else
                        f"{csv_path} lacks the columns {', '.join(missing)}; is it a train.py metrics.csv?")
    try:
        return name, {column: [float(row[column]) for row in rows] for column in COLUMNS}
    except (TypeError, ValueError):
        raise PlotError(f"{csv_path} has a row that is not numbers; the file may be damaged") from None


def plot_runs(paths, out_path):
    runs = [read_metrics(path) for path in paths]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, metrics) in enumerate(runs):
        color = f"C{index % 10}"
        label = f"{name} " if len(runs) > 1 else ""
        loss_axes.plot(metrics["epoch"], metrics["train_loss"], "--", color=color, marker="o", label=f"{label}train")
        loss_axes.plot(metrics["epoch"], metrics["val_loss"], "-", color=color, marker="o", label=f"{label}validation")
        accuracy_axes.plot(metrics["epoch"], metrics["val_acc"], "-", color=color, marker="o", label=name)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        figure.savefig(out_path, dpi=120)
    except OSError as error:
        raise PlotError(f"cannot write {out_path}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot loss and validation accuracy per epoch from train.py runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_CSV", help="run folders or metrics.csv files")
    parser.add_argument("--out", metavar="PNG",
                        help="output image (default: loss.png in the first run's folder), e.g. assets/loss_plot.png")
    args = parser.parse_args(argv)
    first = args.runs[0]
    out_path = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "loss.png")
    try:
        print(f"wrote {plot_runs(args.runs, out_path)}")
    except PlotError as error:
        sys.exit(f"plot_loss.py: error: {error}")


if __name__ == "__main__":
    main()
