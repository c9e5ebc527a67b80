"""What every script shares: the user-error class and how a command reports one, the common flags, the device,
atomic writes, output checks and locks. It imports nothing of this project's, so any module may import it."""

import argparse
import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

# what a run, evaluate.py and the data commands keep in their folders: no other command's output takes these names
RECORD_NAMES = tuple(
    "run.json metrics.csv predictions.csv metrics.json train.lock pcam.lock pcam_prepared.json pcam_synth.json "
    "evaluate.lock".split()
)


class UserError(ValueError):
    """A bad input or state the user can fix; its message says what was wrong and what to do."""


def error_line(error):
    """An error's message in one line; a DataLoader worker's re-raised error ends in the original 'Error: message'."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else lines[0]


def os_reason(error):
    """The OS's words for an OSError, also when h5py wraps it (h5py's messages carry errno = N)."""
    text = str(error)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):  # what a user's disk or folder can cause
        if f"errno = {code}," in text:
            return os.strerror(code)
    return (error.strerror or text).strip().splitlines()[0]


def interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_command(prog, body, *args, folder=None):
    """body(*args); a UserError, or an OSError on a file (or in the folder the command writes), ends the command
    in one line with exit code 1. Ctrl-C or SIGTERM (scancel, a time limit) end it in one line too, after the
    file being written is removed (write_atomically); a reader gone from the pipe (`| head`) ends it quietly."""
    handler = signal.signal(signal.SIGTERM, interrupt)
    try:
        result = body(*args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then an exception of this try
        return result
    except KeyboardInterrupt as stop:
        name = str(stop) or "SIGINT"
        log(f"{prog}: interrupted by {name}; run the same command again", sys.stderr)
        sys.exit(128 + signal.Signals[name])
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing is left to flush at exit
        sys.exit(128 + signal.SIGPIPE)
    except UserError as error:
        sys.exit(f"{prog}: error: {error_line(error)}")
    except OSError as error:
        if (error.filename or folder) is None:  # not one of our files
            raise
        sys.exit(f"{prog}: error: {error.filename or folder}: {os_reason(error)}")
    finally:
        signal.signal(signal.SIGTERM, handler)


def log(message, file=None):
    """A line of the log, flushed at once: batch logs are read while the job runs."""
    print(shown(message), file=file, flush=True)


def shown(text):
    """text safe to print, write or draw: a file name's bytes outside UTF-8 (Python holds them as surrogates, which
    no UTF-8 stream or font takes) shown as escapes, \\xe9, as `ls -b` shows them."""
    try:
        return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default (a list as words), but not None or a switch's False: their help says what then."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        help_text = super()._get_help_string(action)
        if isinstance(action.default, list):
            return help_text.replace("%(default)s", " ".join(map(str, action.default)))
        return help_text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported in one line (usage stays behind --help). Flags are
    taken only whole: a shortened one (--data-d) would pass a job script's reading of its arguments unseen."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def data_folder(text):
    if text == "":
        raise argparse.ArgumentTypeError("is empty (is $PCAM_DIR set to an empty string?); name the PCAM data folder")
    return text


def output_folder(text):
    """argparse's type for a folder a command writes: an empty one is an unset shell variable, never a folder."""
    if text == "":
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); name the folder, or leave the flag out")
    return text


def add_data_dir_argument(parser):
    parser.add_argument(
        "--data-dir",
        type=data_folder,
        default=os.environ.get("PCAM_DIR", "data"),
        metavar="DIR",
        help="folder of the camelyonpatch_level_2_split_*.h5 files (default: $PCAM_DIR if set, else data; "
        "now %(default)s)",
    )


def add_out_dir_argument(parser, help_text, default=None):
    parser.add_argument("--out-dir", type=output_folder, default=default, metavar="DIR", help=help_text)


def worker_count(text):
    try:
        return int(text)
    except ValueError:
        given = "$SLURM_CPUS_PER_TASK" if text == os.environ.get("SLURM_CPUS_PER_TASK") else "it"
        raise argparse.ArgumentTypeError(f"{given} is {text!r}, not a whole number of workers") from None


def add_num_workers_argument(parser):
    parser.add_argument(
        "--num-workers",
        type=worker_count,
        default=os.environ.get("SLURM_CPUS_PER_TASK") or "0",  # a string: argparse checks it as given
        metavar="W",
        help="DataLoader worker processes ($SLURM_CPUS_PER_TASK if set)",
    )


def add_device_argument(parser):
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto takes CUDA when available and says so when it falls back to the CPU",
    )


NO_GPU_VALUES = ("", "NoDevFiles")  # CUDA_VISIBLE_DEVICES of a process shown no GPU (Slurm's word for a GPU-less job)
FAMILY_MINIMUM_DRIVER = {11: 450, 12: 525, 13: 580}  # the first driver of each CUDA major version


def slurm_gave_gpus():
    """Inside a Slurm job that was given GPUs, where a silent fall back to the CPU would waste the allocation."""
    env = os.environ
    if env.get("CUDA_VISIBLE_DEVICES") in NO_GPU_VALUES:
        return False
    counts = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE")  # "1", "a100:2"; --gpus=0 sets "0"
    gpus = env.get("SLURM_JOB_GPUS") or any(env.get(name, "0").rsplit(":", 1)[-1] not in ("", "0") for name in counts)
    return bool(env.get("SLURM_JOB_ID") and (gpus or env.get("CUDA_VISIBLE_DEVICES")))


def nvidia_driver():
    """(driver version "550.54", the CUDA version it supports "12.4") from nvidia-smi's banner; "unknown" for what
    the banner does not show (no working driver), None without nvidia-smi."""
    try:
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, errors="replace", timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = [re.search(rf"{name}:\s*(\d+(?:\.\d+)*)", banner) for name in ("Driver Version", "CUDA Version")]
    return tuple(match.group(1) if match else "unknown" for match in found)


def driver_runs(build, driver_version, driver_cuda):
    """Whether a driver runs a torch built for CUDA build: a driver of a newer CUDA major version does, and within
    the build's own major version any driver from that family's first on (NVIDIA's minor-version compatibility:
    a torch for CUDA 12.8 runs on a driver for CUDA 12.4)."""
    build_major, driver_major = version_tuple(build)[0], version_tuple(driver_cuda)[0]
    if driver_major != build_major:
        return driver_major > build_major
    known = version_tuple(driver_version or "")  # () when nvidia-smi does not show it: judged by the family alone
    return not known or known[0] >= FAMILY_MINIMUM_DRIVER.get(build_major, 0)


def missing_gpu():
    """What keeps a GPU from this process, once the driver is known to run this torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible in NO_GPU_VALUES:
        return f"CUDA_VISIBLE_DEVICES={visible or '(empty)'} hides every GPU from this process: ask for one (--gpus=1)"
    if os.environ.get("SLURM_JOB_ID") and not slurm_gave_gpus():
        return "this Slurm job was given no GPU: ask for one (--gpus=1, or make train GPUS=1)"
    return (
        "the driver runs this torch, so no GPU is visible to this process: check CUDA_VISIBLE_DEVICES and that "
        "the job asked for a GPU (--gpus=1)"
    )


def cuda_diagnosis():
    """Why CUDA is not usable, in one line: the torch build, the driver, the visible devices, and what to do."""
    driver, build = nvidia_driver(), torch.version.cuda
    driver_version, driver_cuda = driver or (None, None)
    found = [
        f"torch {torch.__version__} built for CUDA {build}" if build else "CPU build of torch",
        f"driver {driver_version} for CUDA {driver_cuda}" if driver else "no nvidia-smi",
        *(f"{name}={os.environ.get(name, '(unset)')}" for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS")),
    ]
    if not driver:
        fix = "run on a GPU node"
    elif driver_cuda == "unknown":
        fix = "nvidia-smi shows no GPU with a working driver: run where Slurm gave the job a GPU (--gpus=1)"
    elif not build:
        fix = f"install a torch built for CUDA {version_tuple(driver_cuda)[0]}.x (see pytorch.org)"
    elif driver_runs(build, driver_version, driver_cuda):
        fix = missing_gpu()
    else:
        major, driver_major = version_tuple(build)[0], version_tuple(driver_cuda)[0]
        older_torch = f"install a torch built for CUDA {driver_major}.x, or " if driver_major < major else ""
        fix = (
            f"this torch needs a driver for CUDA {major}.x (version {FAMILY_MINIMUM_DRIVER.get(major, '?')} or "
            f"newer): {older_torch}load a newer driver"
        )
    return f"CUDA is not available here ({', '.join(found)}); {fix}, or pass --device cpu"


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text))


def pick_device(requested):
    """The device --device names. auto falls back to the CPU with a line saying so, except in a Slurm job given
    GPUs: there, as with --device cuda, no CUDA is an error saying why. CUDA is started here, so a GPU that is busy
    or broken ends the command in one line before any work."""
    with warnings.catch_warnings():  # a CUDA build says why it is unusable in a warning; cuda_diagnosis says it once
        warnings.simplefilter("ignore")
        available = requested != "cpu" and torch.cuda.is_available()
    if available:
        device = torch.device("cuda")
        with cuda_errors(device, "starting CUDA"):
            torch.zeros(1, device=device)  # the first real CUDA call creates the context; is_available() does not
        return device
    if requested == "cuda" or requested == "auto" and slurm_gave_gpus():
        asked = "--device cuda" if requested == "cuda" else "this Slurm job was given GPUs"
        raise UserError(f"{asked}, but {cuda_diagnosis()}")
    if requested == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f" (CUDA_VISIBLE_DEVICES={visible or '(empty)'}: no GPU here)" if visible in NO_GPU_VALUES else ""
        log(f"device: CUDA not available, using CPU{hidden}")
    return torch.device("cpu")


@contextlib.contextmanager
def cuda_errors(device, doing):
    """A CUDA error while doing something on device (a GPU busy in exclusive-process mode, memory held by another
    process, a context that cannot be created, too little memory) as a UserError of one line: which device, what
    failed and what to do. Other errors pass as they are; on the CPU this does nothing."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if device.type != "cuda" or not (isinstance(error, torch.AcceleratorError) or "CUDA" in text):
            raise
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text:
            fix = "the GPU is full: nvidia-smi shows what holds its memory; --data-on-device no streams the data"
        elif "busy or unavailable" in text:
            fix = "another process holds this GPU (exclusive-process mode): nvidia-smi shows which; wait, or ask Slurm"
        else:
            fix = "nvidia-smi on this node shows the GPU's state; try another node, or pass --device cpu"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
        what = ". ".join(text.strip().splitlines()[0].split(". ")[:3]).rstrip(".")  # CUDA's advice lines left out
        raise UserError(
            f"CUDA device {device} (CUDA_VISIBLE_DEVICES={visible}) failed while {doing}: {what}; {fix}"
        ) from None


def write_atomically(path, write):
    """Call write(temp_path), then move the finished file into place; a failure leaves no file at path, and no
    temporary file. The temporary name carries the PID, so two writers never share one."""
    temp_path = f"{path}.{os.getpid()}.partial"
    try:
        write(temp_path)
        os.replace(temp_path, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {os_reason(error)}") from None
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def write_bytes(content, path):
    write_atomically(path, lambda temp_path: Path(temp_path).write_bytes(content))


def json_ready(value):
    """value with NaN as None (a one-class split's AUC, say), so that any JSON reader takes the file."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def write_json(obj, path):
    write_bytes(json.dumps(json_ready(obj), indent=2, default=str).encode(), path)


def write_csv(header, rows, path):
    def write(temp_path):
        with open(temp_path, "w", newline="") as target:
            csv.writer(target).writerows([header, *rows])

    write_atomically(path, write)


def save_figure(figure, path, software, dpi=120):
    """A PNG of figure, laid out tight, its Software text marking which script wrote it (see written_by); the figure
    is closed."""
    import matplotlib.pyplot as plt  # the caller drew the figure, so pyplot is loaded already

    try:
        figure.tight_layout()
        write_atomically(
            path, lambda temp_path: figure.savefig(temp_path, format="png", dpi=dpi, metadata={"Software": software})
        )
    finally:
        plt.close(figure)


def read_json(path):
    try:
        with open(path) as source:
            content = json.load(source)
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def file_digest(path, algorithm="sha256", show_progress=False):
    digest, size, done, next_report = hashlib.new(algorithm), os.path.getsize(path), 0, 0.0
    with open(path, "rb") as source:
        while chunk := source.read(16 * 2**20):
            digest.update(chunk)
            done += len(chunk)
            if show_progress and done / size >= next_report:
                log(f"{algorithm} {os.path.basename(path)}: {100 * done // size}% of {size / 2**20:.0f} MiB")
                next_report += 0.25
    return digest.hexdigest()


def is_data_file(path):
    """A split file, what download makes of one, a checkpoint or a run's or data folder's record: never an output."""
    name = os.path.basename(str(path))
    return name.startswith("camelyonpatch_") or name.endswith((".h5", ".h5.gz", ".hdf5", ".pt")) or name in RECORD_NAMES


def check_output(path, written_here, force=False):
    """Refuse, before any work, a folder in the output file's place, or a path that would replace what this command
    did not write (written_here(path) tells its own): a data file or a run's record always, others unless force."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: name the output file itself")
    if is_data_file(path) and not (os.path.isfile(path) and written_here(path)):
        raise UserError(f"{path} is a data file or a run's record, never this output: choose another output path")
    if os.path.isfile(path) and not force and not written_here(path):
        raise UserError(f"{path} exists and this command did not write it: choose another path, or add --force")


def check_output_folder(path, flag):
    """A folder a command will write into, checked before any work: no file in its place, and the nearest folder
    on its way that exists takes a new file (a read-only mount or a folder without permission does not)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder: name a folder (it is created when missing)")
    nearest = nearest_folder(path)
    try:
        tempfile.TemporaryFile(dir=nearest).close()  # unnamed (O_TMPFILE): nothing is left behind, even when killed
    except OSError as error:
        raise UserError(f"cannot write {flag} {path}: {os_reason(error)}; choose a writable folder") from None


def nearest_folder(path):
    """path, or the nearest folder above it that exists: where a folder made on the way would live."""
    nearest = os.path.abspath(path)
    while not os.path.isdir(nearest):
        nearest = os.path.dirname(nearest)
    return nearest


def written_by(software):
    """check_output's test for a figure save_figure wrote with this software text."""
    return lambda path: png_software(path) == software


def png_software(path):
    """The Software text of a PNG file (what wrote it), or None for anything else. PNG: an 8-byte signature,
    then chunks of (length, type, data, crc); savefig's metadata comes as tEXt chunks before the pixels."""
    with contextlib.suppress(OSError), open(path, "rb") as source:
        if source.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while len(header := source.read(8)) == 8:
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            keyword, _, text = source.read(length + 4)[:length].partition(b"\0")
            if kind == b"tEXt" and keyword == b"Software":
                return text.decode("latin-1")
    return None


def hold_lock(path, in_use):
    """An open file holding an exclusive flock on path, with this process's PID and host in it (closing it, or the
    process ending however it ends, lets go; lock.found is what the file held before), or a UserError: in_use with
    {holder} filled in."""
    lock = open(path, "a+", errors="replace")  # noqa: SIM115 (held open while its holder writes)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not written its PID yet"
        lock.close()
        raise UserError(in_use.format(holder=holder)) from None
    lock.seek(0)
    lock.found = lock.read()
    if not re.fullmatch(r"(PID \d+ on .+\n)?", lock.found):  # a file of the user's, by chance of that name
        lock.close()
        raise UserError(f"{path} is not a lock file of this project: move it away, or choose another folder")
    lock.truncate(0)
    lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def is_locked(path):
    try:
        with open(path) as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
