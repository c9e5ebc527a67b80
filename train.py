"""Train the PCAM MLP: `python train.py --epochs 5`, on a laptop, in salloc, or inside train_job.sh.

Each run writes to its --out-dir: metrics.csv (a row per epoch), last.pt (end of every epoch, and
before the first), best.pt (lowest validation loss), run.json (settings, versions, data, results),
loss.png, and eval-test/ (best.pt scored on the test split, as by evaluate.py). SIGTERM or SIGUSR1
stop the run after the current step with exit code 75 (Ctrl-C: 130); `--resume` then restarts the
interrupted epoch from last.pt, and the result equals an uninterrupted run; `--resume auto` continues a run
when its folder holds a last.pt and starts it otherwise (what train_job.sh passes). A run holds a lock on its
folder (train.lock), and run.json ends with status done, stopped, interrupted or failed.
"""

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import h5py
import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate as evaluation
import plot_loss
from model import MLP

REQUEUE_EXIT_CODE = 75  # stopped by a signal with last.pt on disk: run again with --resume
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (SIGINT), as a shell reports it
LOCK_NAME = data.RUN_LOCK_NAME
METRIC_FORMATS = {
    "epoch": "{}",
    "train_loss": "{:.6f}",
    "train_acc": "{:.6f}",
    "val_loss": "{:.6f}",
    "val_acc": "{:.6f}",
    "val_auc": "{:.6f}",
    "lr": "{:.6f}",
    "epoch_s": "{:.2f}",
    "images_per_s": "{:.0f}",
}
METRICS_HEADER = list(METRIC_FORMATS)  # metrics.csv's columns, a row per epoch
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "run.json", "loss.png", "eval-test")  # what a run writes
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "best_val_loss", "history", "rng", "model_args", "args")
RESUMED_SETTINGS = (
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "hidden_units",
    "dropout",
    "seed",
    "filter_data",
    "bf16",
)  # a resumed run takes these from its checkpoint
# ten times a constant guess's validation loss (ln 2): the model puts on average about 0.1% on the true class, a
# run that diverged rather than one that learns slowly (a fresh MLP starts near ln 2, an overfitting one below 3)
DIVERGED_LOSS = 10 * math.log(2)
TINY_CLASS_SHARE, TINY_CLASS_IMAGES = 0.01, 10  # a training split's minority class below either is warned about
NORMALIZATION_SAMPLE = 2048  # training images the per-channel mean and std are measured on
HERE = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
    """A bad argument or state the user can fix; main turns it into one line on stderr."""


def default_out_dir():
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return os.path.join("runs", f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
    if os.environ.get("SLURM_JOB_ID"):
        return os.path.join("runs", f"slurm-{os.environ['SLURM_JOB_ID']}")
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def build_parser():
    parser = data.ArgumentParser(
        description="Train an MLP on PCAM patches (see README.md).",
        formatter_class=data.HelpFormatter,
    )
    data_group = parser.add_argument_group("data")
    data.add_data_dir_argument(data_group)
    data_group.add_argument("--filter-data", action="store_true", help="drop black and white outlier tiles")
    data.add_num_workers_argument(data_group)
    data_group.add_argument(
        "--data-on-device",
        choices=("auto", "yes", "no"),
        default="auto",
        help="hold the uint8 train and valid splits in device memory (RAM on the CPU) and "
        "gather each batch there; auto does when they fit",
    )
    model_group = parser.add_argument_group("model")
    model_group.add_argument(
        "--hidden-units", type=int, nargs="+", default=[64, 32], metavar="H", help="width of each hidden layer"
    )
    model_group.add_argument("--dropout", type=float, default=0.2, metavar="P", help="dropout after each hidden layer")
    opt_group = parser.add_argument_group("optimisation")
    opt_group.add_argument("--epochs", type=int, default=5, metavar="N", help="train up to this epoch")
    opt_group.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per step")
    opt_group.add_argument("--optimizer", choices=("sgd", "adam"), default="adam", help="optimiser")
    opt_group.add_argument("--lr", type=float, default=1e-4, metavar="LR", help="learning rate (constant)")
    opt_group.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum")
    opt_group.add_argument("--weight-decay", type=float, default=0.0, metavar="WD", help="L2 weight decay")
    opt_group.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seeds python, numpy, torch and the sampler"
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--device",
        default="auto",
        metavar="{auto,cpu,cuda}",
        help="auto takes CUDA when available and says so when it falls back to CPU",
    )
    run_group.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (CUDA or CPU)")
    run_group.add_argument(
        "--out-dir", metavar="DIR", help="run folder (default: runs/<date-time>, or runs/slurm-<job id> in a Slurm job)"
    )
    run_group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        choices=("auto",),
        metavar="auto",
        help="continue the run in --out-dir from its last.pt, refused when there is none; --resume auto continues "
        "it when --out-dir holds a last.pt and starts it there otherwise (as a Slurm job that may be requeued does)",
    )
    run_group.add_argument(
        "--log-every", type=int, default=50, metavar="STEPS", help="a progress line every STEPS steps"
    )
    run_group.add_argument(
        "--dry-run", action="store_true", help="one logged batch of train and of validation, then stop; writes nothing"
    )
    return parser


def parse_args(argv=None):
    """The arguments, with args.given: the flags given explicitly (a resumed run refuses to change those)."""
    parser = build_parser()
    not_given = object()
    args = parser.parse_args(argv)
    marked = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), not_given)))
    args.given = sorted(name for name, value in vars(marked).items() if value is not not_given)
    return args


def settings(args):
    """The run's arguments as recorded (without parse_args's note of which flags were given)."""
    return {k: v for k, v in vars(args).items() if k != "given"}


def check_args(args):
    if args.data_dir == "":
        raise UsageError("--data-dir is empty (is $PCAM_DIR set to an empty string?); name the PCAM data folder")
    if args.out_dir == "":
        raise UsageError("--out-dir is empty (an unset shell variable?); name the run folder, or leave the flag out")
    for name in ("epochs", "batch_size", "lr", "log_every"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "weight_decay"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a finite number, 0 or more, got {getattr(args, name)}"
            )
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0 .. 2**32 - 1 (numpy's range), got {args.seed}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    for name in ("dropout", "momentum"):
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if any(width < 1 for width in args.hidden_units):
        raise UsageError(f"--hidden-units must be positive widths, got {args.hidden_units}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if (args.device == "cuda" or args.device == "auto" and slurm_gave_gpus()) and not torch.cuda.is_available():
        asked = "--device cuda" if args.device == "cuda" else "this Slurm job was given GPUs"
        raise UsageError(f"{asked}, but {cuda_diagnosis()}")
    if args.resume is True and not args.out_dir and not os.environ.get("SLURM_JOB_ID"):
        raise UsageError("--resume needs --out-dir: the run folder to continue (e.g. runs/20260101-120000)")


def resolve_resume(args):
    """--resume auto: continue the run in --out-dir (this job's or a new one's folder when not given) if it holds a
    last.pt, start it there otherwise."""
    if args.resume == "auto":
        args.out_dir = args.out_dir or default_out_dir()
        args.resume = os.path.isfile(os.path.join(args.out_dir, "last.pt"))


def slurm_gave_gpus():
    """Inside a Slurm job that was given GPUs, where a silent fall back to the CPU would waste the allocation."""
    env = os.environ
    counts = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE")  # "1", "a100:2"; --gpus=0 sets "0"
    gpus = env.get("SLURM_JOB_GPUS") or any(env.get(name, "0").rsplit(":", 1)[-1] not in ("", "0") for name in counts)
    return bool(env.get("SLURM_JOB_ID") and (gpus or env.get("CUDA_VISIBLE_DEVICES")))


def driver_cuda_version():
    """The CUDA version nvidia-smi says the driver supports ("12.4"), "unknown", or None without nvidia-smi."""
    try:
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return found.group(1) if found else "unknown"


def cuda_diagnosis():
    """Why CUDA is not usable, in one line: the torch build, the driver, the visible devices, and what to do
    (train.py's error and `manage_data.py env` print it alike)."""
    driver = driver_cuda_version()
    found = ", ".join(
        [
            f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "CPU build of torch",
            f"driver CUDA {driver}" if driver else "no nvidia-smi",
            *(f"{name}={os.environ.get(name, '(unset)')}" for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS")),
        ]
    )
    if not driver:
        fix = "run on a GPU node"
    elif torch.version.cuda:
        fix = f"install a torch built for CUDA {driver} or older, or load a newer driver"
    else:
        fix = f"install a torch built for CUDA (CUDA {driver} or older: see pytorch.org)"
    return f"CUDA is not available here ({found}); {fix}, or pass --device cpu to train on the CPU"


def pick_device(requested):
    if requested == "auto" and not torch.cuda.is_available():
        print("device: CUDA not available, using CPU", flush=True)
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu")


def prepare_out_dir(args, outcome):
    """Create --out-dir when needed and hold its lock (in outcome) before looking at what it holds. A new run
    never writes over a folder holding any file a run writes, except the run.json of a run that died before its
    first checkpoint (the same run, started again). Returns whether to resume from last.pt."""
    try:
        if args.out_dir is None and not args.resume:
            args.out_dir = outcome["created_dir"] = new_run_folder(default_out_dir())
        else:
            args.out_dir = args.out_dir or default_out_dir()
            outcome["created_dir"] = args.out_dir if not os.path.isdir(args.out_dir) else None
            os.makedirs(args.out_dir, exist_ok=True)
        outcome["created_lock"] = not os.path.exists(os.path.join(args.out_dir, LOCK_NAME))
        outcome["lock"] = lock_out_dir(args.out_dir)
    except OSError as error:
        raise UsageError(
            f"cannot write to --out-dir {args.out_dir}: {error.strerror}; choose a writable folder"
        ) from None
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out_dir, name))]
    record = read_json(os.path.join(args.out_dir, "run.json"))
    if present == ["run.json"] and "run_id" in record and record.get("status", "done") != "done":
        print(f"{args.out_dir}: its run ended before its first checkpoint; starting it again", flush=True)
        return False
    last_path = os.path.join(args.out_dir, "last.pt")
    if args.resume and not os.path.isfile(last_path):
        raise UsageError(f"--resume: no checkpoint {last_path}; start the run without --resume")
    if not args.resume and present:
        held = f"{args.out_dir} already holds a run ({', '.join(present)})"
        if os.path.isfile(last_path):
            raise UsageError(f"{held}; add --resume to continue it or choose another --out-dir")
        raise UsageError(f"{held} but no last.pt to continue it from; choose another --out-dir")
    return args.resume


def new_run_folder(path):
    """path, else path-2, path-3, ...: the first that does not exist yet, created here, so that two runs started
    in the same second each get a folder of their own."""
    candidate, number = path, 1
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{path}-{number}"


def lock_out_dir(out_dir):
    """An open lock file holding an exclusive flock on the folder, or an error naming the run that holds it."""
    in_use = f"{out_dir} is in use by another run ({{holder}}); wait for it to end, or choose another --out-dir"
    return data.hold_lock(os.path.join(out_dir, LOCK_NAME), in_use)


def adopt_checkpoint_settings(args, checkpoint):
    """A resumed run continues with the settings it started with; an explicit different value is an error."""
    saved = checkpoint["args"]
    for name in RESUMED_SETTINGS:
        if name in args.given and getattr(args, name) != saved[name]:
            flag = f"--{name.replace('_', '-')}"
            what = "the model shape" if name in ("hidden_units",) else "the run"
            raise UsageError(
                f"--resume: {flag} {getattr(args, name)} does not match {what} in the checkpoint "
                f"({flag} {saved[name]}); drop {flag} to continue the run as it started"
            )
        setattr(args, name, saved[name])
    if "epochs" not in args.given:  # the run continues to its own end
        args.epochs = saved["epochs"]
    elif args.epochs < checkpoint["epoch"]:
        raise UsageError(
            f"--resume: --epochs {args.epochs} is below the {checkpoint['epoch']} epochs this run has done; "
            f"give --epochs {checkpoint['epoch']} or more (a run is continued, never rewound)"
        )
    if "data_dir" not in args.given:  # the data the run started on, not what $PCAM_DIR says today
        args.data_dir = saved["data_dir"]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(train_loader, device):
    """The generators a resumed run restores; CUDA's of the training device only, so a CPU run never touches CUDA."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "sampler": data.sampler_generator(train_loader).get_state(),
        "loader": train_loader.generator.get_state(),
    }


def restore_rng_state(state, train_loader, device):
    """The reverse of rng_state, onto this run's device, however many GPUs the writer saw."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and torch.is_tensor(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    data.sampler_generator(train_loader).set_state(state["sampler"])
    train_loader.generator.set_state(state["loader"])


def on_cpu(value):
    """value with every tensor in it on the CPU: a checkpoint then loads anywhere, with or without CUDA."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def save_atomically(obj, path):
    """torch.save into memory first: a failed file write is then an OSError that names its cause (a full disk)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)

    def write(temp_path):
        with open(temp_path, "wb") as target:
            target.write(buffer.getbuffer())

    data.write_atomically(path, write)


def write_json(obj, path):
    def write(temp_path):
        with open(temp_path, "w") as target:
            json.dump(obj, target, indent=2, default=str)

    data.write_atomically(path, write)


def as_json(value):
    """value as run.json holds it (a tuple as a list)."""
    return json.loads(json.dumps(value))


def read_json(path):
    """A JSON object's content; {} for a missing or unreadable file, or one holding something else."""
    try:
        with open(path) as source:
            content = json.load(source)
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def write_metrics(history, path):
    def write(temp_path):
        with open(temp_path, "w", newline="") as target:
            writer = csv.DictWriter(target, fieldnames=METRICS_HEADER)
            writer.writeheader()
            writer.writerows(
                {name: METRIC_FORMATS[name].format(row[name]) for name in METRICS_HEADER} for row in history
            )

    data.write_atomically(path, write)


def channel_stats(dataset):
    """Per-channel mean and std (0..255 scale) over up to NORMALIZATION_SAMPLE evenly spaced training images."""
    positions = np.linspace(0, len(dataset) - 1, min(len(dataset), NORMALIZATION_SAMPLE)).astype(np.int64)
    total, total_sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(positions), 512):
        images = dataset[positions[start : start + 512]][0].float()
        total += images.sum(dim=(0, 2, 3)).double()
        total_sq += images.square().sum(dim=(0, 2, 3)).double()
    count = len(positions) * 96 * 96
    mean = total / count
    return mean.float(), (total_sq / count - mean**2).clamp_min(1e-6).sqrt().float()


def to_device(images, labels, device):
    """Batches travel as uint8; the model turns them into normalised floats on the device."""
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def evaluate(model, loader, device, max_batches=None):
    """Loss, accuracy and ROC AUC over a loader, in order, from fp32 logits whatever the training precision."""
    loss, scores, labels = evaluation.predict(model, loader, device, max_batches)
    accuracy = float(((scores >= evaluation.THRESHOLD) == (labels == 1)).mean())
    return loss, accuracy, evaluation.roc_auc(scores, labels)


class StoppedDuringStartUp(Exception):
    """SIGTERM or SIGUSR1 before the first step: nothing to checkpoint, so the run ends before writing any."""


class StopRequest:
    """Turns SIGTERM, SIGUSR1 and a first SIGINT into a flag the training loop checks after every step; a second
    SIGINT (Ctrl-C twice) stops at once. DataLoader workers ignore these signals (data.seed_worker), so a signal
    to the whole process group (scancel, preemption, Ctrl-C) reaches the run through this process alone."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        for signum in self.SIGNALS:
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"received {self.signal_name}: stopping after the current step", flush=True)


def train_one_epoch(session, epoch):
    """One pass over the train batches. Returns (loss, accuracy, images/s), or None when stopped early."""
    model, loader, optimizer, device = session.model, session.train_loader, session.optimizer, session.device
    args, autocast, stop = session.args, session.autocast, session.stop
    model.train()
    total_steps = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, started = 0, time.perf_counter()
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = to_device(images, labels, device)
        with autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
        if step % args.log_every == 0 or step == total_steps or args.dry_run:
            running_loss = loss_sum.item() / seen  # a device sync, once per logged step
            if not math.isfinite(running_loss):
                raise FloatingPointError(f"training loss became {running_loss} at epoch {epoch} step {step}")
            rate = seen / (time.perf_counter() - started)
            eta = datetime.timedelta(seconds=round((total_steps - step) * len(labels) / rate))
            print(
                f"epoch {epoch}/{args.epochs} step {step}/{total_steps} loss {running_loss:.4f} "
                f"{rate:,.0f} images/s eta {eta}",
                flush=True,
            )
        if stop.signal_name or args.dry_run:
            return None
    return loss_sum.item() / seen, correct.item() / seen, seen / (time.perf_counter() - started)


def git_commit():
    try:
        return subprocess.run(
            ["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def data_record(data_dir):
    files = {
        os.path.basename(p): os.path.getsize(p)
        for split in data.SPLITS
        for p in data.split_paths(data_dir, split)
        if os.path.isfile(p)
    }
    manifest = os.path.join(data_dir, data.MANIFEST_NAME)
    manifest_sha256 = data.file_digest(manifest) if os.path.isfile(manifest) else None
    return {"dir": os.path.abspath(data_dir), "files": files, "manifest_sha256": manifest_sha256}


def describe_environment(device):
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "git_commit": git_commit(),
    }


def build(args, device):
    """Loaders, model and optimiser for these settings."""
    path, reason = choose_data_path(args, device)
    print(f"data path: {path} ({reason})", flush=True)  # before the passes that load or filter the splits
    resident = path == "resident"
    train_loader, val_loader = data.get_dataloaders(
        args.data_dir,
        args.batch_size,
        args.num_workers,
        args.filter_data,
        args.seed,
        resident,
        pin_memory=device.type == "cuda" and not resident,
    )
    if resident:
        train_loader, val_loader = data.DeviceBatches(train_loader, device), data.DeviceBatches(val_loader, device)
    elif device.type == "cuda":
        train_loader, val_loader = data.PrefetchBatches(train_loader, device), data.PrefetchBatches(val_loader, device)
    try:
        model = MLP(hidden_units=tuple(args.hidden_units), dropout_rate=args.dropout).to(device)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError too
        raise UsageError(
            f"cannot build the model with --hidden-units {args.hidden_units} on {device}: {error_line(error)}; "
            "choose smaller widths"
        ) from None
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return train_loader, val_loader, model, optimizer


# ---- where batches come from: resident in device memory, or streamed by the loader ----

RESIDENT_SHARE = 0.7  # the splits go resident when they take at most this share of free memory


def free_memory(device):
    """(free bytes, which limit) for a resident copy: this process's memory (data.free_memory), which the splits
    pass through, and on CUDA the device's, with this process's cached blocks released first."""
    free, which = data.free_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # cached blocks count as used in mem_get_info, yet are ours to reuse
        device_free = torch.cuda.mem_get_info(device)[0]
        if device_free < free:
            return device_free, "CUDA device memory"
    return free, which


def choose_data_path(args, device):
    """('resident' or 'loader', why) for --data-on-device: resident when the uint8 train and valid splits fit."""
    if args.data_on_device == "no":
        return "loader", "--data-on-device no"
    if args.dry_run and args.data_on_device == "auto":
        return "loader", "--dry-run reads one batch of each split"
    rows = sum(len(data.read_labels(data.require_split(args.data_dir, split)[1])) for split in ("train", "valid"))
    needed = rows * data.IMAGE_BYTES
    free, which = free_memory(device)
    fits = needed <= RESIDENT_SHARE * free
    reason = (
        f"uint8 train+valid {needed / 2**30:.2f} GiB {'within' if fits else 'over'} {RESIDENT_SHARE:.0%} "
        f"of {free / 2**30:.2f} GiB free under {which}"
    )
    if args.data_on_device == "yes" and not fits:
        raise UsageError(f"--data-on-device yes: {reason}; use --data-on-device auto or no to stream from the files")
    return ("resident" if fits else "loader"), f"{reason}, {device.type}"


def print_startup(args, environment, model, train_loader, val_loader):
    print("arguments: " + " ".join(f"{k}={v}" for k, v in settings(args).items()), flush=True)
    print("environment: " + " ".join(f"{k}={v}" for k, v in environment.items()), flush=True)
    print(
        f"model: MLP hidden {args.hidden_units}, {sum(p.numel() for p in model.parameters()):,} parameters", flush=True
    )
    for name, loader in (("train", train_loader), ("valid", val_loader)):
        counts = np.bincount(loader.dataset.labels, minlength=2)
        print(
            f"{name}: {len(loader.dataset):,} images kept, class 0 {counts[0]:,} / class 1 {counts[1]:,} "
            f"({100 * counts[1] / counts.sum():.1f}% positive)",
            flush=True,
        )
    counts = np.bincount(train_loader.dataset.labels, minlength=2)
    if counts.min() < max(TINY_CLASS_IMAGES, TINY_CLASS_SHARE * counts.sum()):
        print(
            f"train.py: warning: the training split's minority class is tiny (class {counts.argmin()}: "
            f"{counts.min():,} of {counts.sum():,} kept images); the balanced sampler repeats those few images, "
            "expect a model that does not generalise",
            file=sys.stderr,
            flush=True,
        )


def check_splits(args):
    """What build and the end-of-run test evaluation will read, checked before the first step: the manifest when
    there is one, and the test split when any of its files is there (build checks train and valid), by its
    metadata and a pixel-scale sample: the filter reads the whole file once, when the run ends.
    Returns whether the data matched its manifest (None without one), and the test split opened unfiltered (or
    None), which the end-of-run evaluation then reads."""
    manifest_matched = data.check_manifest(args.data_dir)
    test_set = None
    if any(os.path.exists(path) for path in data.split_paths(args.data_dir, "test")):
        test_set = data.load_split(args.data_dir, "test")
    return manifest_matched, test_set


def check_diverged(model, train_loss, val_loss, epoch):
    """A non-finite loss or weight, or an absurd validation loss, stops the run before its checkpoint is written."""
    for name, value in (("training loss", train_loss), ("validation loss", val_loss)):
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} became {value} in epoch {epoch}")
    broken = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        raise FloatingPointError(f"weights {', '.join(broken)} became non-finite in epoch {epoch}")
    if val_loss > DIVERGED_LOSS:
        raise FloatingPointError(
            f"validation loss {val_loss:.4g} in epoch {epoch}, over {DIVERGED_LOSS:.2f} (ten times a constant "
            "guess's ln 2): the run diverged"
        )


@dataclasses.dataclass
class Session:
    """What the steps of a run share: settings, device, model, optimiser, batches, and the progress so far."""

    args: argparse.Namespace
    device: torch.device
    model: MLP
    optimizer: torch.optim.Optimizer
    train_loader: object
    val_loader: object
    autocast: object
    stop: StopRequest
    environment: dict
    paths: dict = None
    record: dict = None
    history: list = dataclasses.field(default_factory=list)  # a dict per epoch, keyed by METRICS_HEADER
    best_val_loss: float = float("inf")
    start_epoch: int = 1


def run(args, outcome):
    """Train as args say: set up, then a dry run, or start or resume, the epoch loop, and the finish.
    outcome receives the out-dir lock and the run record, for main to close and finish."""
    stop = StopRequest()  # first: a signal during start-up must not kill the run without a word
    check_args(args)
    resolve_resume(args)
    if args.resume and run_is_complete(args):
        return
    device = pick_device(args.device)
    checkpoint = claim_out_dir(args, outcome)
    manifest_matched, test_set = check_splits(args)
    session = set_up(args, device, stop)
    if args.dry_run:
        dry_run(session)
        return
    if stop.signal_name == "SIGINT":  # stopped during start-up: nothing trained, so no checkpoint to write
        raise KeyboardInterrupt
    if stop.signal_name:
        raise StoppedDuringStartUp(stop.signal_name)
    start_or_resume(session, checkpoint, manifest_matched, outcome)
    train_epochs(session)
    finish(session, outcome, test_set)


def claim_out_dir(args, outcome):
    """Lock the run folder (not for a dry run, which writes nothing); the checkpoint to resume, or None."""
    if args.dry_run and not args.resume or not prepare_out_dir(args, outcome):
        return None
    record = read_json(os.path.join(args.out_dir, "run.json"))
    last_path, best_path = (os.path.join(args.out_dir, name) for name in ("last.pt", "best.pt"))
    checkpoint = evaluation.load_checkpoint(last_path, CHECKPOINT_KEYS)
    check_same_run(checkpoint, record, last_path)
    if os.path.isfile(best_path):  # scored on the test split at the end: it must be this run's too
        check_same_run(evaluation.load_checkpoint(best_path, CHECKPOINT_KEYS), record, best_path)
    adopt_checkpoint_settings(args, checkpoint)
    return checkpoint


def check_same_run(checkpoint, record, path):
    """A checkpoint continues only the run its folder's run.json records: the same run id and settings."""
    if not record:
        return
    recorded = record.get("args", {})
    differing = [
        name for name in RESUMED_SETTINGS if name in recorded and recorded[name] != checkpoint["args"].get(name)
    ]
    if checkpoint.get("run_id") != record.get("run_id") or differing:
        what = f"settings {', '.join(differing)} differ" if differing else f"run id {checkpoint.get('run_id')}"
        raise UsageError(
            f"--resume: {path} belongs to another run than the folder's run.json ({what}, run.json has run id "
            f"{record.get('run_id')}); put this run's own {os.path.basename(path)} back, or resume that run in its "
            "own folder"
        )


def run_is_complete(args):
    """A --resume of a run that is done at the --epochs asked (its own when not given) says so and touches nothing:
    no lock taken, no file written."""
    out_dir = args.out_dir or default_out_dir()
    record = read_json(os.path.join(out_dir, "run.json"))
    recorded = record.get("args", {})
    epochs = recorded.get("epochs")
    changed = [
        name for name in RESUMED_SETTINGS if name in args.given and as_json(getattr(args, name)) != recorded.get(name)
    ]
    if record.get("status") != "done" or "epochs" in args.given and args.epochs != epochs or changed:
        return False  # not done, or asked for more: the resume goes on, and refuses changed settings in one line
    print(f"{out_dir}: complete, {epochs} of {epochs} epochs done; nothing to do", flush=True)
    return True


def set_up(args, device, stop):
    """Seeds, loaders, model and optimiser, and the start-up lines of the log."""
    seed_everything(args.seed)
    train_loader, val_loader, model, optimizer = build(args, device)
    environment = describe_environment(device)
    print_startup(args, environment, model, train_loader, val_loader)
    autocast = (
        functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext
    )
    return Session(args, device, model, optimizer, train_loader, val_loader, autocast, stop, environment)


def dry_run(session):
    """One logged batch of training and one of validation; nothing is written."""
    session.model.set_normalization(*channel_stats(session.train_loader.dataset))
    train_one_epoch(session, 1)
    val_loss, val_acc, _ = evaluate(session.model, session.val_loader, session.device, max_batches=1)
    print(f"dry run: one validation batch, loss {val_loss:.4f} accuracy {val_acc:.3f}; nothing written", flush=True)


def start_or_resume(session, checkpoint, manifest_matched, outcome):
    """A new run measures its normalisation and writes last.pt before the first epoch; a resumed one takes
    weights, optimiser, RNG states and history from its checkpoint. Either way run.json says "running"."""
    args, model = session.args, session.model
    session.paths = {
        name: os.path.join(args.out_dir, name) for name in ("last.pt", "best.pt", "metrics.csv", "run.json")
    }
    now = datetime.datetime.now().isoformat(timespec="seconds")
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        session.optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"], session.train_loader, session.device)
        session.start_epoch, session.best_val_loss = checkpoint["epoch"] + 1, checkpoint["best_val_loss"]
        session.history = checkpoint["history"]
        session.record = read_json(session.paths["run.json"])
        session.record.setdefault("resumed_at", []).append(now)
        print(f"resuming {args.out_dir} after epoch {checkpoint['epoch']}", flush=True)
        written_on = checkpoint.get("written_on", {}).get("device")
        if written_on and written_on != session.device.type:
            print(
                f"checkpoint written on {written_on}, resumed on {session.device.type}: results need not match bit "
                "for bit those of an uninterrupted run",
                flush=True,
            )
    else:
        model.set_normalization(*channel_stats(session.train_loader.dataset))
        session.record = {"run_id": uuid.uuid4().hex, "started_at": now}
    print(
        f"normalisation: mean {model.channel_mean.flatten().tolist()} std {model.channel_std.flatten().tolist()}",
        flush=True,
    )
    session.record.update(
        {
            "args": settings(args),
            "environment": session.environment,
            "status": "running",
            "data": {**data_record(args.data_dir), "manifest_matched": manifest_matched},
        }
    )
    for stale in ("error", "stop_signal"):  # from the attempt this run resumes
        session.record.pop(stale, None)
    write_json(session.record, session.paths["run.json"])
    outcome.update(record=session.record, record_path=session.paths["run.json"])
    if not checkpoint:
        save_atomically(checkpoint_of(session, 0), session.paths["last.pt"])


def checkpoint_of(session, epoch):
    """Everything a resumed run needs, after epoch (0: before the first)."""
    args = session.args
    return on_cpu(
        {
            "run_id": session.record.get("run_id"),
            "written_on": {
                "device": session.device.type,
                "device_name": session.environment["device"],
                "cuda": torch.version.cuda,
                "torch": str(torch.__version__),  # a plain str: weights_only loading refuses TorchVersion
            },
            "model": session.model.state_dict(),
            "optimizer": session.optimizer.state_dict(),
            "epoch": epoch,
            "best_val_loss": session.best_val_loss,
            "history": session.history,
            "rng": rng_state(session.train_loader, session.device),
            "args": settings(args),
            "model_args": {"hidden_units": list(args.hidden_units), "dropout_rate": args.dropout},
        }
    )


def train_epochs(session):
    """Train and validate epoch by epoch up to --epochs; after each, best.pt (when the validation loss is
    the lowest yet), last.pt and metrics.csv. A stop signal ends the loop after the current step."""
    for epoch in range(session.start_epoch, session.args.epochs + 1):
        if session.stop.signal_name:
            return
        epoch_started = time.perf_counter()
        trained = train_one_epoch(session, epoch)
        if trained is None:
            return
        train_loss, train_acc, images_per_s = trained
        val_loss, val_acc, val_auc = evaluate(session.model, session.val_loader, session.device)
        check_diverged(session.model, train_loss, val_loss, epoch)
        improved = val_loss < session.best_val_loss
        session.best_val_loss = min(session.best_val_loss, val_loss)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_auc": val_auc,
            "lr": session.optimizer.param_groups[0]["lr"],
            "epoch_s": time.perf_counter() - epoch_started,
            "images_per_s": images_per_s,
        }
        session.history.append(row)
        state = checkpoint_of(session, epoch)
        if improved:
            save_atomically(state, session.paths["best.pt"])
        save_atomically(state, session.paths["last.pt"])
        write_metrics(session.history, session.paths["metrics.csv"])
        print(
            f"epoch {epoch}/{session.args.epochs} train_loss {train_loss:.4f} train_acc {train_acc:.4f} "
            f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} val_auc {val_auc:.4f} time {row['epoch_s']:.1f}s "
            f"{images_per_s:,.0f} images/s" + (" (best)" if improved else ""),
            flush=True,
        )


def finish(session, outcome, test_set):
    """A stopped run exits 75 (130 for Ctrl-C) with run.json saying so; a complete one scores best.pt on the
    test split, records "done" and draws loss.png."""
    args, paths, stopped_by = session.args, session.paths, session.stop.signal_name
    if stopped_by:
        for signum in (signal.SIGTERM, signal.SIGUSR1):  # a second signal while exiting must not change the code
            signal.signal(signum, signal.SIG_IGN)
        interrupted = stopped_by == "SIGINT"
        exit_code = INTERRUPTED_EXIT_CODE if interrupted else REQUEUE_EXIT_CODE
        if interrupted:
            finish_record(outcome, "interrupted")
        else:
            finish_record(outcome, "stopped", stop_signal=stopped_by)
        print(
            f"{'interrupted' if interrupted else 'stopped'} by {stopped_by}: {paths['last.pt']} holds epoch "
            f"{len(session.history)}; continue with --resume --out-dir {args.out_dir} (exit code {exit_code})",
            flush=True,
        )
        sys.exit(exit_code)
    session.record["test"] = evaluate_test(args, session.device, paths["best.pt"], test_set)
    session.record["best_val_loss"] = session.best_val_loss
    if session.device.type == "cuda":
        session.record["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(session.device) / 2**30
    finish_record(outcome, "done")
    try:
        plot_loss.plot_runs([paths["metrics.csv"]], os.path.join(args.out_dir, "loss.png"))
    except plot_loss.PlotError as error:
        print(f"train.py: note: loss.png not drawn: {error}", file=sys.stderr, flush=True)
    print(f"done: {args.out_dir} (metrics.csv, best.pt, last.pt, run.json, loss.png, eval-test/)", flush=True)


def evaluate_test(args, device, best_path, test_set):
    """best.pt on the test split check_splits opened, filtered now with --filter-data (evaluate.py's files in
    <run>/eval-test/); None without one."""
    if test_set is None:
        print("test: no test split in the data dir, skipped", flush=True)
        return None
    if args.filter_data:
        try:
            test_set = data.PCAMDataset(test_set.x_path, test_set.y_path, filter_data=True)
        except data.FilteredOutError:
            print(
                "test: the outlier filter removed every test image, skipped; best.pt is intact: score it with "
                "evaluate.py without --filter-data",
                flush=True,
            )
            return None
    test_loader = data.in_order(test_set, args.batch_size, args.num_workers, pin_memory=device.type == "cuda")
    best = evaluation.load_checkpoint(best_path)
    model = evaluation.model_from_checkpoint(best, best_path).to(device)
    about = evaluation.describe(best_path, best, args.data_dir, "test", args.filter_data, device)
    metrics = evaluation.evaluate_split(
        model,
        test_loader,
        test_loader.dataset.indices,
        device,
        os.path.join(args.out_dir, "eval-test"),
        about,
    )
    print(
        f"test (best.pt, epoch {best['epoch']}): loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.4f} "
        f"auc {metrics['auc']:.4f} -> {os.path.join(args.out_dir, 'eval-test')}",
        flush=True,
    )
    return {"epoch": best["epoch"], **{key: metrics[key] for key in ("loss", "accuracy", "auc")}}


def finish_record(outcome, status, **details):
    """run.json's final status: done, stopped, interrupted or failed (with the error line)."""
    record = outcome.get("record")
    if record is None:
        return
    record.update(status=status, finished_at=datetime.datetime.now().isoformat(timespec="seconds"), **details)
    with contextlib.suppress(data.PCAMError):  # a full disk: run.json keeps its last state, the error line says why
        write_json(record, outcome["record_path"])


def error_line(error):
    """An error's message on one line; one re-raised from a DataLoader worker carries the worker's traceback,
    whose last line is the original 'module.Error: message'."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else lines[0]


def release_out_dir(outcome):
    """Let go of the out-dir lock; a folder this run created and left without a record goes again."""
    lock = outcome.pop("lock", None)
    if lock is None:
        return
    if outcome.get("record") is None and (outcome.get("created_dir") or outcome.get("created_lock")):
        os.remove(lock.name)  # refused before it started: it leaves the folder as it found it
    if outcome.get("created_dir") and outcome.get("record") is None:
        with contextlib.suppress(OSError):
            os.rmdir(outcome["created_dir"])  # only when empty: nothing of value goes
    lock.close()


def fail(outcome, message):
    finish_record(outcome, "failed", error=message)
    sys.exit(message)


def main(argv=None):
    args = parse_args(argv)
    outcome = {}
    handlers = {signum: signal.getsignal(signum) for signum in StopRequest.SIGNALS}  # the caller's, given back
    try:
        run(args, outcome)
    except (UsageError, evaluation.EvaluationError, data.PCAMError) as error:
        fail(outcome, f"train.py: error: {error_line(error)}")
    except FloatingPointError as error:
        fail(
            outcome,
            f"train.py: error: {error}; stopped, last.pt keeps the last good epoch. "
            "Try a lower --lr in a new run (another --out-dir)",
        )
    except StoppedDuringStartUp as error:
        finish_record(outcome, "stopped", stop_signal=str(error))
        print(
            f"train.py: stopped by {error} during start-up, before training; run the same command again "
            f"(exit code {REQUEUE_EXIT_CODE})",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(REQUEUE_EXIT_CODE)
    except KeyboardInterrupt:
        finish_record(outcome, "interrupted")
        print("train.py: interrupted by SIGINT; last.pt keeps the last completed epoch", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as error:  # a bug: the traceback follows, and run.json says the run failed
        finish_record(outcome, "failed", error=f"{type(error).__name__}: {error_line(error)}")
        raise
    finally:
        release_out_dir(outcome)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
