"""Helpers that the tests import: data written by the tests, the scripts run as a user runs them, a PCAM
server on 127.0.0.1, a copy of the project to submit to Slurm, and waits for a state (never a fixed sleep)."""

import contextlib
import csv
import fcntl
import functools
import hashlib
import http.server
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
import torch

import evaluate
import manage_data
import pcam_files
import plot_loss
import run_folder

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, env=None, check=False):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    result = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=HERE,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_main(script, *args, env=None, check=False):
    """script's main(args) in this process, as run_script runs it in a new one, without the seconds of importing
    torch, h5py and matplotlib again: from HERE, with env set, sys.argv[0] the script, warnings shown, stdout and
    stderr captured, SystemExit turned into the exit code. An exception main lets through fails the test, as the
    traceback a process would print fails one_line_error. For what needs a process of its own (signals, exit at
    interpreter shutdown, environment read at import) use run_script."""
    module = importlib.import_module(script.removesuffix(".py"))
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("default")
        patch.chdir(HERE)
        patch.setattr(sys, "argv", [script, *args])
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        try:
            module.main(list(args))
        except SystemExit as end:
            code = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
            if isinstance(end.code, str):
                print(end.code, file=sys.stderr)
    result = subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert result.returncode == 0, result.stderr
    return result


def one_line_error(result, fragment):
    """A user's mistake: non-zero exit, one line on stderr holding fragment, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def tissue(n, seed=0, dtype=np.uint8):
    """n plausible tissue tiles: mid-range values, never blank."""
    return np.random.default_rng(seed).integers(60, 200, size=(n, 96, 96, 3)).astype(dtype)


def labels_of(n, positives):
    """Labels of n images, positives of them 1, in a fixed shuffled order, shaped (n, 1, 1, 1) as in PCAM."""
    labels = np.zeros(n, dtype=np.uint8)
    labels[:positives] = 1
    return np.random.default_rng(1).permutation(labels).reshape(n, 1, 1, 1)


def write_split(data_dir, split, images, labels, **x_options):
    """Write one split in PCAM layout; x_options go to h5py (chunks, compression)."""
    os.makedirs(data_dir, exist_ok=True)
    x_path, y_path = pcam_files.split_paths(data_dir, split)
    with h5py.File(x_path, "w") as h5file:
        h5file.create_dataset("x", data=images, **x_options)
    with h5py.File(y_path, "w") as h5file:
        h5file.create_dataset("y", data=labels)
    return x_path, y_path


@contextlib.contextmanager
def folder_held_by_another_command(folder):
    """The data folder's lock held, as a synth, prepare or download on node-7 would hold it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, manage_data.LOCK_NAME), "w") as lock:
        lock.write("PID 4242 on node-7\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def linked_set(source_dir, target_dir, splits=("train", "valid")):
    """A data folder whose good splits are symbolic links to source_dir's (tests then add a broken one)."""
    os.makedirs(target_dir, exist_ok=True)
    for split in splits:
        for source, target in zip(
            pcam_files.split_paths(source_dir, split), pcam_files.split_paths(target_dir, split), strict=True
        ):
            os.symlink(source, target)
    return target_dir


def add_defects(directory, split, counts):
    """Turn clean images of a split into counts[kind] more defects of each kind."""
    x_path = pcam_files.split_paths(directory, split)[0]
    with h5py.File(x_path, "r+") as h5file:
        x = h5file["x"][()]
        means = x.mean(axis=(1, 2, 3))  # NaN for the rows with NaN, so those are not clean
        clean_rows = iter(
            np.flatnonzero((x.max(axis=(1, 2, 3)) <= 255) & (x.min(axis=(1, 2, 3)) >= 0) & (means > 10) & (means < 245))
        )
        for kind, count in counts.items():
            for row in [next(clean_rows) for _ in range(count)]:
                if kind == "nan":
                    x[row, 0, 0, 0] = np.nan
                elif kind == "out_of_range":
                    x[row, 1, 1, 1] = -7.0
                else:
                    x[row] = 0 if kind == "black" else 255
        h5file["x"][...] = x


def train_args(synth_dir, out_dir, *extra):
    """train.py arguments for a small, quick run on the CPU; extra flags follow."""
    return [
        "--data-dir",
        str(synth_dir),
        "--out-dir",
        str(out_dir),
        "--batch-size",
        "64",
        "--log-every",
        "10",
        "--device",
        "cpu",
        *extra,
    ]


def read_csv_rows(path):
    """The rows of a CSV file as dicts keyed by its header."""
    with open(path, newline="") as source:
        return list(csv.DictReader(source))


LOSS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr")


def loss_columns(run_dir):
    """The metrics of a run that a seed fixes (not the timings), epoch by epoch."""
    return [[row[column] for column in LOSS_COLUMNS] for row in read_csv_rows(run_dir / "metrics.csv")]


def assert_same_weights(run_dir, other_run_dir):
    """The two runs' last.pt hold equal weights."""
    weights, expected = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (run_dir, other_run_dir))
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def is_nonblank_png(path):
    """path is a PNG file with more than one colour in it."""
    with open(path, "rb") as image_file:
        assert image_file.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 1


def evaluate_model(model, loader):
    """(loss, accuracy, AUC) of model over loader, as training evaluates validation and test, on the CPU."""
    return evaluate.validate(model, loader, torch.device("cpu"))


def save_checkpoint(checkpoint, path):
    """Write a checkpoint the way training writes last.pt and best.pt."""
    run_folder.save_checkpoint(checkpoint, str(path))


def loss_plot_lines(paths, out_path):
    """[{label: (x, y)} of the loss axes, the same of the accuracy axes] of the figure plot_loss.py draws."""
    figure = plot_loss.plot_runs([str(path) for path in paths], str(out_path))
    return [
        {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}
        for axes in figure.axes[:2]
    ]


class PCAMServer(http.server.BaseHTTPRequestHandler):
    """Serves self.server.files {name: bytes}, honours Range (unless ignore_range: then 200 and the whole body),
    cuts the first reply of names in cut_once, answers the first request of names in garble_once with a line that is
    not HTTP, and gives names in bad_length a Content-Length that is not a number."""

    def do_GET(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        self.server.requests.append((name, self.headers.get("Range")))
        if name in self.server.garble_once:  # as another service on that port, or a broken proxy, would answer
            self.server.garble_once.remove(name)
            self.wfile.write(b"SSH-2.0-not-http\r\n")
            return
        if name not in self.server.files:
            self.send_error(404)
            return
        body, start = self.server.files[name], 0
        if self.headers.get("Range") and not self.server.ignore_range:
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            if start >= len(body):  # the client holds the whole file already
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "many" if name in self.server.bad_length else str(len(body) - start))
        self.end_headers()
        if name in self.server.cut_once:
            self.server.cut_once.remove(name)
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


def serve(server, name, body):
    """Serve body as name from now on, with its md5 in the server's checksums file (a bad archive that matches)."""
    server.files[name] = body
    Path(server.checksums).write_text(
        "".join(f"{hashlib.md5(served).hexdigest()}  {served_name}\n" for served_name, served in server.files.items())
    )


def download(server, data_dir, *splits):
    """Run manage_data.py download of splits into data_dir from the test server, without waiting between retries."""
    return run_script(
        "manage_data.py",
        "download",
        "--data-dir",
        str(data_dir),
        "--splits",
        *splits,
        env={"PCAM_BASE_URL": server.base_url, "PCAM_CHECKSUMS": server.checksums, "PCAM_RETRY_DELAY_SCALE": "0"},
    )


def is_running(pid):
    """A process with this PID exists and has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@functools.cache
def slurm_is_up():
    """sbatch is installed and a Slurm controller answers (asked once: sinfo waits seconds for an absent one)."""
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, check=False).returncode == 0


SMALL_JOB = {"GPUS": "0", "CPUS": "1", "MEM": "1500M", "TIME": "00:10:00"}  # the local GPU has no device


def copy_project(target):
    """A copy of the project's tracked files (git ls-files) in target, sharing this .venv."""
    listing = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, check=True)
    for name in listing.stdout.splitlines():
        os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(HERE, name), os.path.join(target, name))  # keeps mtimes: make sees .venv as current
    os.symlink(os.path.join(HERE, ".venv"), os.path.join(target, ".venv"))


MAKE_VARIABLES = (
    "RUN",
    "RUNS",
    "OUT",
    "ARGS",
    "DATA_DIR",
    "PARTITION",
    "TIME",
    "GPUS",
    "CPUS",
    "MEM",
    "SEEDS",
    "LRS",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
)  # what an outer `make test` exports; a test sets its own


def make_env(env=None):
    """The environment for a make the test runs: this one, without what an outer make exported, plus env."""
    return {**{k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}, **(env or {})}


def make(project, *targets, env=None):
    """Run make targets in the project copy; they must succeed. Returns their output."""
    result = subprocess.run(
        ["make", "-s", *targets],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
        env=make_env(env),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def submitted_job(output):
    """(job id from make's line, job id from sbatch's line) of a submission's output, one of them None."""
    return re.search(r"submitted (?:job|array) (\d+)|Submitted batch job (\d+)", output).group(1, 2)


def wait_until(check, timeout, what):
    """Call check() every second until it returns something true, and return that; fail once timeout s have passed."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(1)
    return value


JOB_ENDS = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def wait_for_job(job_id, timeout=300, on_poll=None):
    """Poll sacct until every record of the job (array tasks included) has ended; returns their states."""

    def ended_states():
        if on_poll:
            on_poll()
        lines = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True, check=False
        ).stdout.splitlines()  # a state may hold spaces: "CANCELLED by 0"
        states = [line.split("|")[1] for line in lines]
        return states if states and all(state.split()[0] in JOB_ENDS for state in states) else None

    return wait_until(ended_states, timeout, f"the end of job {job_id}")


def settled_job(job_id, timeout=120):
    """scontrol's record of the job once the controller is done with it too: sacct may report CANCELLED while
    scontrol still says COMPLETING, and a requeued job would be PENDING there."""

    def settled_record():
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False).stdout
        state = re.search(r"JobState=(\S+)", show)
        return show if state and state.group(1) in JOB_ENDS else None

    return wait_until(settled_record, timeout, f"a final state of job {job_id} in scontrol")


def throwaway_repo(folder, module, code, tests, *options):
    """A git work tree holding module.py and test_module.py, and mutate.py's options for them."""
    Path(folder, f"{module}.py").write_text(code)
    Path(folder, f"test_{module}.py").write_text(tests)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    return ["--root", str(folder), "--files", f"{module}.py", "--tests", f"test_{module}.py", *options]


def train_until(args, marker, env=None, new_session=False):
    """train.py in a process of its own, returned once it has logged a line holding marker; new_session: in its
    own process group, as sbatch and a terminal start it."""
    process = subprocess.Popen(
        [sys.executable, "-u", "train.py", *args],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=new_session,
    )
    for line in process.stdout:
        if marker in line:
            return process
    raise AssertionError(f"train.py ended before logging {marker!r}, with exit code {process.wait()}")


def start_run(args):
    """train.py in its own process group, returned once step 10 is logged."""
    return train_until(args, " step 10/", new_session=True)
