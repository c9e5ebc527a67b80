"""Score a checkpoint on a PCAM split: `python evaluate.py runs/<run>/best.pt --data-dir DIR --split test`.

Writes to --out-dir (default <run>/eval-<split>/): predictions.csv (row index in the split file, label,
score for class 1, predicted class), metrics.json (loss, accuracy, ROC AUC, balanced accuracy,
sensitivity, specificity, confusion [[tn, fp], [fn, tp]], the data files, the checkpoint's sha256,
versions), roc.png and confusion.png. train.py scores its best.pt on the test split with the same code.
"""

import contextlib
import datetime
import math
import os
import platform
import shutil

import h5py
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import pcam_files
import run_folder
from common import UserError, log
from model import MLP

matplotlib.use("Agg")  # files only, no display: works on login and compute nodes
import matplotlib.pyplot as plt

PREDICTIONS_HEADER = ["index", "label", "score", "pred"]
THRESHOLD = 0.5  # a score for class 1 at or above this predicts class 1
SOFTWARE = "pcam-mlp evaluate.py"  # the PNG text that marks a figure as this script's
OUTPUT_FILES = ("predictions.csv", "metrics.json", "roc.png", "confusion.png")
LOCK_NAME = "evaluate.lock"  # held with flock while an evaluation writes its --out-dir: one writer at a time


def parse_args(argv=None):
    parser = common.ArgumentParser(description="Score a train.py checkpoint on one PCAM split (see README.md).")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's best.pt or last.pt")
    common.add_data_dir_argument(parser)
    parser.add_argument("--split", choices=pcam_files.SPLITS, default="test", help="the split to score")
    parser.add_argument("--filter-data", action="store_true", help="drop black and white outlier tiles")
    common.add_out_dir_argument(parser, "output folder (default: eval-<split> beside the checkpoint)")
    common.add_device_argument(parser)
    parser.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per forward pass")
    common.add_num_workers_argument(parser)
    return parser.parse_args(argv)


def roc_auc(scores, labels):
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted half."""
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # average 1-based rank of each tie group
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_points(scores, labels):
    """(false positive rates, true positive rates) at each distinct score taken as threshold, from (0, 0)."""
    order = np.argsort(-scores, kind="mergesort")
    group_ends = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]
    true_positives = np.cumsum(labels[order])[group_ends]
    false_positives = group_ends + 1 - true_positives
    positives, negatives = max(int(labels.sum()), 1), max(int(len(labels) - labels.sum()), 1)
    return np.r_[0, false_positives] / negatives, np.r_[0, true_positives] / positives


def model_from_checkpoint(checkpoint, path):
    model_args = checkpoint["model_args"]
    try:
        model = MLP(hidden_units=tuple(model_args["hidden_units"]), dropout_rate=model_args["dropout_rate"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UserError(
            f"the weights in {path} do not fit the MLP its model_args describe ({model_args}); "
            "it was saved by another model, pass a best.pt or last.pt written by train.py"
        ) from None
    broken = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if broken:
        raise UserError(
            f"{path} holds non-finite weights ({', '.join(broken)}): its run diverged; "
            "pass a checkpoint of a run that trained (a lower --lr)"
        )
    return model


@torch.no_grad()
def predict(model, batches, device, max_batches=None):
    """(mean cross-entropy, class-1 scores, labels) over (uint8 images, labels) batches, in order, from fp32 logits
    (no autocast), whatever precision the model trained in."""
    model.eval()
    loss_sum, scores, labels_seen = torch.zeros((), device=device, dtype=torch.float64), [], []
    for step, (images, labels) in enumerate(batches, 1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        scores.append(torch.softmax(logits, dim=1)[:, 1])
        labels_seen.append(labels)
        if max_batches and step >= max_batches:
            break
    scores, labels_seen = torch.cat(scores).cpu().numpy(), torch.cat(labels_seen).cpu().numpy()
    return loss_sum.item() / len(labels_seen), scores, labels_seen


def classification_metrics(loss, scores, labels):
    predicted = scores >= THRESHOLD
    positive = labels == 1
    tp, fn = int((predicted & positive).sum()), int((~predicted & positive).sum())
    fp, tn = int((predicted & ~positive).sum()), int((~predicted & ~positive).sum())
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")  # NaN: no image of that class
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return {
        "loss": loss,
        "accuracy": (tp + tn) / len(labels),
        "auc": roc_auc(scores, labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "confusion": [[tn, fp], [fn, tp]],
    }


def validate(model, batches, device, max_batches=None):
    """Loss, accuracy and ROC AUC over batches, in order, from fp32 logits whatever the training precision."""
    metrics = classification_metrics(*predict(model, batches, device, max_batches))
    return metrics["loss"], metrics["accuracy"], metrics["auc"]


def describe(checkpoint_path, checkpoint, data_dir, split, filter_data, device):
    """What metrics.json records besides the metrics: which data, which checkpoint, which software."""
    files = {os.path.basename(p): os.path.getsize(p) for p in pcam_files.split_paths(data_dir, split)}
    libraries = {library.__name__: library.__version__ for library in (torch, np, h5py)}
    return {
        "split": split,
        "data": {"dir": os.path.abspath(data_dir), "files": files},
        "filter_data": filter_data,
        "checkpoint": {
            "path": os.path.abspath(checkpoint_path),
            "sha256": common.file_digest(checkpoint_path),
            "epoch": checkpoint.get("epoch"),
        },
        "versions": {"python": platform.python_version(), **libraries},
        "device": str(device),
        "evaluated_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def plot_roc(scores, labels, auc, path):
    figure, axes = plt.subplots(figsize=(4.8, 4.6))
    axes.plot(*roc_points(scores, labels), color="C0", label=f"ROC, AUC {auc:.4f}")  # false and true positive rates
    axes.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC 0.5)")
    axes.set(title="ROC curve", xlim=(0, 1), ylim=(0, 1.01))
    axes.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    common.save_figure(figure, path, SOFTWARE)


def plot_confusion(confusion, path):
    counts = np.array(confusion)
    figure, axes = plt.subplots(figsize=(4.4, 3.8))
    axes.imshow(counts, cmap="Blues")
    for (true_class, predicted_class), count in np.ndenumerate(counts):
        axes.text(
            predicted_class,
            true_class,
            f"{count:,}\n{count / counts[true_class].sum():.1%}" if count else "0",
            ha="center",
            va="center",
            color="white" if count > counts.max() / 2 else "black",
        )
    class_names = ["0 normal", "1 tumour"]
    axes.set(title="Confusion matrix: count, share of the true class", xlabel="predicted class", ylabel="true class")
    axes.set_xticks([0, 1], class_names)
    axes.set_yticks([0, 1], class_names)
    common.save_figure(figure, path, SOFTWARE)


def evaluate_split(model, batches, rows, device, out_dir, about):
    """Score every batch (rows: the split-file row indices they hold, in order) and write OUTPUT_FILES to out_dir;
    about goes into metrics.json as is. Returns metrics.json's contents."""
    loss, scores, labels = predict(model, batches, device)
    if not (math.isfinite(loss) and np.isfinite(scores).all()):
        raise UserError(
            f"the model's outputs on {about['split']} are not finite (loss {loss}); nothing written, "
            "pass a checkpoint of a run that trained"
        )
    metrics = {**classification_metrics(loss, scores, labels), "images": len(labels), **about}
    predictions = zip(rows.tolist(), labels.tolist(), scores.tolist(), strict=True)
    lines = [[row, label, repr(value), int(value >= THRESHOLD)] for row, label, value in predictions]  # repr: exact
    created = run_folder.outermost_missing(out_dir)  # made only now, and removed again if a write fails
    os.makedirs(out_dir, exist_ok=True)
    try:
        common.write_csv(PREDICTIONS_HEADER, lines, os.path.join(out_dir, "predictions.csv"))
        common.write_json(metrics, os.path.join(out_dir, "metrics.json"))
        plot_roc(scores, labels, metrics["auc"], os.path.join(out_dir, "roc.png"))
        plot_confusion(metrics["confusion"], os.path.join(out_dir, "confusion.png"))
    except BaseException:  # a full disk, Ctrl-C: no half an evaluation behind
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return metrics


def prepare_out_dir(out_dir, about):
    """Refuse to replace an evaluation of another checkpoint or other data (results are not overwritten), or to
    write into a run folder while its run trains. Nothing is created here: evaluate_split makes the folder."""
    folder = os.path.dirname(os.path.abspath(out_dir))
    if run_folder.run_is_live(folder) or run_folder.run_is_live(out_dir):
        raise UserError(
            f"{folder} belongs to a run that is still training (train.lock is held); evaluate once it has "
            "ended, or pass another --out-dir"
        )
    record = common.read_json(os.path.join(folder, "run.json"))
    is_own_eval = os.path.basename(os.path.abspath(out_dir)) == "eval-test"
    if is_own_eval and record.get("run_id") and record.get("status") != "done":
        raise UserError(
            f"{out_dir} is the run's own: train.py writes it when the run in {folder} ends (run.json says "
            f"{record.get('status', 'not done')}); pass another --out-dir for this evaluation"
        )
    metrics_path = os.path.join(out_dir, "metrics.json")
    present = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not os.path.exists(metrics_path):
        if present:
            raise UserError(f"{out_dir} holds {', '.join(present)} not written by evaluate.py; pass another --out-dir")
        return
    earlier = common.read_json(metrics_path)
    if not isinstance(earlier.get("checkpoint"), dict):
        raise UserError(f"{metrics_path} is damaged or not written by evaluate.py; pass another --out-dir")
    same_data = all(earlier.get(key) == about[key] for key in ("split", "data", "filter_data"))
    if not same_data or earlier["checkpoint"].get("sha256") != about["checkpoint"]["sha256"]:
        raise UserError(f"{out_dir} holds an evaluation of another checkpoint or other data; pass another --out-dir")


def score(checkpoint_path, dataset, split, args, out_dir, device, own_run=False):
    """The checkpoint's model scored on a split's dataset into out_dir, with args' data_dir, filter_data,
    batch_size and num_workers: (the checkpoint, metrics.json's contents). own_run: train.py scoring the run it
    holds, into its own eval-test/, which prepare_out_dir would refuse."""
    checkpoint = run_folder.load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path)
    with common.cuda_errors(device, "moving the model to it"):
        model = model.to(device)
    loader = data.in_order(dataset, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")
    about = describe(checkpoint_path, checkpoint, args.data_dir, split, args.filter_data, device)
    if own_run:
        return checkpoint, evaluate_split(model, loader, dataset.indices, device, out_dir, about)
    with only_writer(out_dir):
        prepare_out_dir(out_dir, about)
        return checkpoint, evaluate_split(model, loader, dataset.indices, device, out_dir, about)


@contextlib.contextmanager
def only_writer(out_dir):
    """out_dir, created when missing (and removed again when the evaluation fails), with its lock held: a second
    evaluate.py into the same folder refuses in one line instead of writing over the first one's files."""
    common.check_output_folder(out_dir, "--out-dir")
    created = run_folder.outermost_missing(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    in_use = (
        f"{out_dir} is being written by another evaluate.py ({{holder}}); wait for it to end, or pass another --out-dir"
    )
    try:
        with common.hold_lock(os.path.join(out_dir, LOCK_NAME), in_use):
            yield
    except BaseException:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise


def score_run(config, device, test_set):
    """train.py's end: its run's best.pt on the test split it opened (filtered now with --filter-data), into
    <run>/eval-test/; what run.json records of it, or None without a test split."""
    if test_set is None:
        log("test: no test split in the data dir, skipped")
        return None
    if config.filter_data:
        try:
            test_set = data.load_split(config.data_dir, "test", filter_data=True)
        except data.FilteredOutError:
            log(
                "test: the outlier filter removed every test image, skipped; best.pt is intact: score it with "
                "evaluate.py without --filter-data"
            )
            return None
    out_dir = os.path.join(config.out_dir, "eval-test")
    best, metrics = score(os.path.join(config.out_dir, "best.pt"), test_set, "test", config, out_dir, device, True)
    scores = " ".join(f"{key} {metrics[key]:.4f}" for key in ("loss", "accuracy", "auc"))
    log(f"test (best.pt, epoch {best['epoch']}): {scores} -> {out_dir}")
    return {"epoch": best["epoch"], **{key: metrics[key] for key in ("loss", "accuracy", "auc")}}


def run(args):
    if not 0 < args.batch_size <= 2**31 or args.num_workers < 0:
        raise UserError("--batch-size must be in 1 .. 2**31 and --num-workers 0 or more")
    device = common.pick_device(args.device)
    dataset = data.load_split(args.data_dir, args.split, args.filter_data)
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.checkpoint) or ".", f"eval-{args.split}")
    _, metrics = score(args.checkpoint, dataset, args.split, args, out_dir, device)
    keys = ("loss", "accuracy", "auc", "balanced_accuracy", "sensitivity", "specificity")
    scores = " ".join(f"{key} {metrics[key]:.4f}" for key in keys)
    log(f"{args.split}: {metrics['images']:,} images, {scores} -> {out_dir}")


def main(argv=None):
    common.run_command("evaluate.py", run, parse_args(argv))


if __name__ == "__main__":
    main()
