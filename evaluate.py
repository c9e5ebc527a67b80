"""Score a checkpoint on a PCAM split: `python evaluate.py runs/<run>/best.pt --data-dir DIR --split test`.

Writes to --out-dir (default <run>/eval-<split>/): predictions.csv (row index in the split file, label,
score for class 1, predicted class), metrics.json (loss, accuracy, ROC AUC, balanced accuracy,
sensitivity, specificity, confusion [[tn, fp], [fn, tp]], the data files, the checkpoint's sha256,
versions), roc.png and confusion.png. train.py scores its best.pt on the test split with the same code.
"""

import csv
import datetime
import json
import math
import os
import pickle
import platform
import sys

import h5py
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

import data
from model import MLP

matplotlib.use("Agg")  # files only, no display: works on login and compute nodes
import matplotlib.pyplot as plt

PREDICTIONS_HEADER = ["index", "label", "score", "pred"]
THRESHOLD = 0.5  # a score for class 1 at or above this predicts class 1
OUTPUT_FILES = ("predictions.csv", "metrics.json", "roc.png", "confusion.png")


class EvaluationError(Exception):
    """A bad checkpoint, argument or output folder; main turns it into one line on stderr."""


def parse_args(argv=None):
    parser = data.ArgumentParser(
        description="Score a train.py checkpoint on one PCAM split (see README.md).",
        formatter_class=data.HelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's best.pt or last.pt")
    data.add_data_dir_argument(parser)
    parser.add_argument("--split", choices=data.SPLITS, default="test", help="the split to score")
    parser.add_argument("--filter-data", action="store_true", help="drop black and white outlier tiles")
    parser.add_argument("--out-dir", metavar="DIR", help="output folder (default: eval-<split> beside the checkpoint)")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto takes CUDA when available"
    )
    parser.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per forward pass")
    data.add_num_workers_argument(parser)
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


def load_checkpoint(path, required=("model", "model_args")):
    """A train.py checkpoint dict holding the required keys, loaded on the CPU with weights_only=True."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EvaluationError(f"checkpoint {path} not found; pass a run's best.pt or last.pt") from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise EvaluationError(
            f"cannot load checkpoint {path} ({type(error).__name__}): it is incomplete or not a checkpoint; pass a "
            "whole best.pt or last.pt written by train.py (a run's other checkpoint, or a new run)"
        ) from None
    if not isinstance(checkpoint, dict) or not set(required) <= set(checkpoint):
        raise EvaluationError(
            f"{path} is not a train.py checkpoint (it lacks {', '.join(required)}); "
            "pass a best.pt or last.pt written by train.py"
        )
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    """The MLP the checkpoint describes, with its weights and normalisation buffers."""
    model_args = checkpoint["model_args"]
    try:
        model = MLP(hidden_units=tuple(model_args["hidden_units"]), dropout_rate=model_args["dropout_rate"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise EvaluationError(
            f"the weights in {path} do not fit the MLP its model_args describe ({model_args}); "
            "it was saved by another model, pass a best.pt or last.pt written by train.py"
        ) from None
    broken = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if broken:
        raise EvaluationError(
            f"{path} holds non-finite weights ({', '.join(broken)}): its run diverged; "
            "pass a checkpoint of a run that trained (a lower --lr)"
        )
    return model


@torch.no_grad()
def predict(model, batches, device, max_batches=None):
    """Mean cross-entropy, class-1 scores and labels (numpy) over (uint8 images, labels) batches, in order, from
    fp32 logits (no autocast), whatever precision the model was trained in."""
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


def ratio(numerator, denominator):
    return numerator / denominator if denominator else float("nan")


def classification_metrics(loss, scores, labels):
    predicted = scores >= THRESHOLD
    positive = labels == 1
    tp, fn = int((predicted & positive).sum()), int((~predicted & positive).sum())
    fp, tn = int((predicted & ~positive).sum()), int((~predicted & ~positive).sum())
    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "loss": loss,
        "accuracy": (tp + tn) / len(labels),
        "auc": roc_auc(scores, labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "confusion": [[tn, fp], [fn, tp]],
    }


def describe(checkpoint_path, checkpoint, data_dir, split, filter_data, device):
    """What metrics.json records besides the metrics: which data, which checkpoint, which software."""
    files = {os.path.basename(p): os.path.getsize(p) for p in data.split_paths(data_dir, split)}
    return {
        "split": split,
        "data": {"dir": os.path.abspath(data_dir), "files": files},
        "filter_data": filter_data,
        "checkpoint": {
            "path": os.path.abspath(checkpoint_path),
            "sha256": data.file_digest(checkpoint_path),
            "epoch": checkpoint.get("epoch"),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "h5py": h5py.__version__,
        },
        "device": str(device),
        "evaluated_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_predictions(rows, labels, scores, path):
    def write(temp_path):
        with open(temp_path, "w", newline="") as target:
            writer = csv.writer(target)
            writer.writerow(PREDICTIONS_HEADER)
            for row, label, score in zip(rows.tolist(), labels.tolist(), scores.tolist(), strict=True):
                writer.writerow([row, label, repr(score), int(score >= THRESHOLD)])  # repr: the exact float

    data.write_atomically(path, write)


def write_json(obj, path):
    """metrics.json, with NaN (an AUC of a one-class split, say) as null so that any JSON reader takes it."""

    def plain(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    def write(temp_path):
        with open(temp_path, "w") as target:
            json.dump({key: plain(value) for key, value in obj.items()}, target, indent=2)

    data.write_atomically(path, write)


def save_figure(figure, path):
    data.write_atomically(path, lambda temp_path: figure.savefig(temp_path, format="png", dpi=120))
    plt.close(figure)


def plot_roc(scores, labels, auc, path):
    false_positive_rate, true_positive_rate = roc_points(scores, labels)
    figure, axes = plt.subplots(figsize=(4.8, 4.6))
    axes.plot(false_positive_rate, true_positive_rate, color="C0", label=f"ROC, AUC {auc:.4f}")
    axes.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC 0.5)")
    axes.set(
        title="ROC curve",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


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
    axes.set(
        title="Confusion matrix: count, share of the true class",
        xlabel="predicted class",
        ylabel="true class",
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=class_names,
        yticklabels=class_names,
    )
    figure.tight_layout()
    save_figure(figure, path)


def evaluate_split(model, batches, rows, device, out_dir, about):
    """Score every batch, write predictions.csv, metrics.json, roc.png and confusion.png to out_dir.

    rows are the split-file row indices the batches hold, in order; about goes into metrics.json as is.
    Returns metrics.json's contents.
    """
    loss, scores, labels = predict(model, batches, device)
    if not (math.isfinite(loss) and np.isfinite(scores).all()):
        raise EvaluationError(
            f"the model's outputs on {about['split']} are not finite (loss {loss}); nothing written, "
            "pass a checkpoint of a run that trained"
        )
    metrics = {**classification_metrics(loss, scores, labels), "images": len(labels), **about}
    os.makedirs(out_dir, exist_ok=True)  # only now: a refused or failed evaluation leaves no folder behind
    write_predictions(rows, labels, scores, os.path.join(out_dir, "predictions.csv"))
    write_json(metrics, os.path.join(out_dir, "metrics.json"))
    plot_roc(scores, labels, metrics["auc"], os.path.join(out_dir, "roc.png"))
    plot_confusion(metrics["confusion"], os.path.join(out_dir, "confusion.png"))
    return metrics


def pick_device(requested):
    if requested == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda, but CUDA is not available here; use --device cpu or auto")
    return torch.device("cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu")


def prepare_out_dir(out_dir, about):
    """Refuse to replace an evaluation of another checkpoint or other data (results are not overwritten), or to
    write into a run folder while its run trains. Nothing is created here: evaluate_split makes the folder."""
    run_folder = os.path.dirname(os.path.abspath(out_dir))
    if data.run_is_live(run_folder):
        raise EvaluationError(
            f"{run_folder} belongs to a run that is still training (train.lock is held); evaluate once it has "
            "ended, or pass another --out-dir"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvaluationError(f"--out-dir {out_dir} is a file; name a folder")
    parent = run_folder
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(out_dir) and not os.access(parent, os.W_OK | os.X_OK):
        raise EvaluationError(f"cannot create --out-dir {out_dir}: {parent} is not writable; choose a writable one")
    try:
        with open(os.path.join(out_dir, "metrics.json")) as source:
            earlier = json.load(source)
    except FileNotFoundError:
        earlier = None
    except (OSError, ValueError):
        earlier = {}
    present = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, name))]
    if earlier is None and present or earlier is not None and not isinstance(earlier, dict):
        raise EvaluationError(
            f"{out_dir} holds {', '.join(present)} not written by evaluate.py; pass another --out-dir"
        )
    if earlier is None:
        return
    keys = ("split", "data", "filter_data")
    if [earlier.get(key) for key in keys] != [about[key] for key in keys] or earlier.get("checkpoint", {}).get(
        "sha256"
    ) != about["checkpoint"]["sha256"]:
        raise EvaluationError(
            f"{out_dir} holds an evaluation of another checkpoint or other data; pass another --out-dir"
        )


def run(args):
    if args.batch_size < 1 or args.num_workers < 0:
        raise EvaluationError("--batch-size must be positive and --num-workers 0 or more")
    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint, args.checkpoint).to(device)
    dataset = data.load_split(args.data_dir, args.split, args.filter_data)
    loader = data.in_order(dataset, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.checkpoint) or ".", f"eval-{args.split}")
    about = describe(args.checkpoint, checkpoint, args.data_dir, args.split, args.filter_data, device)
    prepare_out_dir(out_dir, about)
    metrics = evaluate_split(model, loader, dataset.indices, device, out_dir, about)
    print(
        f"{args.split}: {metrics['images']:,} images, loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
        f"auc {metrics['auc']:.4f} balanced_accuracy {metrics['balanced_accuracy']:.4f} sensitivity "
        f"{metrics['sensitivity']:.4f} specificity {metrics['specificity']:.4f} -> {out_dir}",
        flush=True,
    )


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (EvaluationError, data.PCAMError) as error:
        sys.exit(f"evaluate.py: error: {error}")
    except OSError as error:  # the output folder could not be made after all (a full disk, a race)
        sys.exit(f"evaluate.py: error: cannot write {error.filename}: {data.os_reason(error)}")


if __name__ == "__main__":
    main()
