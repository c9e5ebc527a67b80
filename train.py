"""Train the PCAM MLP: `python train.py --epochs 5`, on a laptop, in salloc, or inside train_job.sh.

A run writes metrics.csv, last.pt, best.pt, run.json, loss.png and eval-test/ to its --out-dir (run_folder.py keeps
that folder; docs/runs.md describes it). SIGTERM or SIGUSR1 stop it after the current step with exit code 75
(Ctrl-C: 130); `--resume` continues it from last.pt exactly, `--resume auto` also starts it when there is none.
"""

import argparse
import dataclasses
import datetime
import math
import os
import signal
import sys
import time
import uuid

import torch
import torch.nn.functional as F

import common
import data
import evaluate
import pcam_files
import plot_loss
import run_folder
from common import UserError, log
from model import MLP

REQUEUE_EXIT_CODE = 75  # stopped by a signal with last.pt on disk: run again with --resume
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (SIGINT), as a shell reports it
# ten times a constant guess's validation loss (ln 2): the model puts on average about 0.1% on the true class, a
# run that diverged rather than one that learns slowly (a fresh MLP starts near ln 2, an overfitting one below 3)
DIVERGED_LOSS = 10 * math.log(2)
FLOAT32_MAX = torch.finfo(torch.float32).max  # the optimisers compute in float32: torch refuses a larger lr or decay
MAX_LR = FLOAT32_MAX * (1 - 0.9)  # Adam's first step is lr / (1 - beta1), beta1 0.9: it too must fit (SGD's limit too)
ARGUMENT_RULES = (  # (arguments, test, what their values must be)
    (("epochs", "log_every"), lambda value: value > 0, "positive"),
    (("batch_size",), lambda value: 0 < value <= 2**31, "in 1 .. 2**31"),
    (("lr",), lambda value: 0 < value <= MAX_LR, f"positive, at most {MAX_LR} (float32's max / 10: Adam's first step)"),
    (("weight_decay",), lambda value: 0 <= value <= FLOAT32_MAX, f"0 or more, at most {FLOAT32_MAX} (float32's max)"),
    (("seed",), lambda value: 0 <= value < 2**32, "in 0 .. 2**32 - 1 (numpy's range)"),
    (("num_workers",), lambda value: value >= 0, "0 or more"),
    (("dropout", "momentum"), lambda value: 0 <= value < 1, "in [0, 1)"),
    (("hidden_units",), lambda value: min(value) >= 1, "positive widths"),
)


def resume_mode(text):
    if text != "auto":  # a folder, most likely: the run to continue is named by --out-dir
        raise argparse.ArgumentTypeError(
            f"takes auto or nothing, not {text!r}: continue a run with --out-dir DIR --resume"
        )
    return text


def build_parser():
    parser = common.ArgumentParser(description="Train an MLP on PCAM patches (see README.md).")
    group = parser.add_argument_group("data")
    common.add_data_dir_argument(group)
    group.add_argument("--filter-data", action="store_true", help="drop black and white outlier tiles")
    common.add_num_workers_argument(group)
    group.add_argument(
        "--data-on-device",
        choices=("auto", "yes", "no"),
        default="auto",
        help="hold the uint8 train and valid splits in device memory (RAM on the CPU) and gather each batch there; "
        "auto does when they fit",
    )
    group = parser.add_argument_group("model")
    group.add_argument("--hidden-units", type=int, nargs="+", default=[64, 32], metavar="H", help="hidden layer widths")
    group.add_argument("--dropout", type=float, default=0.2, metavar="P", help="dropout after each hidden layer")
    group = parser.add_argument_group("optimisation")
    for flag, kind, default, metavar, text in (
        ("--epochs", int, 5, "N", "train up to this epoch"),
        ("--batch-size", int, 256, "B", "images per step"),
        ("--lr", float, 1e-4, "LR", "learning rate (constant)"),
        ("--momentum", float, 0.9, "M", "SGD momentum"),
        ("--weight-decay", float, 0.0, "WD", "L2 weight decay"),
        ("--seed", int, 0, "S", "seeds python, numpy, torch and the sampler"),
    ):
        group.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    group.add_argument("--optimizer", choices=("sgd", "adam"), default="adam", help="optimiser")
    group = parser.add_argument_group("run")
    common.add_device_argument(group)
    group.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (CUDA or CPU)")
    common.add_out_dir_argument(group, "run folder (default: runs/<date-time>, or runs/slurm-<job id> in a Slurm job)")
    group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=resume_mode,
        metavar="auto",
        help="continue the run in --out-dir from its last.pt, refused when there is none; --resume auto continues "
        "it when --out-dir holds a last.pt and starts it there otherwise (as a Slurm job that may be requeued does)",
    )
    group.add_argument("--log-every", type=int, default=50, metavar="STEPS", help="a progress line every STEPS steps")
    group.add_argument("--dry-run", action="store_true", help="one batch of train and of validation; writes nothing")
    return parser


def parse_args(argv=None):
    """The arguments, with args.given: the flags given explicitly (a resumed run refuses to change those)."""
    parser = build_parser()
    not_given = object()
    args = parser.parse_args(argv)
    marked = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), not_given)))
    args.given = sorted(name for name, value in vars(marked).items() if value is not not_given)
    return args


def check_args(args):
    for names, holds, what in ARGUMENT_RULES:
        for name in names:
            if not holds(getattr(args, name)):
                raise UserError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.resume and not args.out_dir and not os.environ.get("SLURM_JOB_ID"):
        flag = "--resume auto" if args.resume == "auto" else "--resume"
        raise UserError(f"{flag} needs --out-dir: the run folder to continue (e.g. runs/20260101-120000)")


class StopRequest:
    """SIGTERM, SIGUSR1 and a first SIGINT set a flag checked after every step; a second SIGINT stops at once.
    Loader workers ignore them (data.seed_worker): a signal to the process group reaches the run through here."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        for signum in self.SIGNALS:
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log(f"received {self.signal_name}: stopping after the current step")


@dataclasses.dataclass
class Session:
    """A run's state: its arguments, the settings it trains with (config), its folder, model, batches, progress."""

    args: argparse.Namespace
    stop: StopRequest
    folder: run_folder.RunFolder = None
    config: argparse.Namespace = None
    device: torch.device = None
    model: MLP = None
    optimizer: torch.optim.Optimizer = None
    train_batches: object = None
    val_batches: object = None
    environment: dict = None
    history: list = dataclasses.field(default_factory=list)  # a dict per epoch, keyed as metrics.csv
    data_identity: dict = None  # data.data_identity of the folder it trains on, as it started
    best_val_loss: float = float("inf")
    start_epoch: int = 1

    def end(self, status, **details):
        """run.json's final status, once the run has started in its folder."""
        if self.folder:
            self.folder.finish(status, **details)


def build_model(config, device):
    """The model, built in RAM (too little is the widths' fault) then moved to device (a CUDA failure there is the
    GPU's), and its optimiser: fused (one kernel for all parameters) on CUDA."""
    try:
        model = MLP(hidden_units=tuple(config.hidden_units), dropout_rate=config.dropout)
    except (RuntimeError, MemoryError) as error:
        raise UserError(
            f"cannot build the model with --hidden-units {config.hidden_units}: "
            f"{common.error_line(error)}; choose smaller widths"
        ) from None
    with common.cuda_errors(device, "moving the model to it"):
        model = model.to(device)
    settings = {"lr": config.lr, "weight_decay": config.weight_decay, "fused": device.type == "cuda"}
    if config.optimizer == "sgd":
        return model, torch.optim.SGD(model.parameters(), momentum=config.momentum, **settings)
    return model, torch.optim.Adam(model.parameters(), **settings)


def set_up(session, device):
    config = session.config
    run_folder.seed_everything(config.seed)
    with common.cuda_errors(device, "loading the train and valid splits"):
        session.train_batches, session.val_batches = data.training_batches(config, device)
    session.model, session.optimizer = build_model(config, device)
    session.device, session.environment = device, run_folder.describe_environment(device)
    log("arguments: " + " ".join(f"{k}={v}" for k, v in vars(config).items()))
    log("environment: " + " ".join(f"{k}={v}" for k, v in session.environment.items()))
    log(f"model: MLP hidden {config.hidden_units}, {sum(p.numel() for p in session.model.parameters()):,} parameters")


def train_one_epoch(session, epoch):
    """One pass over the train batches. Returns (loss, accuracy, images/s), or None when stopped early."""
    model, batches, optimizer = session.model, session.train_batches, session.optimizer
    device, config = session.device, session.config
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, started = 0, time.perf_counter()
    for step, (images, labels) in enumerate(batches, 1):
        loss, logits = train_step(model, optimizer, images, labels, config.bf16)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
        if step % config.log_every == 0 or step == len(batches) or config.dry_run:  # the last step: the epoch's loss
            running_loss = loss_sum.item() / seen  # a device sync, once per logged step
            if not math.isfinite(running_loss):
                raise FloatingPointError(f"training loss became {running_loss} at epoch {epoch} step {step}")
            rate = seen / (time.perf_counter() - started)
            eta = datetime.timedelta(seconds=round((len(batches) - step) * len(labels) / rate))
            log(
                f"epoch {epoch}/{config.epochs} step {step}/{len(batches)} loss {running_loss:.4f} "
                f"{rate:,.0f} images/s eta {eta}"
            )
        if session.stop.signal_name or config.dry_run:
            return None
    return loss_sum.item() / seen, correct.item() / seen, seen / (time.perf_counter() - started)


def train_step(model, optimizer, images, labels, bf16):
    """One optimiser step on a batch: (loss, logits), left on the device (reading them would wait for the GPU)."""
    device = next(model.parameters()).device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)  # still uint8
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def check_diverged(model, val_loss, epoch):
    """A non-finite validation loss or weight, or an absurd validation loss, stops the run before its checkpoint is
    written (train_one_epoch has checked the training loss at its last step)."""
    if not math.isfinite(val_loss):
        raise FloatingPointError(f"validation loss became {val_loss} in epoch {epoch}")
    state = model.state_dict()
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise FloatingPointError(f"weights {', '.join(broken)} became non-finite in epoch {epoch}")
    if val_loss > DIVERGED_LOSS:
        raise FloatingPointError(
            f"validation loss {val_loss:.4g} in epoch {epoch}, over {DIVERGED_LOSS:.2f} (ten times a constant "
            "guess's ln 2): the run diverged"
        )


def dry_run(session, checkpoint):
    """One logged batch of training and one of validation, on a resumed run's weights when resuming; nothing written."""
    if checkpoint:
        session.model.load_state_dict(checkpoint["model"])
    else:
        session.model.set_normalization(*data.channel_stats(session.train_batches.dataset))
    train_one_epoch(session, 1)
    val_loss, val_acc, _ = evaluate.validate(session.model, session.val_batches, session.device, max_batches=1)
    log(f"dry run: one validation batch, loss {val_loss:.4f} accuracy {val_acc:.3f}; nothing written")


def start_or_resume(session, checkpoint, manifest_matched):
    """A new run measures its normalisation and writes last.pt before the first epoch; a resumed one takes
    weights, optimiser, RNG states and history from its checkpoint. Either way run.json says "running"."""
    model, folder = session.model, session.folder
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        run_folder.load_optimizer(session.optimizer, checkpoint["optimizer"], session.device)
        run_folder.restore_rng_state(checkpoint["rng"], data.generators(session.train_batches), session.device)
        session.start_epoch, session.best_val_loss = checkpoint["epoch"] + 1, checkpoint["best_val_loss"]
        session.history = checkpoint["history"]
        record = {
            "run_id": checkpoint.get("run_id") or uuid.uuid4().hex,
            **run_folder.read_record(folder.file("run.json")),
        }
        record.setdefault("resumed_at", []).append(run_folder.now())
        log(f"resuming {folder.path} after epoch {checkpoint['epoch']}")
        run_folder.rebuild_metrics(folder.path)  # rewritten each epoch: a user's edit kept aside first
        run_folder.note_other_device(checkpoint, run_folder.written_on(session.device, session.environment))
    else:
        model.set_normalization(*data.channel_stats(session.train_batches.dataset))
        record = {"run_id": uuid.uuid4().hex, "started_at": run_folder.now()}
    log(f"normalisation: mean {model.channel_mean.flatten().tolist()} std {model.channel_std.flatten().tolist()}")
    data_record = {
        **run_folder.data_record(session.config.data_dir, manifest_matched),
        "identity": session.data_identity,
    }
    folder.start({**record, "args": vars(session.config), "environment": session.environment, "data": data_record})
    if not checkpoint:
        run_folder.save_checkpoint(checkpoint_of(session, 0), folder.file("last.pt"))


def checkpoint_of(session, epoch):
    """Everything a resumed run needs, after epoch (0: before the first)."""
    return {
        "run_id": session.folder.record["run_id"],
        "written_on": run_folder.written_on(session.device, session.environment),
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "epoch": epoch,
        "best_val_loss": session.best_val_loss,
        "history": session.history,
        "rng": run_folder.rng_state(data.generators(session.train_batches), session.device),
        "data_identity": session.data_identity,
        "args": vars(session.config),
        "model_args": {"hidden_units": list(session.config.hidden_units), "dropout_rate": session.config.dropout},
    }


def train_epochs(session):
    """Train and validate up to --epochs; after each epoch best.pt (at a new best val_loss), last.pt, metrics.csv."""
    folder = session.folder
    for epoch in range(session.start_epoch, session.config.epochs + 1):
        if session.stop.signal_name:
            return
        epoch_started = time.perf_counter()
        trained = train_one_epoch(session, epoch)
        if trained is None:
            return
        train_loss, train_acc, images_per_s = trained
        val_loss, val_acc, val_auc = evaluate.validate(session.model, session.val_batches, session.device)
        check_diverged(session.model, val_loss, epoch)
        improved = val_loss < session.best_val_loss
        session.best_val_loss = min(session.best_val_loss, val_loss)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss}
        row.update(val_acc=val_acc, val_auc=val_auc, lr=session.optimizer.param_groups[0]["lr"])
        row.update(epoch_s=time.perf_counter() - epoch_started, images_per_s=images_per_s)
        session.history.append(row)
        state = checkpoint_of(session, epoch)
        if improved:
            run_folder.save_checkpoint(state, folder.file("best.pt"))
        run_folder.save_checkpoint(state, folder.file("last.pt"))
        run_folder.write_metrics(session.history, folder.file("metrics.csv"))
        log(
            f"epoch {epoch}/{session.config.epochs} train_loss {train_loss:.4f} train_acc {train_acc:.4f} "
            f"val_loss {val_loss:.4f} val_acc {val_acc:.4f} val_auc {val_auc:.4f} time {row['epoch_s']:.1f}s "
            f"{images_per_s:,.0f} images/s" + (" (best)" if improved else "")
        )


def finish(session, test_set):
    """A stopped run exits 75 (130 for Ctrl-C) with run.json saying so; a complete one scores best.pt on the
    test split, records "done" and draws loss.png."""
    folder, stopped_by = session.folder, session.stop.signal_name
    if stopped_by:
        for signum in (signal.SIGTERM, signal.SIGUSR1):  # a second signal while exiting must not change the code
            signal.signal(signum, signal.SIG_IGN)
        interrupted = stopped_by == "SIGINT"
        exit_code, status = (INTERRUPTED_EXIT_CODE, "interrupted") if interrupted else (REQUEUE_EXIT_CODE, "stopped")
        folder.finish(status, **({} if interrupted else {"stop_signal": stopped_by}))
        log(
            f"{status} by {stopped_by}: {folder.file('last.pt')} holds epoch "
            f"{len(session.history)}; continue with --resume --out-dir {folder.path} (exit code {exit_code})"
        )
        sys.exit(exit_code)
    config, started = session.config, session.data_identity.get("test")
    changed = test_set is not None and data.split_unchanged(config.data_dir, "test", started)  # labels read at start
    if changed:
        log(f"test: not scored: {changed} (best.pt is kept: score it with evaluate.py)")
    test = None if changed else evaluate.score_run(config, session.device, test_set)
    peak = {}
    if session.device.type == "cuda":
        peak["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(session.device) / 2**30
    folder.finish("done", test=test, best_val_loss=session.best_val_loss, **peak)
    draw_loss(folder.path)
    written = [name for name in run_folder.RUN_FILES if os.path.exists(folder.file(name))]
    log(f"done: {folder.path} ({', '.join(name + '/' * os.path.isdir(folder.file(name)) for name in written)})")


def draw_loss(out_dir):
    try:
        plot_loss.plot_runs([os.path.join(out_dir, "metrics.csv")], os.path.join(out_dir, "loss.png"))
    except UserError as error:
        log(f"train.py: note: loss.png not drawn: {error}", sys.stderr)


def run(session):
    """Train as the arguments say: a dry run, or a new or resumed run to its finish."""
    args = session.args
    check_args(args)
    out_dir, resume = run_folder.resume_target(args)
    if resume and run_folder.run_is_complete(out_dir, args, draw_loss):
        return
    device = common.pick_device(args.device)
    checkpoint = None
    if not args.dry_run or resume:  # a dry run writes nothing, so it takes no folder of its own
        session.folder = run_folder.RunFolder(out_dir)
        if session.folder.should_resume(resume):
            checkpoint = session.folder.checkpoint_to_resume()
    session.config = run_folder.run_settings(args, session.folder, checkpoint)
    # before the first step: the manifest, and the test split the run ends on (training_batches checks the others)
    manifest_matched = pcam_files.check_manifest(session.config.data_dir)
    pcam_files.check_not_half_written(session.config.data_dir)
    session.data_identity = data.data_identity(session.config.data_dir)
    if checkpoint:
        run_folder.check_same_data(checkpoint, session.data_identity, session.config.data_dir)
    test_set = None
    if any(os.path.exists(path) for path in pcam_files.split_paths(session.config.data_dir, "test")):
        test_set = data.load_split(session.config.data_dir, "test")
    pcam_files.keep_step_buffers_on_the_heap()
    set_up(session, device)
    if args.dry_run:
        dry_run(session, checkpoint)
        return
    if session.stop.signal_name == "SIGINT":  # stopped during start-up: nothing trained, so no checkpoint to write
        raise KeyboardInterrupt
    if session.stop.signal_name:  # SIGTERM or SIGUSR1: nothing is written yet, run.json included
        again = f"run the same command again (exit code {REQUEUE_EXIT_CODE})"
        log(f"train.py: stopped by {session.stop.signal_name} during start-up, before training; {again}", sys.stderr)
        sys.exit(REQUEUE_EXIT_CODE)
    start_or_resume(session, checkpoint, manifest_matched)
    train_epochs(session)
    finish(session, test_set)


def main(argv=None):
    args = parse_args(argv)
    handlers = {signum: signal.getsignal(signum) for signum in StopRequest.SIGNALS}  # the caller's, given back
    session = Session(args, StopRequest())  # first: a signal during start-up must not kill the run without a word
    try:
        run(session)
    except (UserError, FloatingPointError) as error:  # error_line keeps our one-line FloatingPointErrors as they are
        message = f"train.py: error: {common.error_line(error)}"
        if isinstance(error, FloatingPointError):
            message += "; stopped, last.pt keeps the last good epoch. Try a lower --lr in a new run (another --out-dir)"
        session.end("failed", error=message)
        sys.exit(message)
    except KeyboardInterrupt:
        session.end("interrupted")
        kept = session.folder and os.path.isfile(session.folder.file("last.pt"))
        what = "last.pt keeps the last completed epoch" if kept else "nothing was trained"
        log(f"train.py: interrupted by SIGINT; {what}", sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as error:  # a bug: the traceback follows, and run.json says the run failed
        session.end("failed", error=f"{type(error).__name__}: {common.error_line(error)}")
        raise
    finally:
        if session.folder:
            session.folder.release()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
