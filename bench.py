"""Side-by-side speed and memory of the data pipeline against a reference written the usual way.

The reference is how the course skeleton and most course solutions read PCAM: one h5py read and
one np.mean per image to filter, one h5py read plus nan_to_num / clip / astype / float conversion
per image in __getitem__, all labels read for the WeightedRandomSampler, default collate.
Every figure comes from this one run on this machine, with the files in the page cache, so the
ratios are what to compare. Usage: `python bench.py [--n-train N] [--dir bench_data]`.
"""

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

import data
import eda
import manage_data
import pcam_files
from model import MLP

BATCH_SIZE = 256
ROUNDS = 3  # each contender is timed next to its yardstick this many times, in turn
HERE = os.path.dirname(os.path.abspath(__file__))


class ReferencePCAM(Dataset):
    """Per-image reading and cleaning, as commonly written."""

    def __init__(self, x_path, y_path, filter_data=False):
        self.x_path, self.y_path, self.x = x_path, y_path, None
        with h5py.File(x_path, "r") as h5file:
            count = len(h5file["x"])
            self.indices = list(range(count))
            if filter_data:
                self.indices = []
                for i in range(count):
                    mean = np.mean(np.clip(np.nan_to_num(h5file["x"][i]), 0, 255))
                    if data.BLACK_THRESHOLD < mean < data.WHITE_THRESHOLD:
                        self.indices.append(i)
        with h5py.File(y_path, "r") as h5file:
            self.all_labels = h5file["y"][:].reshape(-1)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if self.x is None:
            self.x = h5py.File(self.x_path, "r")["x"]
        image = np.nan_to_num(self.x[self.indices[i]], nan=0.0, posinf=255.0, neginf=0.0)
        image = np.clip(image, 0, 255).astype(np.uint8)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # ToTensor
        return tensor, int(self.all_labels[self.indices[i]])


def reference_loader(x_path, y_path, filter_data=False):
    dataset = ReferencePCAM(x_path, y_path, filter_data)
    labels = dataset.all_labels  # all labels, the filtered rows included
    weights = (1.0 / np.bincount(labels))[labels][dataset.indices]
    sampler = WeightedRandomSampler(weights, len(dataset), replacement=True, generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)


def images_per_s(loader, max_images=None, as_float=False):
    """Iterate the loader (up to max_images), touching each batch (as_float: converting it to float32, as a trainer
    does); images per second."""
    seen, started = 0, time.perf_counter()
    for images, _ in loader:
        if as_float:
            images.float()
        seen += len(images)
        if max_images and seen >= max_images:
            break
    return seen / (time.perf_counter() - started)


def read_in_blocks(x_path):
    """Read the whole x file once, in pcam_files.py's large blocks, through h5py: the baseline of a pass."""
    with h5py.File(x_path, "r") as h5file:
        dset = h5file["x"]
        step = pcam_files.block_rows(dset)
        for start in range(0, len(dset), step):
            dset[start : start + step]


def plain_mlp(hidden_units=(64, 32)):
    """The MLP a user would write: nn.Sequential of the same widths, float (B, 3, 96, 96) input."""
    layers, in_features = [nn.Flatten()], 3 * 96 * 96
    for width in hidden_units:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(0.2)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, 2))


def sgd_step(model, optimizer, images, labels):
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def model_rate(model, batches, train=True):
    """Images/s of 60 steps over in-memory batches, taken in turn, after 10 warm-up steps: forward + backward + SGD,
    or with train=False the forward alone."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train(train)
    images_timed = sum(len(batches[step % len(batches)][1]) for step in range(10, 70))
    with torch.set_grad_enabled(train):
        for step in range(70):
            if step == 10:
                started = time.perf_counter()
            images, labels = batches[step % len(batches)]
            if train:
                sgd_step(model, optimizer, images, labels)
            else:
                model(images)
    return images_timed / (time.perf_counter() - started)


def plain_rates():
    """The physical reference: the plain MLP on float input already in memory, training and forward only."""
    batch = torch.rand(BATCH_SIZE, 3, 96, 96), torch.randint(0, 2, (BATCH_SIZE,))
    return model_rate(plain_mlp(), [batch]), model_rate(plain_mlp(), [batch], train=False)


def course_style_run(data_dir):
    """Run in a fresh process, as train.py's run is timed: one epoch written the course way, the per-image outlier
    filter of train and valid, a train epoch of the reference loader and the plain model's step taken in turn, then a
    validation pass of the reference dataset in order and the plain forward. Prints its seconds and its train epoch's
    images/s; the seconds leave out the imports, torch._dynamo's included (see end_to_end)."""
    import torch._dynamo  # noqa: F401  (imported by the first optimiser otherwise: start-up, as for train.py)

    started = time.perf_counter()
    train_loader = reference_loader(*pcam_files.split_paths(data_dir, "train"), filter_data=True)
    val_set = ReferencePCAM(*pcam_files.split_paths(data_dir, "valid"), filter_data=True)
    model = plain_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, epoch_started = 0, time.perf_counter()
    for images, labels in train_loader:
        sgd_step(model, optimizer, images, labels)
        seen += len(labels)
    epoch_rate = seen / (time.perf_counter() - epoch_started)
    model.eval()
    with torch.no_grad():
        for images, _ in DataLoader(val_set, batch_size=BATCH_SIZE):
            model(images)
    print(time.perf_counter() - started, epoch_rate)


def course_style(data_dir):
    """(seconds, train epoch images/s) of course_style_run, in a fresh process."""
    run = subprocess.run(
        [sys.executable, __file__, "--course-style", data_dir], capture_output=True, text=True, check=True
    )
    return tuple(float(value) for value in run.stdout.split()[-2:])


def seconds(work, *args, repeats=2, **kwargs):
    """Best wall time of a few runs of work(*args, **kwargs)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work(*args, **kwargs)
        times.append(time.perf_counter() - started)
    return min(times)


def ensure_set(directory, n_train, dtype, poison, **x_options):
    """Write (once) a synthetic train+valid set; with x_options, rewrite train x chunked/compressed."""
    x_path = pcam_files.split_paths(directory, "train")[0]
    if os.path.isfile(x_path):
        with h5py.File(x_path, "r") as h5file:
            if len(h5file["x"]) == n_train and h5file["x"].dtype == np.dtype(dtype):
                return
    source = directory + "_source" if x_options else directory
    args = ["synth", "--data-dir", source, "--n-train", str(n_train), "--n-valid", str(max(n_train // 8, 256))]
    manage_data.main([*args, "--n-test", "0", "--dtype", dtype, "--poison", str(poison), "--force"])
    if x_options:
        os.makedirs(directory, exist_ok=True)
        for split in ("train", "valid"):
            sources, outputs = pcam_files.split_paths(source, split), pcam_files.split_paths(directory, split)
            for key, src, out in zip("xy", sources, outputs, strict=True):
                with h5py.File(src, "r") as h5src, h5py.File(out, "w") as h5out:
                    h5out.create_dataset(key, data=h5src[key][()], **(x_options if key == "x" else {}))


def peak_rss_probe(data_dir):
    """Run in a child process: one streaming, filtered train epoch; print peak RSS in MiB."""
    train_loader, _ = data.get_dataloaders(data_dir, batch_size=BATCH_SIZE, filter_data=True)
    for _ in train_loader:
        pass
    with open("/proc/self/status") as status:  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's
        print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)


def end_to_end(data_dir):
    """`train.py --epochs 1 --filter-data` in a fresh process: (its training images/s from metrics.csv, seconds from
    the start of train.main to its return). The seconds leave out interpreter start-up and exit (loading and tearing
    down torch, h5py and matplotlib take seconds, and vary by seconds here)."""
    timed = (
        "import sys, time, torch._dynamo, train\nstarted = time.perf_counter()\n"
        "train.main(sys.argv[1:])\nprint(time.perf_counter() - started)"
    )
    with tempfile.TemporaryDirectory() as out_dir:
        # SGD, as the plain step; torch imports torch._dynamo (about 2 s here) when the first optimiser is made:
        # start-up, not training
        argv = ["--data-dir", data_dir, "--epochs", "1", "--device", "cpu", "--optimizer", "sgd", "--momentum", "0"]
        argv += ["--filter-data", "--out-dir", os.path.join(out_dir, "run"), "--log-every", "1000"]
        run = subprocess.run([sys.executable, "-c", timed, *argv], check=True, capture_output=True, text=True)
        with open(os.path.join(out_dir, "run", "metrics.csv"), newline="") as metrics:
            rate = float(next(csv.DictReader(metrics))["images_per_s"])
    return rate, float(run.stdout.split()[-1])


def ratio_text(rounds, top, bottom, template, digits=2):
    """template filled with the median over the rounds of top / bottom, then the range of that ratio."""
    ratios = sorted(measured[top] / measured[bottom] for measured in rounds)
    median, low, high = (f"{ratio:.{digits}f}" for ratio in (statistics.median(ratios), ratios[0], ratios[-1]))
    return template.format(median) + f"; rounds {low}-{high}"


def training_rows(data_dir, n_train):
    """The project's step and a train.py epoch against the plain float step; a whole train.py run against the plain
    bound and against the course-style run doing the same work. Each round measures every contender next to its
    yardstick; a row gives the median round and the range of its ratio. Returns (rows, the plain step's rate)."""
    for split in ("train", "valid"):
        read_in_blocks(pcam_files.split_paths(data_dir, split)[0])  # into the page cache, for every contender alike
    label = f"uint8 {os.path.getsize(pcam_files.split_paths(data_dir, 'train')[0]) / 2**30:.2f} GiB"
    train_loader, _ = data.get_dataloaders(data_dir, batch_size=BATCH_SIZE)  # uint8 channels-last batches
    batches = [batch for batch, _ in zip(train_loader, range(8), strict=False)]
    pcam_files.keep_step_buffers_on_the_heap()  # as train.py does
    n_valid = len(pcam_files.read_labels(pcam_files.split_paths(data_dir, "valid")[1]))
    rounds = []
    for _round in range(ROUNDS):
        plain, forward = plain_rates()
        step = model_rate(MLP(), batches)
        course_run, course_epoch = course_style(data_dir)
        epoch, run = end_to_end(data_dir)
        bound = n_train / plain + n_valid / forward  # the set has no outliers: the filter keeps every image
        rounds.append(
            dict(plain=plain, forward=forward, step=step, epoch=epoch, run=run, course_epoch=course_epoch)
            | dict(course_run=course_run, bound=bound)
        )
    median = {key: statistics.median(measured[key] for measured in rounds) for key in rounds[0]}
    rows = [
        ("plain MLP (64, 32) step: fwd+bwd+SGD", "float, in memory", "plain", "images/s", "the compute bound"),
        ("plain MLP (64, 32) forward", "float, in memory", "forward", "images/s", ""),
        ("pcam-mlp step on its loader's batches", label, "step", "images/s",
         ratio_text(rounds, "step", "plain", "{}x plain step (target 0.75)")),
        ("train.py epoch (SGD), metrics.csv rate", label, "epoch", "images/s",
         ratio_text(rounds, "epoch", "plain", "{}x plain step (target 0.8)")),
        ("reference epoch: its loader + plain step", label, "course_epoch", "images/s",
         ratio_text(rounds, "epoch", "course_epoch", "train.py {}x this", 1)),
        ("train.py 1 epoch, filtered, less start-up", label, "run", "s",
         ratio_text(rounds, "run", "bound", f"{{}}x plain bound ({median['bound']:.1f} s)")),
        ("course-style run: filter, epoch, valid", label, "course_run", "s",
         ratio_text(rounds, "course_run", "run", "train.py {}x faster (target 3)", 1)),
    ]  # fmt: skip
    return [(what, file, median[key], unit, ratio) for what, file, key, unit, ratio in rows], median["plain"]


def data_path_rows(sets, plain_train):
    """Loader epochs (the uint8 set's also with each batch converted to float32, as a trainer does), filter passes
    and eda.py scans of each set, against the reference pipeline. The float32 set comes last: reading it sets glibc's
    mmap threshold for the rest of the process (pcam_files.keep_large_buffers_off_the_heap), which slows every large
    buffer after it, the reference's batches included."""
    rows, targets = [], {"uint8": " (target 15)", "packed": "", "float32": " (target 4)"}
    for name, filtered in (("uint8", False), ("packed", False), ("float32", True)):
        x_path, y_path = pcam_files.split_paths(sets[name], "train")
        read_in_blocks(x_path)  # into the page cache, for both contenders alike
        reference = images_per_s(reference_loader(x_path, y_path, filtered), 1024 if name == "packed" else None)
        train_loader, _ = data.get_dataloaders(sets[name], batch_size=BATCH_SIZE, filter_data=filtered)
        ours = images_per_s(train_loader, 4096 if name == "packed" else None)
        label = f"{name} {os.path.getsize(x_path) / 2**30:.2f} GiB" + (", filtered" if filtered else "")
        rows.append(("data-only train epoch, reference", label, reference, "images/s", ""))
        ours_ratio = f"{ours / reference:.1f}x reference{targets[name]}"
        rows.append(("data-only train epoch, pcam-mlp", label, ours, "images/s", ours_ratio))
        if name == "uint8":
            as_float = images_per_s(train_loader, as_float=True)
            float_ratio = f"{as_float / reference:.1f}x reference (target 20)"
            rows.append(("  batches converted to float32", label, as_float, "images/s", float_ratio))
            plain_ratio = f"{ours / plain_train:.1f}x plain step (target 10)"
            rows.append(("  vs plain MLP training step", label, ours, "images/s", plain_ratio))
        if name != "packed":
            read, mask = seconds(read_in_blocks, x_path), seconds(data.outlier_mask, x_path)
            ref_filter = seconds(ReferencePCAM, x_path, y_path, filter_data=True, repeats=1)
            mask_ratio = f"{mask / read:.2f}x block read {read:.2f} s (target 1.5)"
            rows.append(("filter pass, pcam-mlp", label, mask, "s", mask_ratio))
            rows.append(("filter pass, reference", label, ref_filter, "s", f"{ref_filter / mask:.1f}x pcam-mlp"))
            scan = seconds(eda.scan_split, os.path.dirname(x_path), "train", 8, 5.0, 250.0)
            rows.append(("eda.py scan", label, scan, "s", f"{scan / read:.2f}x block read (target 1.5)"))
    return rows


def peak_rss_row(float32_dir):
    probe = subprocess.run(
        [sys.executable, __file__, "--rss-probe", float32_dir], capture_output=True, text=True, check=True
    )
    size = os.path.getsize(pcam_files.split_paths(float32_dir, "train")[0]) / 2**30
    peak = float(probe.stdout.split()[-1])
    return ("peak RSS, streaming filtered epoch", f"float32 {size:.2f} GiB", peak, "MiB", "target < 600")


def streaming_run_rss_row(float32_dir):
    """Peak RSS of a whole streaming train.py run on the float32 set (an epoch, validation, the test split, the
    figures), in a process of its own: it must not grow with the files (the course's float32 copy is 36 GB).
    The set's valid split stands in for its test split."""
    with tempfile.TemporaryDirectory() as work:
        data_dir = os.path.join(work, "data")
        os.makedirs(data_dir)
        for split, source in (("train", "train"), ("valid", "valid"), ("test", "valid")):
            for path, link in zip(
                pcam_files.split_paths(float32_dir, source), pcam_files.split_paths(data_dir, split), strict=True
            ):
                os.symlink(os.path.abspath(path), link)
        measured = (  # RUSAGE_CHILDREN of a process whose one child is train.py: that run's peak alone
            "import resource, subprocess, sys\nsubprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        command = [sys.executable, "-c", measured, sys.executable, "train.py", "--data-dir", data_dir, "--epochs", "1"]
        command += ["--out-dir", os.path.join(work, "run"), "--device", "cpu", "--data-on-device", "no"]
        command += ["--filter-data", "--num-workers", "0"]
        run = subprocess.run(command, cwd=HERE, capture_output=True, text=True, check=True)
    size = sum(os.path.getsize(pcam_files.split_paths(float32_dir, s)[0]) for s in ("train", "valid", "valid"))
    peak = int(run.stdout.split()[-1]) / 1024
    return "peak RSS, streaming train.py run", f"float32 {size / 2**30:.2f} GiB", peak, "MiB", "valid+test+plots; < 600"


def print_table(rows):
    print(
        f"\npcam-mlp bench, {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH_SIZE}, num_workers 0"
    )
    print(f"| {'measure':<42} | {'file':<28} | {'value':>10} | {'unit':<8} | {'ratio':<56} |")
    print(f"|{'-' * 44}|{'-' * 30}|{'-' * 12}:|{'-' * 10}|{'-' * 58}|")
    for what, label, value, unit, ratio in rows:
        print(f"| {what:<42} | {label:<28} | {value:>10,.{2 if unit == 's' else 0}f} | {unit:<8} | {ratio:<56} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark the PCAM data pipeline and training against plain PyTorch.")
    for flag, default, metavar, text in (
        ("--n-train", 32768, "N", "train images in each synthetic set"),
        ("--n-packed", 16384, "N", "train images in the chunked gzip set, twice the chunk cache"),
        ("--dir", "bench_data", "DIR", "where the sets are written"),
    ):
        parser.add_argument(
            flag, type=type(default), default=default, metavar=metavar, help=f"{text} (default: {default})"
        )
    parser.add_argument("--rss-probe", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--course-style", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        return peak_rss_probe(args.rss_probe)
    if args.course_style:
        return course_style_run(args.course_style)
    torch.manual_seed(0)
    folders = {"uint8": "uint8", "float32": "float32_poisoned", "packed": "uint8_gzip"}
    sets = {name: os.path.join(args.dir, folder) for name, folder in folders.items()}
    ensure_set(sets["uint8"], args.n_train, "uint8", 0.0)
    ensure_set(sets["float32"], args.n_train, "float32", 0.05)
    ensure_set(sets["packed"], args.n_packed, "uint8", 0.0, chunks=(32, 96, 96, 3), compression="gzip")
    training, plain_train = training_rows(sets["uint8"], args.n_train)  # before the float32 set is read
    rows = data_path_rows(sets, plain_train) + training
    rows.append(peak_rss_row(sets["float32"]))
    rows.append(streaming_run_rss_row(sets["float32"]))
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
