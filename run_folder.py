"""A training run's folder: its name, creation, lock, refusals and release; run.json and its statuses; metrics.csv;
checkpoints with the RNG states that make a resume exact; the record of the environment and data.

A run holds an exclusive flock on <folder>/train.lock while it writes there; the kernel lets go when it dies.
"""

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import pickle
import platform
import random
import socket
import subprocess

import h5py
import numpy as np
import torch

from common import (
    UserError,
    file_digest,
    hold_lock,
    is_locked,
    log,
    nvidia_driver,
    os_reason,
    read_json,
    write_bytes,
    write_json,
)
from pcam_files import MANIFEST_NAME, PREPARED_NAME, SPLITS, split_paths

LOCK_NAME = "train.lock"
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "run.json", "loss.png", "eval-test")  # what a run writes
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "best_val_loss", "history", "rng", "model_args", "args")
PASS_A_CHECKPOINT = "pass a whole best.pt or last.pt written by train.py (a run's other checkpoint, or a new run)"
PUT_IT_BACK = "put a whole copy of it back, or start a new run in another --out-dir"  # a run folder's own checkpoint
METRIC_FORMATS = {  # metrics.csv's columns, a row per epoch
    "epoch": "{}",
    **dict.fromkeys(("train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr"), "{:.6f}"),
    "epoch_s": "{:.2f}",
    "images_per_s": "{:.0f}",
}
# a resumed run takes these from its checkpoint (and its --epochs and --data-dir unless given: resumed_settings)
RESUMED_SETTINGS = tuple(
    "batch_size lr optimizer momentum weight_decay hidden_units dropout seed filter_data bf16".split()
)
HERE = os.path.dirname(os.path.abspath(__file__))


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def default_out_dir():
    """runs/slurm-<job id> (or <array job>_<task>) in a Slurm job, else runs/<date-time>."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return os.path.join("runs", f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
    if os.environ.get("SLURM_JOB_ID"):
        return os.path.join("runs", f"slurm-{os.environ['SLURM_JOB_ID']}")
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def first_free(path, claim):
    """path, else path-2, path-3, ...: the first name claim(name) creates (it raises FileExistsError when taken)."""
    candidate, number = path, 1
    while True:
        try:
            claim(candidate)
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{path}-{number}"


def outermost_missing(path):
    """What creating path creates: the outermost missing folder on the way to it (or path), None when it exists."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def read_record(path):
    """run.json as a dict ({} when missing or not an object), refused when a field the resume reads is of another kind
    (edited by hand)."""
    record = read_json(path)
    for key, kind in (("args", dict), ("resumed_at", list)):
        if key in record and not isinstance(record[key], kind):
            raise UserError(
                f"{path} is damaged ('{key}' is not a JSON {'object' if kind is dict else 'list'}): put the run's own "
                "run.json back, or remove it (a resume then goes on from last.pt alone)"
            )
    return record


def run_is_live(folder):
    return is_locked(os.path.join(folder, LOCK_NAME))


class RunFolder:
    """A run's folder (a new runs/<date-time> when path is None), locked before anything in it is looked at."""

    def __init__(self, path):
        target = default_out_dir() if path is None else path
        self.path, self.lock, self.created_lock = target, None, False
        self.record = None  # run.json, once the run has started
        self.created = outermost_missing(target)  # what release removes when the run never starts
        try:
            if path is None:
                self.path = first_free(target, os.makedirs)  # two runs started in one second: the second gets -2
                self.created = self.created or os.path.abspath(self.path)
            os.makedirs(self.path, exist_ok=True)
            self.created_lock = not os.path.exists(self.file(LOCK_NAME))
            in_use = (
                f"{self.path} is in use by another run ({{holder}}); wait for it to end, or choose another --out-dir"
            )
            self.lock = hold_lock(self.file(LOCK_NAME), in_use)
        except OSError as error:  # a full disk, say: what was made on the way goes again
            self.release()
            raise UserError(f"cannot write to --out-dir {target}: {error.strerror}; choose a writable folder") from None

    def file(self, name):
        return os.path.join(self.path, name)

    def should_resume(self, resume):
        """Whether to continue from last.pt. A new run never writes over a folder holding any file a run writes,
        except the run.json of a run that died before its first checkpoint (the same run, started again)."""
        for name in RUN_FILES:
            if os.path.lexists(self.file(name)) and os.path.isdir(self.file(name)) != (name == "eval-test"):
                kind = "a folder" if name == "eval-test" else "a file"
                raise UserError(f"{self.file(name)} is not {kind} as a run writes it: move it away, then run again")
        present = [name for name in RUN_FILES if os.path.exists(self.file(name))]
        record = read_record(self.file("run.json"))
        if present == ["run.json"] and "run_id" in record and record.get("status", "done") != "done":
            log(f"{self.path}: its run ended before its first checkpoint; starting it again")
            return False
        last_path = self.file("last.pt")
        if resume and not os.path.isfile(last_path):
            raise UserError(f"--resume: no checkpoint {last_path}; start the run without --resume")
        if not resume and present:
            held = f"{self.path} already holds a run ({', '.join(present)})"
            if os.path.isfile(last_path):
                raise UserError(f"{held}; add --resume to continue it or choose another --out-dir")
            raise UserError(f"{held} but no last.pt to continue it from; choose another --out-dir")
        return resume

    def checkpoint_to_resume(self):
        """last.pt, checked to belong to the run run.json records, as best.pt must too (the test split scores it)."""
        record = read_record(self.file("run.json"))
        checkpoint = load_checkpoint(self.file("last.pt"), CHECKPOINT_KEYS, PUT_IT_BACK)
        check_same_run(checkpoint, record, self.file("last.pt"), "the folder's run.json")
        if checkpoint["epoch"] > 0 and not os.path.isfile(self.file("best.pt")):  # written with the first epoch
            raise UserError(
                f"--resume: {self.file('best.pt')} is missing and the run ends by scoring it on the test split: put "
                "it back, or start a new run in another --out-dir"
            )
        if os.path.isfile(self.file("best.pt")):
            against, of_this_run = "the folder's run.json", record
            if not record:
                against, of_this_run = "last.pt", {"run_id": checkpoint.get("run_id"), "args": checkpoint["args"]}
            best = load_checkpoint(self.file("best.pt"), CHECKPOINT_KEYS, PUT_IT_BACK)
            check_same_run(best, of_this_run, self.file("best.pt"), against)
        return checkpoint

    def start(self, record):
        """run.json says "running"; from here on the run's end is recorded in it, whatever that end is."""
        stale = ("error", "stop_signal", "test", "best_val_loss", "finished_at", "peak_device_memory_gib")  # its end
        self.record = {**{key: value for key, value in record.items() if key not in stale}, "status": "running"}
        write_json(self.record, self.file("run.json"))

    def finish(self, status, **details):
        """run.json's final status: done, stopped, interrupted or failed (with the error line)."""
        if self.record is None:
            return
        self.record.update(status=status, finished_at=now(), **details)
        with contextlib.suppress(UserError):  # a full disk: run.json keeps its last state, the error line says why
            write_json(self.record, self.file("run.json"))

    def release(self):
        """Let go of the lock. A run that never started leaves the folder as it found it: a folder or lock file it
        created goes again, a lock file it found gets its text back."""
        if self.record is None and (self.created or self.created_lock):
            with contextlib.suppress(OSError):  # none made (a read-only folder), or already gone
                os.remove(self.file(LOCK_NAME))
        elif self.record is None and self.lock:
            self.lock.truncate(0)
            self.lock.write(self.lock.found)
        folder = os.path.abspath(self.path)
        with contextlib.suppress(OSError):  # only empty folders go: nothing of value
            while self.created and self.record is None:
                os.rmdir(folder)
                if folder == self.created:
                    break
                folder = os.path.dirname(folder)
        if self.lock:
            self.lock.close()


def check_same_run(checkpoint, record, path, against):
    """A checkpoint continues only the run record describes (against names it): the same run id and settings."""
    if not record:
        return
    recorded = record.get("args", {})
    differing = [
        name for name in RESUMED_SETTINGS if name in recorded and recorded[name] != checkpoint["args"].get(name)
    ]
    if checkpoint.get("run_id") != record.get("run_id") or differing:
        what = f"settings {', '.join(differing)} differ" if differing else f"run id {checkpoint.get('run_id')}"
        raise UserError(
            f"--resume: {path} belongs to another run than {against} ({what}, {against} has run id "
            f"{record.get('run_id')}); put this run's own {os.path.basename(path)} back, or resume that run in its "
            "own folder"
        )


def run_is_complete(out_dir, args, draw_loss):
    """Whether the run in out_dir is done at or past the --epochs asked (its own when not given), with no setting given
    that differs: then a --resume says so, takes no lock and writes nothing, unless metrics.csv differs from last.pt's
    history: then rebuild_metrics writes it again, and draw_loss(out_dir) loss.png."""
    record = read_record(os.path.join(out_dir, "run.json"))
    recorded = record.get("args", {})
    epochs = recorded.get("epochs")
    changed = [
        name
        for name in RESUMED_SETTINGS
        if name in args.given and json.loads(json.dumps(getattr(args, name))) != recorded.get(name)
    ]
    asked = args.epochs if "epochs" in args.given else epochs
    if record.get("status") != "done" or type(epochs) is not int or asked > epochs or changed:
        return False  # not done, or asked for more: the resume goes on, and refuses changed settings in one line
    past = f", past --epochs {asked} (a run is never rewound)" if asked < epochs else ""
    if not args.dry_run and rebuild_metrics(out_dir):
        draw_loss(out_dir)
    log(f"{out_dir}: complete, {epochs} of {epochs} epochs done{past}; nothing to do")
    return True


def rebuild_metrics(out_dir):
    """metrics.csv written again from last.pt's history when it is missing or holds anything else: a run killed
    between writing the two leaves it an epoch short. A file the history does not begin with (edited by hand) is kept
    as metrics.csv.old first. Returns whether it was written."""
    metrics, last = os.path.join(out_dir, "metrics.csv"), os.path.join(out_dir, "last.pt")
    if not os.path.isfile(last):
        return False
    history_csv = metrics_csv(load_checkpoint(last, ("history",), PUT_IT_BACK)["history"])
    if os.path.exists(metrics) and not os.path.isfile(metrics):  # a FIFO would wait for a writer for ever
        raise UserError(f"{metrics} is not a regular file; move it away to have it written again")
    try:
        with open(metrics, "rb") as source:
            found = source.read()
    except FileNotFoundError:
        found = None
    except OSError as error:
        raise UserError(f"cannot read {metrics}: {os_reason(error)}; remove it to have it written again") from None
    if found == history_csv:
        return False
    what = "was missing" if found is None else "lacked epochs"
    if found is not None and not history_csv.startswith(found):
        kept = first_free(f"{metrics}.old", lambda name: open(name, "xb").close())
        write_bytes(found, kept)
        what = f"differed (yours kept as {kept})"
    write_bytes(history_csv, metrics)
    log(f"{metrics} {what}: written again from {last}'s history")
    return True


def resumed_settings(args, checkpoint):
    """The settings a resumed run continues with: its checkpoint's, where an explicit different value is an error,
    its own --epochs unless given, and the data it started on unless --data-dir is given."""
    saved, kept = checkpoint["args"], {}
    lacking = [name for name in (*RESUMED_SETTINGS, "epochs", "data_dir") if name not in saved]
    if lacking:
        raise UserError(
            f"--resume: last.pt does not record the settings {', '.join(lacking)}: it was not written by this "
            "train.py; start a new run in another --out-dir"
        )
    for name in RESUMED_SETTINGS:
        if name in args.given and getattr(args, name) != saved[name]:
            flag = f"--{name.replace('_', '-')}"
            what = "the model shape" if name == "hidden_units" else "the run"
            raise UserError(
                f"--resume: {flag} {getattr(args, name)} does not match {what} in the checkpoint "
                f"({flag} {saved[name]}); drop {flag} to continue the run as it started"
            )
        kept[name] = saved[name]
    if "epochs" not in args.given:  # the run continues to its own end
        kept["epochs"] = saved["epochs"]
    elif args.epochs < checkpoint["epoch"]:
        raise UserError(
            f"--resume: --epochs {args.epochs} is below the {checkpoint['epoch']} epochs this run has done; "
            f"give --epochs {checkpoint['epoch']} or more (a run is continued, never rewound)"
        )
    if "data_dir" not in args.given:  # the data the run started on, not what $PCAM_DIR says today
        kept["data_dir"] = saved["data_dir"]
        if not os.path.isdir(saved["data_dir"]):
            raise UserError(
                f"--resume: this run trained on {saved['data_dir']}, which is not there now; pass --data-dir with "
                "the same data (a staged or moved copy)"
            )
    elif os.path.abspath(args.data_dir) != os.path.abspath(saved["data_dir"]):  # a staged copy, say
        log(f"data: continuing on --data-dir {args.data_dir}; the run's last epoch trained on {saved['data_dir']}")
    return kept


def resume_target(args):
    """(run folder, whether to resume): --out-dir, else this Slurm job's; --resume auto resumes when it has last.pt."""
    if not args.resume:
        return args.out_dir, False
    out_dir = args.out_dir or default_out_dir()
    return out_dir, args.resume is True or os.path.isfile(os.path.join(out_dir, "last.pt"))


def run_settings(args, folder, checkpoint):
    """The settings the run trains with, as run.json records them: the arguments, a resumed run's own, the folder."""
    parsed = {name: value for name, value in vars(args).items() if name != "given"}
    parsed["data_dir"] = os.path.abspath(args.data_dir)  # the same folder whatever the working directory
    resumed = resumed_settings(args, checkpoint) if checkpoint else {}
    where = {"out_dir": folder.path if folder else args.out_dir, "resume": checkpoint is not None}
    return argparse.Namespace(**{**parsed, **resumed, **where})


def load_checkpoint(path, required=("model", "model_args"), remedy=PASS_A_CHECKPOINT):
    """A train.py checkpoint dict holding the required keys, loaded on the CPU with weights_only=True."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found; pass a run's best.pt or last.pt") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError) as error:
        raise UserError(
            f"cannot load checkpoint {path} ({type(error).__name__}): it is incomplete or not a checkpoint; {remedy}"
        ) from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (it lacks {', '.join(missing)}); {remedy}")
    return checkpoint


def save_checkpoint(checkpoint, path):
    """torch.save, every tensor on the CPU (it loads anywhere), into memory first: a failed write names its cause."""
    buffer = io.BytesIO()
    torch.save(on_cpu(checkpoint), buffer)
    write_bytes(buffer.getbuffer(), path)


def on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def load_optimizer(optimizer, state, device):
    """The optimiser's state from a checkpoint, fused on CUDA (one kernel for all parameters) whatever device wrote
    it: the flag is set before loading, which then puts a fused Adam's step counts on the parameters' device."""
    for group in state["param_groups"]:
        group["fused"] = device.type == "cuda"
    optimizer.load_state_dict(state)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generators, device):
    """The RNG states a resumed run restores, the loader's too; CUDA's only on CUDA, so a CPU run never touches it."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        **{name: generator.get_state() for name, generator in generators.items()},
    }


def restore_rng_state(state, generators, device):
    """The reverse of rng_state, onto this run's device, however many GPUs the writer saw."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and torch.is_tensor(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    for name, generator in generators.items():
        generator.set_state(state[name])


def metrics_csv(history):
    """metrics.csv's bytes: a header and a row per epoch of history."""
    rows = [[METRIC_FORMATS[name].format(row[name]) for name in METRIC_FORMATS] for row in history]
    text = io.StringIO()
    csv.writer(text).writerows([list(METRIC_FORMATS), *rows])
    return text.getvalue().encode()


def write_metrics(history, path):
    write_bytes(metrics_csv(history), path)


def git_commit():
    try:
        return subprocess.run(
            ["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def describe_environment(device):
    """Versions, host and device; on CUDA the device as torch sees it (a MIG slice's own name and memory, not the
    whole card's) and the driver nvidia-smi names."""
    gpu = {}
    if device.type == "cuda":
        properties, (driver, driver_cuda) = torch.cuda.get_device_properties(device), nvidia_driver() or (None, None)
        gpu = {
            "device_memory_gib": round(properties.total_memory / 2**30, 2),
            "driver": driver,
            "driver_cuda": driver_cuda,
        }
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        **gpu,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "git_commit": git_commit(),
    }


def written_on(device, environment):
    """Where a checkpoint was written (see note_other_device)."""
    return {
        "device": device.type,
        "device_name": environment["device"],
        "cuda": torch.version.cuda,
        "torch": str(torch.__version__),  # a plain str: weights_only loading refuses TorchVersion
    }


def note_other_device(checkpoint, here):
    """A resume on another device, GPU or torch or CUDA build (here: written_on's) need not match bit for bit."""
    written = checkpoint.get("written_on") or {}
    differing = [key for key, value in here.items() if key in written and written[key] != value]
    if differing:
        log(
            f"checkpoint written with {', '.join(f'{key} {written[key]}' for key in differing)}, resumed with "
            f"{', '.join(f'{key} {here[key]}' for key in differing)}: results need not match bit for bit those "
            "of an uninterrupted run"
        )


def check_same_data(checkpoint, identity, data_dir):
    """A resumed run trains on the data it started on: splits whose rows, labels or sampled images differ (a set
    made anew, another set at that path) stop it in one line; a test split may be left out of a copy (then the run
    ends unscored). A checkpoint that predates the record is let be."""
    started = checkpoint.get("data_identity")
    if not started:
        return
    changed = []
    for split in ("train", "valid", "test"):
        then, now = started.get(split), identity.get(split)
        if then == now or split == "test" and None in (then, now):
            continue
        if None in (then, now):
            changed.append(f"{split} split {'added' if then is None else 'gone'}")
        else:
            what = [key.split("_")[0] for key in ("rows", "labels_sha256", "images_sha256") if then[key] != now[key]]
            changed.append(f"{split} {' and '.join(what)} differ ({then['rows']:,} rows then, {now['rows']:,} now)")
    if changed:
        raise UserError(
            f"--resume: {data_dir} does not hold the data this run started on: {'; '.join(changed)}; resume it on "
            "its own data (--data-dir), or start a new run in another --out-dir"
        )


def data_record(data_dir, manifest_matched):
    """run.json's record of the data: the folder, file sizes, manifest sha256 and match, a prepared copy's origin."""
    files = {
        os.path.basename(p): os.path.getsize(p) for s in SPLITS for p in split_paths(data_dir, s) if os.path.isfile(p)
    }
    manifest = os.path.join(data_dir, MANIFEST_NAME)
    return {
        "dir": os.path.abspath(data_dir),
        "files": files,
        "manifest_sha256": file_digest(manifest) if os.path.isfile(manifest) else None,
        "manifest_matched": manifest_matched,
        "prepared_from": read_json(os.path.join(data_dir, PREPARED_NAME)) or None,
    }
