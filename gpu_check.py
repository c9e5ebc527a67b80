"""Prove train.py's GPU path on this node in one table: `make gpu-check` (see docs/benchmark.md).

Every row comes from train.py and evaluate.py run as a user runs them, each in a fresh process, on a
synthetic set: exact resume (fp32 and bf16, on the resident and the streaming path, with 2 workers), a
checkpoint loaded with weights_only=True where no GPU is visible, eval-test/ equal to evaluate.py,
training images/s at batch 256 and 1024 (the second epoch, so warmed up; an epoch ends in a device sync),
peak device memory and the data path each run took. Exits 1 on any mismatch.
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

import torch

import common
import pcam_files

IMAGES = 65536  # synthetic train images: 1.8 GB of uint8, resident on any GPU; the whole check takes minutes
HERE = os.path.dirname(os.path.abspath(__file__))
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


def script(*args, env=None):
    """Run one of the project's scripts; its stdout, or exit with its error line."""
    result = subprocess.run(
        [sys.executable, *args], cwd=HERE, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        sys.exit(f"gpu_check.py: {' '.join(args[:1])} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def train(data_dir, out_dir, device, *flags):
    """Run train.py: {"dir", "path" (the data path taken), "record" (run.json), "rate" (last epoch's images/s)}."""
    output = script(
        "train.py",
        *("--data-dir", data_dir, "--out-dir", out_dir, "--device", device, "--num-workers", "2"),
        *("--log-every", str(10**9), *flags),
    )
    record = json.loads(Path(out_dir, "run.json").read_text())
    with open(os.path.join(out_dir, "metrics.csv"), newline="") as source:
        rate = float(list(csv.DictReader(source))[-1]["images_per_s"])
    path = re.search(r"^data path: (\w+)", output, re.MULTILINE).group(1)
    return {"dir": out_dir, "path": path, "record": record, "rate": rate}


def history(run_dir):
    """Each epoch's metrics but its timings, and the weights, of a run's last.pt."""
    checkpoint = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    untimed = [{k: v for k, v in row.items() if k not in ("epoch_s", "images_per_s")} for row in checkpoint["history"]]
    return untimed, checkpoint["model"]


def same_run(one, other):
    (rows, weights), (other_rows, other_weights) = history(one), history(other)
    return rows == other_rows and all(torch.equal(weights[name], other_weights[name]) for name in weights)


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
            what = f"resume equals straight run, {precision}, {straight_runs[name]['path']}"
            rows.append((what, "yes" if exact else "NO", exact))
    return rows, straight_runs


def portability_rows(data_dir, work_dir, run_dir):
    """best.pt read where no GPU is visible, and eval-test/ against evaluate.py on the same checkpoint, in batches
    of the run's size (cuBLAS may sum a row in another order for another batch size)."""
    best = os.path.join(run_dir, "best.pt")
    tensors = script("-c", CHECKPOINT_ON_CPU, best, env={"CUDA_VISIBLE_DEVICES": ""})
    rows = [("best.pt loads with weights_only, no GPU visible", f"yes, {tensors.strip()} tensors on the CPU", True)]
    evaluated = os.path.join(work_dir, "evaluate")
    batch_size = json.loads(Path(run_dir, "run.json").read_text())["args"]["batch_size"]
    script("evaluate.py", best, "--data-dir", data_dir, "--out-dir", evaluated, "--batch-size", str(batch_size))
    equal = Path(run_dir, "eval-test", "predictions.csv").read_text() == Path(evaluated, "predictions.csv").read_text()
    rows.append(("eval-test/ equals evaluate.py (predictions.csv)", "yes" if equal else "NO", equal))
    return rows


def speed_rows(data_dir, work_dir, device, straight_runs):
    """images/s of the second epoch: the resumed check's runs at batch 1024, new ones at batch 256."""
    rows = []
    for precision in ("fp32", "bf16"):
        for batch_size in (256, 1024):
            run = straight_runs[f"{precision}-yes"]
            if batch_size == 256:
                flags = ["--epochs", "2", "--batch-size", "256"] + ["--bf16"] * (precision == "bf16")
                run = train(data_dir, os.path.join(work_dir, f"{precision}-256"), device, *flags)
            peak = run["record"].get("peak_device_memory_gib")
            result = f"{run['rate']:,.0f} images/s" + (f", peak device memory {peak:.2f} GiB" if peak else "")
            rows.append((f"training, batch {batch_size}, {precision}, {run['path']}", result, True))
    return rows


def print_table(rows, device_name, n_images):
    print(
        f"\npcam-mlp gpu-check, {time.strftime('%Y-%m-%d')}, {platform.node()}, {device_name}, torch "
        f"{torch.__version__} / CUDA {torch.version.cuda}, {n_images:,} synthetic train images, MLP (64, 32), Adam"
    )
    print(f"| {'check':<52} | {'result':<56} |")
    print(f"|{'-' * 54}|{'-' * 58}|")
    for what, value, _ in rows:
        print(f"| {what:<52} | {value:<56} |")


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
        rows += portability_rows(data_dir, work_dir, straight_runs["fp32-yes"]["dir"])
        rows += speed_rows(data_dir, work_dir, args.device, straight_runs)
    print_table(rows, straight_runs["fp32-yes"]["record"]["environment"]["device"], args.images)
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
