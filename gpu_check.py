"""Prove train.py's GPU path on this node in one table: `make gpu-check` (see docs/benchmark.md).

Every run is train.py or evaluate.py run as a user runs them, each in a fresh process, on a synthetic set:
exact resume (fp32 and bf16, on the device and the files path, with 2 workers), the three data paths giving the
same last.pt, best.pt loading where no GPU is visible and scored alike on CUDA and on the CPU, a --device cpu run
that never starts CUDA, 20 steps with no wait for the GPU, and training speed against the targets of
docs/benchmark.md for the GPU it finds (an unknown GPU's figures get no verdict). Exits 1 when any row fails.
"""

import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common
import data
import pcam_files
import train as train_script

IMAGES = 65536  # synthetic train images: 1.8 GB of uint8, resident on any GPU; the whole check takes minutes
HERE = os.path.dirname(os.path.abspath(__file__))
SCORE_TOLERANCE = 1e-4  # CUDA and CPU class-1 scores of one checkpoint differ by summation order only
# images/s at batch 1024 (docs/benchmark.md): per GPU kind (a part of torch's device name), per data path; "epoch"
# is train+valid images over train.py's epoch_s on the device path, 262,144 + 32,768 images in 0.5 s
TARGETS = {
    "H100": {"device": 1_000_000, "epoch": 589_824},
    "MIG 1g.5gb": {"host": 200_000},
}
# train.py as run on a GPU too small for the splits: no room on the device, so auto takes the host path
ON_A_FULL_DEVICE = (
    "import sys, data, train; data.device_room = lambda device: (0, 'no room (gpu_check)'); train.main(sys.argv[1:])"
)
CHECKPOINT_ON_CPU = """
import sys, torch
def tensors_in(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return [value] if isinstance(value, torch.Tensor) else []
tensors = tensors_in(torch.load(sys.argv[1], weights_only=True))
assert not torch.cuda.is_available() and tensors and all(t.device.type == "cpu" for t in tensors)
print(len(tensors))
"""
CPU_RUN_LEAVES_CUDA = "import sys, torch, train; train.main(sys.argv[1:]); print(torch.cuda.is_initialized())"


def script(*args, env=None):
    """Run one of the project's scripts; its stdout, or exit with its error line."""
    result = subprocess.run(
        [sys.executable, *args], cwd=HERE, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        sys.exit(f"gpu_check.py: {' '.join(args[:1])} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def train(data_dir, out_dir, device, *flags, program=("train.py",)):
    """Run train.py: {"dir", "path" (the data path taken), "record" (run.json), "rate" (last epoch's train images/s),
    "epoch_rate" (train+valid images over its epoch_s)}."""
    output = script(
        *program,
        *("--data-dir", data_dir, "--out-dir", out_dir, "--device", device, "--num-workers", "2"),
        *("--log-every", str(10**9), *flags),
    )
    record = json.loads(Path(out_dir, "run.json").read_text())
    with open(os.path.join(out_dir, "metrics.csv"), newline="") as source:
        last = list(csv.DictReader(source))[-1]
    images = sum(int(n.replace(",", "")) for n in re.findall(r"^(?:train|valid): ([\d,]+) images", output, re.M))
    path = re.search(r"^data path: (\w+)", output, re.MULTILINE).group(1)
    epoch_rate = images / float(last["epoch_s"])
    return {
        "dir": out_dir,
        "path": path,
        "record": record,
        "rate": float(last["images_per_s"]),
        "epoch_rate": epoch_rate,
    }


def history(run_dir):
    """Each epoch's metrics but its timings, and the weights, of a run's last.pt."""
    checkpoint = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    untimed = [{k: v for k, v in row.items() if k not in ("epoch_s", "images_per_s")} for row in checkpoint["history"]]
    return untimed, checkpoint["model"]


def same_run(one, other):
    (rows, weights), (other_rows, other_weights) = history(one), history(other)
    return rows == other_rows and all(torch.equal(weights[name], other_weights[name]) for name in weights)


def verdict(ok):
    return "yes" if ok else "NO"


def resume_rows(data_dir, work_dir, device):
    """Per precision and data path: 2 epochs straight against 1 epoch, then --resume to 2 in a new process."""
    rows, straight_runs = [], {}
    for precision in ("fp32", "bf16"):
        for data_on_device in ("yes", "no"):
            flags = ["--batch-size", "1024", "--data-on-device", data_on_device] + ["--bf16"] * (precision == "bf16")
            name = f"{precision}-{data_on_device}"
            straight, resumed = os.path.join(work_dir, name), os.path.join(work_dir, f"{name}-resumed")
            straight_runs[name] = train(data_dir, straight, device, "--epochs", "2", *flags)
            train(data_dir, resumed, device, "--epochs", "1", *flags)
            train(data_dir, resumed, device, "--epochs", "2", "--resume", *flags)
            exact = same_run(straight, resumed)
            rows.append(
                (f"resume equals straight run, {precision}, {straight_runs[name]['path']}", verdict(exact), exact)
            )
    return rows, straight_runs


def path_rows(data_dir, work_dir, device, straight_runs):
    """The host path (a device with no room for the splits) against the device and files paths: same last.pt."""
    flags = ("--epochs", "2", "--batch-size", "1024")
    host = train(data_dir, os.path.join(work_dir, "host"), device, *flags, program=("-c", ON_A_FULL_DEVICE))
    straight_runs["fp32-host"] = host
    device_run, files_run = straight_runs["fp32-yes"], straight_runs["fp32-no"]
    exact = same_run(device_run["dir"], host["dir"]) and same_run(device_run["dir"], files_run["dir"])
    paths = ", ".join(run["path"] for run in (device_run, host, files_run))
    return [(f"same last.pt on the {paths} paths", verdict(exact), exact)]


def evaluation_rows(data_dir, work_dir, run_dir, device):
    """best.pt read where no GPU is visible, then scored by evaluate.py on device and on the CPU, in batches of the
    run's size: scores within SCORE_TOLERANCE, and the same confusion matrix unless a score lies that close to 0.5."""
    best = os.path.join(run_dir, "best.pt")
    tensors = script("-c", CHECKPOINT_ON_CPU, best, env={"CUDA_VISIBLE_DEVICES": ""})
    rows = [("best.pt loads with weights_only, no GPU visible", f"yes, {tensors.strip()} tensors on the CPU", True)]
    batch_size = json.loads(Path(run_dir, "run.json").read_text())["args"]["batch_size"]
    scores, confusions = [], []
    for where in (device, "cpu"):
        out_dir = os.path.join(work_dir, f"evaluate-{where}")
        script(
            "evaluate.py",
            best,
            "--data-dir",
            data_dir,
            "--out-dir",
            out_dir,
            "--device",
            where,
            "--batch-size",
            str(batch_size),
        )
        with open(os.path.join(out_dir, "predictions.csv"), newline="") as source:
            scores.append(np.array([float(row["score"]) for row in csv.DictReader(source)]))
        confusions.append(json.loads(Path(out_dir, "metrics.json").read_text())["confusion"])
    largest = float(np.abs(scores[0] - scores[1]).max())
    flipped = (scores[0] >= 0.5) != (scores[1] >= 0.5)
    explained = bool(np.all(np.abs(scores[1][flipped] - 0.5) <= SCORE_TOLERANCE))
    agree = confusions[0] == confusions[1] or explained
    rows.append(
        (
            f"{device} and cpu scores of best.pt within {SCORE_TOLERANCE:g}",
            f"largest {largest:.1e}",
            largest <= SCORE_TOLERANCE,
        )
    )
    rows.append((f"{device} and cpu confusion matrices equal", f"{verdict(agree)}, {confusions[0]}", agree))
    return rows


def cpu_run_row(data_dir, work_dir):
    """A --device cpu run, on a node with a GPU, ends without having started CUDA."""
    out_dir = os.path.join(work_dir, "cpu")
    args = ("--data-dir", data_dir, "--out-dir", out_dir, "--device", "cpu", "--epochs", "1", "--log-every", "1000")
    started = script("-c", CPU_RUN_LEAVES_CUDA, *args).strip().splitlines()[-1] == "True"
    return [("a --device cpu run never starts CUDA", "started CUDA" if started else "yes", not started)]


def sync_row(data_dir, device):
    """20 training steps on the device path, the start of a pass included; on CUDA under
    torch.cuda.set_sync_debug_mode("error"), where any wait of the host for the GPU (an .item(), a blocking copy)
    raises. The CPU runs the same steps, with nothing to check."""
    what, on = "no host-device sync in 20 steps, device path, batch 1024", torch.device(device)
    args = train_script.parse_args(["--data-dir", data_dir, "--batch-size", "1024", "--data-on-device", "yes"])
    batches, _ = data.training_batches(args, on)
    model, optimizer = train_script.build_model(args, on)
    for images, labels in batches:  # a first step: allocations and kernel choices, outside the check
        train_script.train_step(model, optimizer, images, labels, False)
        break
    if on.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _, (images, labels) in zip(range(20), batches, strict=False):
            train_script.train_step(model, optimizer, images, labels, False)
    except RuntimeError as error:
        return [(what, f"NO: {common.error_line(error)[:50]}", False)]
    finally:
        if on.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return [
        (what, "yes" if on.type == "cuda" else "steps ran; the check needs CUDA", True if on.type == "cuda" else None)
    ]


def speed_rows(data_dir, work_dir, device, straight_runs, device_name):
    """images/s of the second epoch on each path at batch 1024 (the runs above) and on the device path at batch 256;
    the fp32 rows at batch 1024 checked against the target for this GPU kind where there is one."""
    targets = targets_for(device_name)
    for precision in ("fp32", "bf16"):
        flags = ["--epochs", "2", "--batch-size", "256"] + ["--bf16"] * (precision == "bf16")
        straight_runs[f"{precision}-256"] = train(data_dir, os.path.join(work_dir, f"{precision}-256"), device, *flags)
    rows = []
    speed_runs = ("fp32-yes", 1024), ("bf16-yes", 1024), ("fp32-host", 1024), ("fp32-no", 1024), ("fp32-256", 256)
    for name, batch_size in (*speed_runs, ("bf16-256", 256)):
        run, precision = straight_runs[name], name.split("-")[0]
        peak = run["record"].get("peak_device_memory_gib")
        result = f"{run['rate']:,.0f} images/s" + (f", peak device memory {peak:.2f} GiB" if peak else "")
        target = targets.get(run["path"]) if precision == "fp32" and batch_size == 1024 else None
        rows.append(
            (f"training, batch {batch_size}, {precision}, {run['path']}", *against(run["rate"], target, result))
        )
    device_run = straight_runs["fp32-yes"]
    rate = device_run["epoch_rate"]
    what = f"train+valid epoch, batch 1024, fp32, {device_run['path']}"
    rows.append((what, *against(rate, targets.get("epoch"), f"{rate:,.0f} images/s")))
    return rows


def targets_for(device_name):
    """This GPU kind's targets, {} for a kind without any; an H100's MIG slice is not an H100."""
    for kind, targets in TARGETS.items():
        if kind in device_name and ("MIG" in kind) == ("MIG" in device_name):
            return targets
    return {}


def against(rate, target, result):
    """(result text, verdict): None where this GPU kind has no target for the row."""
    if target is None:
        return result, None
    return f"{result} (target {target:,})", rate >= target


def print_table(rows, device_name, n_images):
    print(
        f"\npcam-mlp gpu-check, {time.strftime('%Y-%m-%d')}, {platform.node()}, {device_name}, torch "
        f"{torch.__version__} / CUDA {torch.version.cuda}, {n_images:,} synthetic train images, MLP (64, 32), Adam"
    )
    print(f"| {'check':<56} | {'result':<62} | {'verdict':<7} |")
    print(f"|{'-' * 58}|{'-' * 64}|{'-' * 9}|")
    for what, value, ok in rows:
        print(f"| {what:<56} | {value:<62} | {'-' if ok is None else 'pass' if ok else 'FAIL':<7} |")


def main(argv=None):
    parser = common.ArgumentParser(description="Prove train.py's GPU path on this node (see README.md).")
    parser.add_argument("--dir", default="bench_data", metavar="DIR", help="where the set and runs go")
    parser.add_argument("--images", type=int, default=IMAGES, metavar="N", help="train images")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the same checks, for tests")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "gpu_check.py: CUDA is not available here (no GPU, or a CPU build of torch); "
            "run it on a GPU node, e.g. srun --partition=gpu_course --gpus=1 make gpu-check"
        )
    data_dir = os.path.join(args.dir, f"gpu_check_{args.images}")
    if not os.path.isfile(pcam_files.split_paths(data_dir, "test")[1]):
        n_small = str(max(args.images // 8, 256))
        script(
            *("manage_data.py", "synth", "--data-dir", data_dir, "--force", "--n-train", str(args.images)),
            *("--n-valid", n_small, "--n-test", n_small),
        )
    with tempfile.TemporaryDirectory(dir=args.dir) as work_dir:
        rows, straight_runs = resume_rows(data_dir, work_dir, args.device)
        rows += path_rows(data_dir, work_dir, args.device, straight_runs)
        rows += evaluation_rows(data_dir, work_dir, straight_runs["fp32-yes"]["dir"], args.device)
        rows += cpu_run_row(data_dir, work_dir)
        device_name = straight_runs["fp32-yes"]["record"]["environment"]["device"]
        rows += speed_rows(data_dir, work_dir, args.device, straight_runs, device_name)
        rows += sync_row(data_dir, args.device)  # last: it holds the GPU in this process until the check ends
    print_table(rows, device_name, args.images)
    return 1 if any(ok is False for *_, ok in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
