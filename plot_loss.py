"""Plot training curves: `python plot_loss.py RUN_DIR_OR_CSV [MORE ...] [--out PNG]`, and compare runs.

Train and validation loss per epoch on the left, validation accuracy on the right; several runs
(three seeds, say) are overlaid, one colour each, named in the legend by the settings that differ
between them (by their folders when none do). `--table` also prints one row of results per run, with
the mean and std over runs that differ only in --seed, and writes them to runs_summary.csv.
"""

import csv
import glob
import json
import math
import os
import re
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on login and compute nodes
import matplotlib.pyplot as plt

import common
from common import UserError, log
from run_folder import LOCK_NAME, RUN_FILES, run_is_live

COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc")
TABLE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "val_auc", "epoch_s", "images_per_s")
# the metrics a group of seeds gets a mean and std of
AVERAGED = ("best_val_loss", "val_acc", "val_auc", "test_acc", "test_auc", "images_per_s", "wall_s")
RESULTS = ("epochs_done", "best_epoch", *AVERAGED)
RUN_MARKERS = "os^DvPX*"  # one per overlaid run, with its colour
UNCOMPARED_SETTINGS = ("out_dir", "resume", "log_every")  # differ without changing what a run computes
SOFTWARE = "pcam-mlp plot_loss.py"  # the PNG text that marks a figure as this script's to redraw


def read_metrics(path, columns=COLUMNS):
    """A run folder or metrics.csv -> (run name, {column: list of floats})."""
    csv_path = os.path.join(path, "metrics.csv") if os.path.isdir(path) else path
    name = common.shown(os.path.basename(os.path.dirname(os.path.abspath(csv_path))))
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path} not found: pass a run folder (runs/...) or its metrics.csv")
    try:
        with open(csv_path, newline="", encoding="utf-8") as source:
            rows = list(csv.DictReader(source))
    except (UnicodeDecodeError, csv.Error):
        raise UserError(f"{csv_path} is not CSV text; is it a train.py metrics.csv?") from None
    except OSError as error:
        raise UserError(f"cannot read {csv_path}: {error.strerror}") from None
    if not rows:
        raise UserError(f"{csv_path} has no epoch rows")
    missing = [column for column in columns if column not in rows[0]]
    if missing:
        raise UserError(f"{csv_path} lacks the columns {', '.join(missing)}; is it a train.py metrics.csv?")
    try:
        return name, {column: [float(row[column]) for row in rows] for column in columns}
    except (TypeError, ValueError):
        raise UserError(f"{csv_path} has a row that is not numbers; the file may be damaged") from None


def run_folder(path):
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def read_settings(path):
    """The arguments a run recorded in its run.json; None when that file is missing or damaged."""
    settings = common.read_json(os.path.join(run_folder(path), "run.json")).get("args")
    return settings if isinstance(settings, dict) else None


def setting_text(value):
    if isinstance(value, float):
        return f"{value:g}"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def differing_settings(all_settings):
    """The names of the settings whose values are not the same in every run (None: a run without run.json)."""
    known = [settings for settings in all_settings if settings is not None]
    names = dict.fromkeys(name for settings in known for name in settings if name not in UNCOMPARED_SETTINGS)
    return [name for name in names if len({json.dumps(settings.get(name)) for settings in known}) > 1]


def legend_names(paths, names):
    """Each run named by what differs between the runs (`lr=0.001 seed=1`), or by its folder."""
    all_settings = [read_settings(path) for path in paths]
    differing = differing_settings(all_settings)
    labels = [
        " ".join(f"{name}={setting_text(settings.get(name))}" for name in differing) if settings else ""
        for settings in all_settings
    ]
    return [
        name if not label else f"{name} {label}" if labels.count(label) > 1 else label
        for label, name in zip(labels, names, strict=True)
    ]


def plot_runs(paths, out_path):
    """Draw the runs' curves to out_path; returns the (closed) figure, whose lines tests can read."""
    runs = [read_metrics(path) for path in paths]
    names = legend_names(paths, [name for name, _ in runs])
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, ((_, metrics), name) in enumerate(zip(runs, names, strict=True)):
        # a colour and a marker of its own: runs stay apart in grey print and for colour-blind readers
        style = {"color": f"C{index % 10}", "marker": RUN_MARKERS[index % len(RUN_MARKERS)]}
        label = f"{name} " if len(runs) > 1 else ""
        loss_axes.plot(metrics["epoch"], metrics["train_loss"], "--", **style, label=f"{label}train")
        loss_axes.plot(metrics["epoch"], metrics["val_loss"], "-", **style, label=f"{label}validation")
        accuracy_axes.plot(metrics["epoch"], metrics["val_acc"], "-", **style, label=name)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        axes.xaxis.get_major_locator().set_params(integer=True)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    except OSError as error:
        plt.close(figure)
        raise UserError(f"cannot write {out_path}: {error.strerror or error}") from None
    common.save_figure(figure, out_path, SOFTWARE)
    return figure


def summarize_run(path):
    """One row of the runs table from a run folder's run.json and metrics.csv."""
    name = common.shown(os.path.basename(os.path.abspath(run_folder(path))))
    if not os.path.exists(path):
        return {"run": common.shown(path), "settings": None, "status": "unreadable: not found"}
    try:
        with open(os.path.join(run_folder(path), "run.json")) as source:
            record = json.load(source)
        settings, status, test = record["args"], str(record.get("status", "unknown")), record.get("test") or {}
        scores = [test.get(key) for key in ("accuracy", "auc")] if isinstance(test, dict) else [""]
        if not isinstance(settings, dict) or not all(type(score) in (int, float, type(None)) for score in scores):
            raise TypeError("args must be an object, test an object of numbers")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if run_is_live(run_folder(path)) and not os.path.exists(os.path.join(run_folder(path), "run.json")):
            return {"run": name, "settings": None, "status": "running"}  # starting: run.json comes before epoch 1
        return {"run": name, "settings": None, "status": "unreadable: run.json"}
    live = run_is_live(run_folder(path))
    if status == "running" and not live:
        status = "not running (killed?)"
    elif live:  # a resumed run starting up: run.json still says how its last attempt ended
        status = "running"
    try:
        _, metrics = read_metrics(run_folder(path), TABLE_COLUMNS)
    except UserError:
        # a run still in its first epoch has no metrics.csv yet
        status = status if status == "running" else "unreadable: metrics.csv"
        return {"run": name, "settings": settings, "status": status}
    best = metrics["val_loss"].index(min(metrics["val_loss"]))
    return {
        "run": name,
        "settings": settings,
        "status": status,
        "epochs_done": len(metrics["epoch"]),
        "best_epoch": int(metrics["epoch"][best]),
        "best_val_loss": metrics["val_loss"][best],
        "val_acc": metrics["val_acc"][best],
        "val_auc": metrics["val_auc"][best],
        "test_acc": test.get("accuracy"),
        "test_auc": test.get("auc"),
        "images_per_s": statistics.fmean(metrics["images_per_s"]),
        "wall_s": sum(metrics["epoch_s"]),
    }


def seed_groups(rows, differing):
    """Runs whose settings are the same but for --seed, two or more of them: lists of rows."""
    if "seed" not in differing:
        return []
    groups = {}
    for row in rows:
        if row["settings"] is not None and "best_epoch" in row:
            key = json.dumps({name: row["settings"].get(name) for name in differing if name != "seed"}, sort_keys=True)
            groups.setdefault(key, []).append(row)
    return [group for group in groups.values() if len({json.dumps(row["settings"].get("seed")) for row in group}) > 1]


def spread_rows(group, differing):
    """A mean row and a std row (n - 1 in the denominator) over a group of seeds."""
    settings = {name: group[0]["settings"].get(name) for name in differing if name != "seed"}
    mean_row, std_row = (
        {"run": f"{what} of {len(group)} seeds", "settings": settings, "status": ""} for what in ("mean", "std")
    )
    for column in AVERAGED:
        values = [row[column] for row in group if row.get(column) is not None and not math.isnan(row[column])]
        mean_row[column] = statistics.fmean(values) if values else None
        std_row[column] = statistics.stdev(values) if len(values) > 1 else None
    return [mean_row, std_row]


def cell(row, column):
    value = row.get(column)
    if value is None:
        return ""
    if column == "images_per_s":
        return f"{value:,.0f}"
    if column == "wall_s":
        return f"{value:.1f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def runs_table(summaries):
    """(header, rows of text cells, rows of raw values): one row per run, then mean and std per group of seeds."""
    rows = list(summaries)
    differing = differing_settings([row["settings"] for row in rows])
    rows += [spread for group in seed_groups(rows, differing) for spread in spread_rows(group, differing)]
    header = ["run", *differing, *RESULTS, "status"]
    text_rows, raw_rows = [], []
    for row in rows:
        settings = row["settings"] or {}
        shown = [setting_text(settings[name]) if name in settings else "" for name in differing]
        raw = ["" if row.get(column) is None else row[column] for column in RESULTS]
        text_rows.append([row["run"], *shown, *(cell(row, column) for column in RESULTS), row["status"]])
        raw_rows.append([row["run"], *shown, *raw, row["status"]])
    return header, text_rows, raw_rows


def print_table(header, text_rows):
    widths = [max(len(line[index]) for line in [header, *text_rows]) for index in range(len(header))]
    for line in [header, *text_rows]:
        log(
            "  ".join(
                text.ljust(width) if index in (0, len(line) - 1) else text.rjust(width)
                for index, (text, width) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )


def is_own_summary(path):
    """Whether path is a runs_summary.csv as table_main writes them, judged by its header."""
    try:
        with open(path, newline="", encoding="utf-8") as source:
            header = next(csv.reader(source), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return header[:1] == ["run"] and header[-len(RESULTS) - 1 :] == [*RESULTS, "status"]


def expand(patterns):
    """Each path as given; a pattern naming none is globbed (runs/*/) to its run folders and metrics.csv files, in
    natural order (slurm-2 before slurm-10)."""

    def natural(path):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]

    paths = []
    for pattern in patterns:
        found = [] if os.path.exists(pattern) else sorted(glob.glob(pattern), key=natural)
        matches = [path for path in found if is_run(path) or os.path.basename(path) == "metrics.csv"]
        paths += [os.path.normpath(match) for match in matches] or [pattern]
    return paths


def is_run(path):
    """A folder holding what a run writes (not eda.py's figures), or one it cannot list, to show as unreadable."""
    try:
        names = os.listdir(path)
    except (NotADirectoryError, FileNotFoundError):  # a file, a dangling link
        return False
    except OSError:
        return True
    return any(name in names for name in (LOCK_NAME, *RUN_FILES))


def beside_runs(paths):
    """runs.png in the folder holding the first run: an overlay never takes the place of a run's own loss.png."""
    return os.path.join(os.path.dirname(os.path.normpath(run_folder(paths[0]))) or ".", "runs.png")


def check_figure_path(out_path, force):
    common.check_output(out_path, common.written_by(SOFTWARE), force)
    if not out_path.lower().endswith(".png"):
        raise UserError(f"--out {out_path}: plot_loss.py draws PNG images; name a .png file")


def plot_main(paths, args):
    """Draw the runs to --out, or to a single run's loss.png, or to runs.png beside several runs."""
    out_path = args.out or (os.path.join(run_folder(paths[0]), "loss.png") if len(paths) == 1 else beside_runs(paths))
    check_figure_path(out_path, args.force)
    plot_runs(paths, out_path)
    log(f"wrote {out_path}")


def table_main(paths, args):
    """Print the runs table, write runs_summary.csv, and overlay the readable runs in the plot beside it."""
    if not any(
        os.path.isdir(path) or os.path.basename(path) == "metrics.csv" and os.path.isfile(path) for path in paths
    ):
        example = "" if "runs/*/" in args.runs else ", e.g. 'runs/*/'"
        raise UserError(
            f"no run found in {' '.join(repr(pattern) for pattern in args.runs)}: pass the folders train.py "
            f"wrote (each holds a metrics.csv){example}"
        )
    out_path = args.out or beside_runs(paths)
    summary_path = os.path.join(os.path.dirname(out_path) or ".", "runs_summary.csv")
    common.check_output(summary_path, is_own_summary, args.force)
    check_figure_path(out_path, args.force)
    common.check_output_folder(os.path.dirname(os.path.abspath(out_path)), "--out")
    summaries = [summarize_run(path) for path in paths]
    header, text_rows, raw_rows = runs_table(summaries)
    print_table(header, text_rows)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    common.write_csv(header, raw_rows, summary_path)
    plotted = [path for path, summary in zip(paths, summaries, strict=True) if "best_epoch" in summary]
    if plotted:
        plot_runs(plotted, out_path)
    log(f"wrote {summary_path}" + (f" and {out_path}" if plotted else ""))


def main(argv=None):
    parser = common.ArgumentParser(description="Plot loss and validation accuracy per epoch from train.py runs.")
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR_OR_CSV",
        help="run folders or metrics.csv files; patterns such as 'runs/*/' are expanded",
    )
    parser.add_argument(
        "--out",
        metavar="PNG",
        help="output image (default: a single run's loss.png; for several runs, or with --table, runs.png "
        "in the folder holding the first run)",
    )
    for flag, help_text in (
        ("--table", "also print a table of the runs' results and write it to runs_summary.csv beside the plot"),
        ("--force", "replace an existing output that plot_loss.py did not write (never a data file)"),
    ):
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args(argv)
    common.run_command("plot_loss.py", table_main if args.table else plot_main, expand(args.runs), args)


if __name__ == "__main__":
    main()
