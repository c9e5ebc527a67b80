"""Every threshold and limit of the scripts at its boundary and one step on either side, the smallest step its
input allows; and plot_loss.py's runs table and figures against numbers worked out by hand on runs whose best
epoch by validation loss is neither their best epoch by accuracy nor their last."""

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

import common
import data
import eda
import evaluate
import manage_data
import pcam_files
import plot_loss
import run_folder
import train
from test_helpers import labels_of, loss_plot_lines, tissue, write_split

F32 = np.float32
DIVERGED = 10 * math.log(2)  # train.py's divergence limit: ten times a constant guess's loss


def down(value):
    return math.nextafter(value, -math.inf)


def up(value):
    return math.nextafter(value, math.inf)


def refusal(call):
    """The message of the UserError or SystemExit call() raises, or None when it returns."""
    try:
        call()
    except (common.UserError, SystemExit) as error:
        return str(error)
    return None


def assert_outcome(message, fragment):
    """fragment None: the call was accepted; else it was refused with a message holding fragment."""
    if fragment is None:
        assert message is None
    else:
        assert message is not None and fragment in message, message


def table(*rows):
    """pytest.param rows whose last item is the id."""
    return [pytest.param(*row[:-1], id=row[-1]) for row in rows]


def tile(fill, odd, dtype):
    """One tile of grey level fill, odd on its first pixel (one uint8 step of the mean: 1 / 27,648)."""
    image = np.full((1, 96, 96, 3), fill, dtype)
    if odd is not None:
        image[0, 0, 0, 0] = odd
    return image


LEVEL_TILES = [  # (fill, odd pixel, outlier, id): at or below mean 5 black, at or above 250 white
    (5, None, True, "black-at-5"),
    (5, 4, True, "black-one-step-below-5"),
    (5, 6, False, "black-one-step-above-5"),
    (250, None, True, "white-at-250"),
    (250, 249, False, "white-one-step-below-250"),
    (250, 251, True, "white-one-step-above-250"),
]
FLOAT_TILES = [  # the float path measures tiles near a threshold again, cleaned (each pixel truncated)
    (5.999, None, True, "float-5.999-cleans-to-5"),
    (6.0, None, False, "float-6.0"),
    (5.5, 6.5, False, "float-cleans-to-one-step-above-5"),
    (249.999, None, False, "float-249.999-cleans-to-249"),
    (250.5, None, True, "float-250.5-cleans-to-250"),
]
OUTLIER_CASES = [
    pytest.param(fill, odd, dtype, outlier, id=f"{name}-{np.dtype(dtype).name}")
    for fill, odd, outlier, name in LEVEL_TILES
    for dtype in (np.uint8, np.float16, F32)  # float16: its row sums overflow float16
] + [pytest.param(fill, odd, F32, outlier, id=name) for fill, odd, outlier, name in FLOAT_TILES]


def outliers_by(consumer, data_dir):
    """[outlier?] of each row of data_dir's train split, as consumer judges it, with its default thresholds."""
    x_path, y_path = pcam_files.split_paths(data_dir, "train")
    if consumer == "outlier_mask":
        return data.outlier_mask(x_path).tolist()
    if consumer == "filter_data":
        kept = data.PCAMDataset(x_path, y_path, filter_data=True).indices.tolist()
        return [row not in kept for row in range(2)]
    args = eda.parse_args(["--data-dir", str(data_dir)])
    flags = eda.scan_split(data_dir, "train", 1, args.black_threshold, args.white_threshold).flags
    return (flags["black"] | flags["white"]).tolist()


@pytest.mark.parametrize("consumer", ["outlier_mask", "filter_data", "eda"])
@pytest.mark.parametrize("fill, odd, dtype, outlier", OUTLIER_CASES)
def test_outlier_thresholds_hold_their_boundary_and_let_one_grey_level_beyond_pass(
    tmp_path, consumer, fill, odd, dtype, outlier
):
    write_split(tmp_path, "train", np.concatenate([tile(fill, odd, dtype), tissue(1, dtype=dtype)]), labels_of(2, 1))
    assert outliers_by(consumer, tmp_path) == [outlier, False]


EDA_FLAGS = table(  # (flags, refusal)
    (["--black-threshold=-5e-324"], "--black-threshold", "black-one-step-below-0"),
    (["--black-threshold", "0"], None, "black-at-0"),
    (["--black-threshold", "5e-324"], None, "black-one-step-above-0"),
    (["--white-threshold", "254.99999999999997"], None, "white-one-step-below-255"),
    (["--white-threshold", "255"], None, "white-at-255"),
    (["--white-threshold", "255.00000000000003"], "--white-threshold", "white-one-step-above-255"),
    (["--black-threshold", "249.99999999999997"], None, "black-one-step-below-default-white-250"),
    (["--black-threshold", "250"], "below --white-threshold", "black-at-default-white-250"),
    (["--black-threshold", "250", "--white-threshold", "250.00000000000003"], None, "white-one-step-above-black"),
    (["--sample-grid", "0"], "give 1 to 64", "grid-0"),
    (["--sample-grid", "1"], None, "grid-1"),
    (["--sample-grid", "64"], None, "grid-64"),
    (["--sample-grid", "65"], "give 1 to 64", "grid-65"),
)


@pytest.mark.parametrize("flags, fragment", EDA_FLAGS)
def test_eda_thresholds_and_grid_are_taken_up_to_their_limits(flags, fragment):
    assert_outcome(refusal(lambda: eda.parse_args(flags)), fragment)


@pytest.mark.parametrize(
    "rows, sampled",
    [
        pytest.param(255, 255, id="255-rows-all"),
        pytest.param(256, 256, id="256-rows-all"),
        pytest.param(257, 256, id="257-rows-256"),
        pytest.param(512, 256, id="512-rows-every-second"),
    ],
)
def test_eda_histograms_take_at_most_256_images_a_class(rows, sampled):
    for label in (0, 1):
        assert eda.SplitScan("train", np.full(rows, label), 1, 5.0, 250.0).histogram_rows.sum() == sampled, label


def graded(n):
    """n uint8 tiles, tile i all of grey level i: no two alike."""
    return np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 96, 96, 3), np.uint8)


@pytest.mark.parametrize(  # evenly spaced rows int(k * 64 / 63), k < 64, skip row 63 of 65
    "n, hashed", table((63, list(range(63)), "63-all"), (64, list(range(64)), "64-all"), (65, [*range(63), 64], "65"))
)
def test_a_splits_identity_hashes_at_most_64_images(tmp_path, n, hashed):
    images = graded(n)
    write_split(tmp_path, "train", images, labels_of(n, 1))
    identity = data.split_identity(tmp_path, "train")
    assert identity["rows"] == n
    assert identity["images_sha256"] == hashlib.sha256(images[hashed].tobytes()).hexdigest()


class PositionsRead:
    """A split of n images for data.channel_stats that records which positions it reads."""

    def __init__(self, n):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, positions):
        self.read += positions.tolist()
        images = torch.zeros((len(positions), 3, 1, 1), dtype=torch.uint8)
        images[0] = 1  # not blank
        return images, None


@pytest.mark.parametrize("n, skipped", table((2047, [], "2047-all"), (2048, [], "2048-all"), (2049, [2047], "2049")))
def test_normalisation_is_measured_on_at_most_2048_images(n, skipped):
    split = PositionsRead(n)
    data.channel_stats(split)
    assert split.read == [row for row in range(n) if row not in skipped]


@pytest.mark.parametrize(  # rows int(k * 32 / 31), k < 32, skip row 31 of 33
    "n, fragment", table((31, None, "31-all"), (32, None, "32-all"), (33, "all within 0..1", "33-row-31-unseen"))
)
def test_the_pixel_scale_is_judged_on_at_most_32_rows(tmp_path, n, fragment):
    images = tissue(n, dtype=F32) / 255
    images[n - 2, 0, 0, 0] = 2.0  # one pixel off the 0..1 scale, in a row sampled unless n is 33
    x_path, _ = write_split(tmp_path, "train", images, labels_of(n, 1))
    assert_outcome(refusal(lambda: pcam_files.check_pixel_scale(x_path)), fragment)


ZERO_TO_ONE, NOT_0_255 = "all within 0..1", "expected the 0..255 scale"
PIXEL_SCALES = table(  # (dtype, fill, odd pixel, refusal)
    (F32, 0.5, 1.0, ZERO_TO_ONE, "float-max-at-1"),
    (F32, 0.5, np.nextafter(F32(1), F32(0)), ZERO_TO_ONE, "float-max-one-step-below-1"),
    (F32, 0.5, np.nextafter(F32(1), F32(2)), None, "float-max-one-step-above-1"),
    (F32, 0.5, 0.0, ZERO_TO_ONE, "float-min-at-0"),
    (F32, 0.5, np.nextafter(F32(0), F32(1)), ZERO_TO_ONE, "float-min-one-step-above-0"),
    (F32, 0.5, np.nextafter(F32(0), F32(-1)), None, "float-min-one-step-below-0"),
    (F32, np.nextafter(F32(255), F32(0)), None, None, "float-median-one-step-below-255"),
    (F32, 255.0, None, None, "float-median-at-255"),
    (F32, np.nextafter(F32(255), F32(256)), None, NOT_0_255, "float-median-one-step-above-255"),
    (np.uint16, 254, None, None, "uint16-median-254"),
    (np.uint16, 255, None, None, "uint16-median-255"),
    (np.uint16, 256, None, NOT_0_255, "uint16-median-256"),
    (np.int16, -1, None, NOT_0_255, "int16-median--1"),
    (np.int16, 0, None, None, "int16-median-0"),
    (np.int16, 1, None, None, "int16-median-1"),
)


@pytest.mark.parametrize("dtype, fill, odd, fragment", PIXEL_SCALES)
def test_the_pixel_scale_limits_hold_one_step_either_side(tmp_path, dtype, fill, odd, fragment):
    x_path, _ = write_split(tmp_path, "train", tile(fill, odd, dtype), labels_of(1, 1))
    assert_outcome(refusal(lambda: pcam_files.check_pixel_scale(x_path)), fragment)


DATA_PATHS = table(  # (memory that counts, free bytes, path): 7 images take 193,536 bytes = 70% of 276,480
    ("device", 276479, "files", "device-one-byte-short"),
    ("device", 276480, "device", "device-at-70-percent"),
    ("device", 276481, "device", "device-one-byte-over"),
    ("host", 276479, "files", "host-one-byte-short"),
    ("host", 276480, "host", "host-at-70-percent"),
    ("host", 276481, "host", "host-one-byte-over"),
)


@pytest.mark.parametrize("memory, free, path", DATA_PATHS)
def test_the_splits_go_resident_up_to_70_percent_of_free_memory(tmp_path, monkeypatch, memory, free, path):
    write_split(tmp_path, "train", tissue(5), labels_of(5, 2))
    write_split(tmp_path, "valid", tissue(2), labels_of(2, 1))
    monkeypatch.setattr(data, "free_memory", lambda: (free, "MemAvailable"))
    if memory == "host":  # a GPU without room: host memory is the next place
        monkeypatch.setattr(data, "device_room", lambda device: (0, "cuda:0 memory"))
    assert data.choose_data_path(tmp_path, "auto", False, torch.device("cpu"))[0] == path


@pytest.mark.parametrize(  # 5 images take 138,240 bytes = 80% of 172,800
    "free, fragment", table((172799, "needs", "one-byte-short"), (172800, None, "at-80%"), (172801, None, "byte-over"))
)
def test_a_split_held_in_ram_may_take_80_percent_of_free_memory(tmp_path, monkeypatch, free, fragment):
    paths = write_split(tmp_path, "train", tissue(5), labels_of(5, 2))
    monkeypatch.setattr(data, "free_memory", lambda: (free, "MemAvailable"))
    assert_outcome(refusal(lambda: data.PCAMDataset(*paths, preload=True)), fragment)


BIG = 2**40
SYNTH_ROOMS = table(  # (dtype, free disk, free memory, refusal): 2 + 1 images, 3 * (27,648 * itemsize + 1) bytes
    ("uint8", 82946, BIG, "is free on", "uint8-disk-one-byte-short"),
    ("uint8", 82947, BIG, None, "uint8-disk-exact"),
    ("uint8", 82948, BIG, None, "uint8-disk-one-byte-over"),
    ("float32", 331778, BIG, "is free on", "float32-disk-one-byte-short"),
    ("float32", 331779, BIG, None, "float32-disk-exact"),
    ("uint8", BIG, 17, "is free under MemAvailable", "memory-one-byte-short"),  # 9 bytes an image of 2
    ("uint8", BIG, 18, None, "memory-exact"),
    ("uint8", BIG, 19, None, "memory-one-byte-over"),
)


@pytest.mark.parametrize("dtype, disk, memory, fragment", SYNTH_ROOMS)
def test_synth_refuses_a_set_one_byte_larger_than_its_room(tmp_path, monkeypatch, dtype, disk, memory, fragment):
    monkeypatch.setattr(manage_data.shutil, "disk_usage", lambda path: argparse.Namespace(free=disk))
    monkeypatch.setattr(data, "free_memory", lambda: (memory, "MemAvailable"))
    args = argparse.Namespace(n_train=2, n_valid=1, n_test=0, dtype=dtype, data_dir=str(tmp_path / "set"))
    assert_outcome(refusal(lambda: manage_data.check_synth_room(args)), fragment)


def limits(spec):
    """pytest.params (setting, value, accepted) of {setting: (values refused, values taken)}."""
    return [
        pytest.param(name, value, taken, id=f"{name}={value!r}")
        for name, (refused, accepted) in spec.items()
        for taken, values in ((False, refused), (True, accepted))
        for value in values
    ]


SYNTH_LIMITS = {"n_train": ([0], [1]), "n_valid": ([0], [1]), "n_test": ([-1], [0]), "seed": ([-1], [0])}
SYNTH_LIMITS["poison"] = ([-5e-324, up(1.0)], [0.0, 1.0])  # a fraction: 0 to 1, each included


@pytest.mark.parametrize("name, value, accepted", limits(SYNTH_LIMITS))
def test_synth_arguments_are_taken_up_to_their_limits(name, value, accepted):
    args = argparse.Namespace(**{"n_train": 1, "n_valid": 1, "n_test": 0, "seed": 0, "poison": 0.0, name: value})
    flag = None if accepted else f"--{name.replace('_', '-')} "
    assert_outcome(refusal(lambda: manage_data.check_synth_arguments(args)), flag)


F32_MAX = float(np.finfo(F32).max)  # the optimisers compute in float32: torch refuses a larger lr or weight decay
ADAM_MAX_LR = F32_MAX * (1 - 0.9)  # Adam's first step, lr / (1 - beta1), at float32's largest
TRAIN_LIMITS = {  # one step either side of each limit of train.py's ARGUMENT_RULES
    "epochs": ([0], [1]),
    "log_every": ([0], [1]),
    "batch_size": ([0, 2**31 + 1], [1, 2**31]),
    "lr": ([0.0, up(ADAM_MAX_LR), math.inf], [5e-324, down(ADAM_MAX_LR), ADAM_MAX_LR]),
    "weight_decay": ([-5e-324, up(F32_MAX), math.inf], [0.0, down(F32_MAX), F32_MAX]),
    "seed": ([-1, 2**32], [0, 2**32 - 1]),
    "num_workers": ([-1], [0]),
    "dropout": ([-5e-324, 1.0], [0.0, down(1.0)]),
    "momentum": ([-5e-324, 1.0], [0.0, down(1.0)]),
    "hidden_units": ([[64, 0]], [[64, 1]]),
}


@pytest.mark.parametrize("name, value, accepted", limits(TRAIN_LIMITS))
def test_train_arguments_are_taken_up_to_their_limits(name, value, accepted):
    args = train.parse_args([])
    setattr(args, name, value)
    assert_outcome(refusal(lambda: train.check_args(args)), None if accepted else f"--{name.replace('_', '-')} must")


@pytest.mark.parametrize(
    "optimizer, name, limit, overflows_past_it",
    table(
        ("adam", "lr", ADAM_MAX_LR, True, "adam-lr"),
        ("sgd", "lr", ADAM_MAX_LR, False, "sgd-lr"),  # SGD's own limit is F32_MAX: one limit serves both
        ("adam", "weight_decay", F32_MAX, True, "adam-weight-decay"),
        ("sgd", "weight_decay", F32_MAX, True, "sgd-weight-decay"),
    ),
)
def test_the_optimisers_step_at_the_lr_and_weight_decay_limits_and_overflow_past_them(
    optimizer, name, limit, overflows_past_it
):
    images, labels = torch.zeros(2, 96, 96, 3, dtype=torch.uint8), torch.tensor([0, 1])
    for value, overflows in ((limit, False), (up(limit), overflows_past_it)):
        args = train.parse_args(["--optimizer", optimizer, f"--{name.replace('_', '-')}", repr(value)])
        model, optimizer_of_run = train.build_model(args, torch.device("cpu"))
        with pytest.raises(RuntimeError, match="overflow") if overflows else contextlib.nullcontext():
            for _ in range(2):  # Adam's second step is smaller: lr / (1 - 0.9**2)
                train.train_step(model, optimizer_of_run, images, labels, bf16=False)


@pytest.mark.parametrize(
    "batch_size, workers, refused",
    table((0, 0, True, "batch-0"), (1, 0, False, "batch-1"), (2**31, 0, False, "batch-2**31"))
    + table((2**31 + 1, 0, True, "batch-2**31+1"), (1, -1, True, "workers--1")),
)
def test_evaluate_batch_size_and_workers_are_taken_up_to_their_limits(tmp_path, batch_size, workers, refused):
    flags = ["--batch-size", str(batch_size), "--num-workers", str(workers), "--device", "cpu"]
    args = evaluate.parse_args(["best.pt", "--data-dir", str(tmp_path / "nowhere"), *flags])
    message = refusal(lambda: evaluate.run(args))  # accepted: the missing data folder is what stops it
    assert ("--batch-size must be in 1 .. 2**31" in message) is refused and ("does not exist" in message) is not refused


def test_a_score_of_exactly_0_5_predicts_class_1_in_metrics_and_predictions(tmp_path, monkeypatch):
    below, above = np.nextafter(F32(0.5), F32(0)), np.nextafter(F32(0.5), F32(1))
    scores, labels = np.array([below, 0.5, above], F32), np.array([1, 1, 0])
    monkeypatch.setattr(evaluate, "predict", lambda model, batches, device: (0.5, scores, labels))
    metrics = evaluate.evaluate_split(None, None, np.arange(3), None, str(tmp_path), {"split": "test"})
    assert metrics["confusion"] == [[0, 1], [1, 1]]  # [[tn, fp], [fn, tp]]: below is fn, at is tp, above is fp
    with open(tmp_path / "predictions.csv") as predictions:
        assert [row["pred"] for row in csv.DictReader(predictions)] == ["0", "1", "1"]


@pytest.mark.parametrize(
    "loss, diverged", table((down(DIVERGED), 0, "below"), (DIVERGED, 0, "at"), (up(DIVERGED), 1, "above"))
)
def test_a_run_diverges_only_above_ten_times_ln_2(loss, diverged):
    with pytest.raises(FloatingPointError, match="diverged") if diverged else contextlib.nullcontext():
        train.check_diverged(torch.nn.Linear(1, 1), loss, 3)


@pytest.mark.parametrize(
    "minority, total, warned",
    table(
        (9, 100, True, "9-of-100"),
        (10, 100, False, "10-of-100"),
        (11, 100, False, "11-of-100"),  # 10 images
        (199, 20000, True, "199-of-20000"),
        (200, 20000, False, "200-of-20000"),
        (201, 20000, False, "201-of-20000"),  # 1%: of 20,000 images, 1% is told from 0.99% and 1.01%
    ),
)
def test_a_minority_class_under_10_images_or_1_percent_is_warned_about(capsys, minority, total, warned):
    class Kept:
        def __init__(self, ones, n):
            self.labels = (np.arange(n) < ones).astype(np.int64)

        def __len__(self):
            return len(self.labels)

    data.describe_splits(Kept(minority, total), Kept(1, 2))
    assert ("minority class is tiny" in capsys.readouterr().err) is warned


@pytest.mark.parametrize(
    "seconds, done, printed",
    table(
        (down(10.0), 50, False, "one-step-before-10s"),
        (10.0, 50, True, "at-10s"),
        (up(10.0), 50, True, "after-10s"),
        (1.0, 99, False, "one-byte-short-of-done"),
        (1.0, 100, True, "done"),
    ),
)
def test_progress_lines_come_every_10_seconds_and_when_done(capsys, seconds, done, printed):
    now = [0.0]
    progress = pcam_files.Progress("scan", 100, clock=lambda: now[0])
    now[0] = seconds
    progress.update(done)
    assert bool(capsys.readouterr().out) is printed


@pytest.mark.parametrize(
    "read, over, released",  # bytes read and the file's size, past the limit; over None: a tiny file, the 1 GiB limit
    table(
        (-1, 1, False, "byte-under-the-limit-read"),
        (0, 1, False, "the-limit-read"),
        (1, 1, True, "byte-over-the-limit-read"),
        (1, 0, False, "file-of-the-limits-size"),
        (1, -1, False, "file-a-byte-smaller"),
        (1, None, False, "file-under-1GiB"),
    ),
)
def test_a_memory_map_lets_its_pages_go_once_more_than_its_limit_was_read_from_a_larger_file(
    monkeypatch, tmp_path, read, over, released
):
    x_path, _ = write_split(tmp_path, "train", tissue(2), labels_of(2, 1))
    if over is not None:
        monkeypatch.setattr(pcam_files, "MAPPED_BYTES_BEFORE_RELEASE", os.path.getsize(x_path) - over)
    limit, reader = pcam_files.MAPPED_BYTES_BEFORE_RELEASE, pcam_files.open_rows(x_path)
    reader.bytes_since_release = limit + read - pcam_files.IMAGE_BYTES  # one image read next
    reader.read(np.array([1]))
    assert reader.bytes_since_release == (0 if released else limit + read)


@pytest.mark.parametrize(
    "limit, used, room",
    table(
        (str(2**60 - 1), 2**60 - 6, 5, "limit-one-below-2**60"),
        (str(2**60), 0, None, "limit-2**60-unlimited"),
        ("max", 0, None, "max"),
        ("100", 99, 1, "one-byte-left"),
        ("100", 100, 0, "full"),
        ("100", 101, 0, "one-byte-over"),
    ),
)
def test_a_cgroups_room_is_its_limit_less_its_usage(tmp_path, limit, used, room):
    (tmp_path / "memory.max").write_text(f"{limit}\n")
    (tmp_path / "memory.current").write_text(f"{used}\n")
    assert data.cgroup_folder_room(str(tmp_path), "memory.max", "memory.current") == room


@pytest.mark.parametrize(
    "build, driver, driver_cuda, runs",
    table(
        ("11.8", "449.99", "11.4", False, "11-driver-449"),
        ("11.8", "450.80", "11.4", True, "11-driver-450"),
        ("12.4", "524.99", "12.2", False, "12-driver-524"),
        ("12.4", "525.60", "12.2", True, "12-driver-525"),
        ("12.4", "526.01", "12.2", True, "12-driver-526"),
        ("12.4", "999.0", "11.8", False, "older-major"),
        ("12.4", "580.0", "13.0", True, "newer-major"),
        ("13.0", "579.99", "13.0", False, "13-driver-579"),
        ("13.0", "580.65", "13.0", True, "13-driver-580"),
    ),
)
def test_a_driver_runs_a_torch_build_from_its_familys_first_version(build, driver, driver_cuda, runs):
    assert common.driver_runs(build, driver, driver_cuda) is runs


@pytest.mark.parametrize(
    "asked, complete", table((2, True, "2-after-3"), (3, True, "3-after-3"), (4, False, "4-after-3"))
)
def test_a_run_of_3_epochs_is_complete_and_resumable_up_to_3_epochs_asked(tmp_path, asked, complete):
    (tmp_path / "run.json").write_text(json.dumps({"status": "done", "args": {"epochs": 3}}))
    args = argparse.Namespace(given=["epochs"], epochs=asked, dry_run=False)
    assert run_folder.run_is_complete(str(tmp_path), args, draw_loss=lambda out_dir: None) is complete
    saved = {**dict.fromkeys(run_folder.RESUMED_SETTINGS, 0), "epochs": 5, "data_dir": str(tmp_path)}
    args = argparse.Namespace(given=["data_dir", "epochs"], epochs=asked, data_dir=str(tmp_path), dry_run=False)
    resumed = refusal(lambda: run_folder.resumed_settings(args, {"args": saved, "epoch": 3}))
    assert_outcome(resumed, None if asked >= 3 else "below the 3 epochs")  # a run is never rewound


METRICS_HEADER = "epoch,train_loss,train_acc,val_loss,val_acc,val_auc,lr,epoch_s,images_per_s"
RUNS = {  # folder: (seed, lr, status, test scores)
    "lr1e-3-s1": (1, 1e-3, "done", None),  # no test split scored
    "lr1e-3-s2": (2, 1e-3, "stopped", {"accuracy": 0.70, "auc": 0.75}),
    "lr1e-4-s1": (1, 1e-4, "done", {"accuracy": 0.77, "auc": 0.83}),
    "lr1e-4-s2": (2, 1e-4, "done", {"accuracy": 0.71, "auc": 0.81}),
}
EPOCHS = {  # folder: (epoch, train_loss, val_loss, val_acc, val_auc, epoch_s, images_per_s) each epoch; the lowest
    # val_loss is neither the highest val_acc nor the highest val_auc nor the last epoch
    "lr1e-3-s1": [
        (1, 0.65, 0.55, 0.70, 0.72, 5, 500),
        (2, 0.50, 0.35, 0.72, 0.74, 5, 500),  # lowest val_loss, first of a tie: best.pt keeps it (train.py's <)
        (3, 0.45, 0.42, 0.90, 0.91, 5, 500),
        (4, 0.40, 0.35, 0.76, 0.78, 5, 500),  # the same val_loss, later
    ],
    "lr1e-3-s2": [
        (1, 0.66, 0.44, 0.81, 0.83, 6, 400),  # highest val_acc and val_auc
        (2, 0.52, 0.39, 0.79, 0.82, 6, 600),  # lowest val_loss
        (3, 0.47, 0.43, 0.78, 0.80, 6, 800),
    ],
    "lr1e-4-s1": [
        (1, 0.60, 0.50, 0.70, 0.75, 10, 100),
        (2, 0.50, 0.40, 0.75, 0.80, 20, 300),  # lowest val_loss
        (3, 0.40, 0.45, 0.85, 0.90, 30, 200),  # highest val_acc and val_auc
        (4, 0.30, 0.48, 0.80, 0.85, 40, 400),  # last, lowest train_loss
    ],
    "lr1e-4-s2": [
        (1, 0.70, 0.60, 0.66, 0.70, 12, 150),
        (2, 0.55, 0.52, 0.86, 0.88, 14, 250),  # highest val_acc and val_auc
        (3, 0.45, 0.38, 0.74, 0.79, 16, 350),  # lowest val_loss
        (4, 0.35, 0.41, 0.80, 0.84, 18, 450),
    ],
}
R2 = math.sqrt(2)  # the std (n - 1) of two values a, b is |a - b| / sqrt(2)
TABLE_HEADER = "run lr seed epochs_done best_epoch best_val_loss val_acc val_auc test_acc test_auc images_per_s wall_s"
EXPECTED_ROWS = [  # images_per_s: the mean over epochs; wall_s: the sum of epoch_s; the rest at the lowest val_loss
    ["lr1e-3-s1", "0.001", "1", 4, 2, 0.35, 0.72, 0.74, None, None, 500, 20, "done"],
    ["lr1e-3-s2", "0.001", "2", 3, 2, 0.39, 0.79, 0.82, 0.70, 0.75, 600, 18, "stopped"],
    ["lr1e-4-s1", "0.0001", "1", 4, 2, 0.40, 0.75, 0.80, 0.77, 0.83, 250, 100, "done"],
    ["lr1e-4-s2", "0.0001", "2", 4, 3, 0.38, 0.74, 0.79, 0.71, 0.81, 300, 60, "done"],
    ["mean of 2 seeds", "0.001", "", None, None, 0.37, 0.755, 0.78, 0.70, 0.75, 550, 19, ""],  # one test score
    ["std of 2 seeds", "0.001", "", None, None, 0.04 / R2, 0.07 / R2, 0.08 / R2, None, None, 100 / R2, 2 / R2, ""],
    ["mean of 2 seeds", "0.0001", "", None, None, 0.39, 0.745, 0.795, 0.74, 0.82, 275, 80, ""],
    ["std of 2 seeds", "0.0001", "", None, None, *(d / R2 for d in (0.02, 0.01, 0.01, 0.06, 0.02, 50, 40)), ""],
]
LEGEND_NAMES = ["lr=0.001 seed=1", "lr=0.001 seed=2", "lr=0.0001 seed=1", "lr=0.0001 seed=2"]


def write_runs(root):
    """RUNS as train.py leaves them (run.json, metrics.csv) under root; their folders in natural order, as RUNS."""
    for name, (seed, lr, status, test) in RUNS.items():
        (root / name).mkdir(parents=True)
        record = {"args": {"lr": lr, "seed": seed, "epochs": 4, "out_dir": str(root / name)}}
        (root / name / "run.json").write_text(json.dumps({**record, "status": status, "test": test}))
        lines = [f"{e},{t},0.5,{v},{a},{u},{lr},{s},{i}" for e, t, v, a, u, s, i in EPOCHS[name]]
        (root / name / "metrics.csv").write_text("\n".join([METRICS_HEADER, *lines]) + "\n")
    return [str(root / name) for name in RUNS]


def test_the_runs_table_reports_the_lowest_validation_loss_epoch_and_the_spread_over_seeds(tmp_path, capsys):
    write_runs(tmp_path / "runs")
    plot_loss.main(["--table", f"{tmp_path / 'runs'}/*/"])  # make runs RUNS=.../runs/*/
    with open(tmp_path / "runs" / "runs_summary.csv", newline="") as summary:
        header, *rows = list(csv.reader(summary))
    assert header == [*TABLE_HEADER.split(), "status"]
    for row, expected in zip(rows, EXPECTED_ROWS, strict=True):
        for column, cell, value in zip(header, row, expected, strict=True):
            if value is None or isinstance(value, str):
                assert cell == (value or ""), (row[0], column)
            else:
                assert float(cell) == pytest.approx(value, abs=1e-9), (row[0], column)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == header
    assert printed[3].split() == "lr1e-4-s1 0.0001 1 4 2 0.4000 0.7500 0.8000 0.7700 0.8300 250 100.0 done".split()
    assert (tmp_path / "runs" / "runs.png").is_file()


def test_overlaid_runs_draw_each_runs_own_metrics_in_a_colour_of_its_own(tmp_path):
    paths = write_runs(tmp_path / "runs")
    loss_axes, accuracy_axes = plot_loss.plot_runs(paths, str(tmp_path / "runs.png")).axes[:2]
    lines = {line.get_label(): line for line in [*loss_axes.get_lines(), *accuracy_axes.get_lines()]}
    assert len(lines) == 3 * len(RUNS)
    colours = []
    for rows, name in zip(EPOCHS.values(), LEGEND_NAMES, strict=True):
        epoch, train_loss, val_loss, val_acc = ([float(row[column]) for row in rows] for column in range(4))
        drawn = [lines[f"{name} train"], lines[f"{name} validation"], lines[name]]
        for line, metric in zip(drawn, (train_loss, val_loss, val_acc), strict=True):
            assert (list(line.get_xdata()), list(line.get_ydata())) == (epoch, metric), line.get_label()
        assert [line.get_linestyle() for line in drawn] == ["--", "-", "-"]
        assert len({to_hex(line.get_color()) for line in drawn}) == 1
        colours.append(to_hex(drawn[0].get_color()))
    assert len(set(colours)) == len(RUNS)
    legend = [text.get_text() for text in loss_axes.get_legend().get_texts()]
    assert legend == [f"{name} {curve}" for name in LEGEND_NAMES for curve in ("train", "validation")]
    assert [text.get_text() for text in accuracy_axes.get_legend().get_texts()] == LEGEND_NAMES


def test_a_single_runs_plot_draws_its_metrics_named_by_its_folder(tmp_path):
    path = write_runs(tmp_path / "runs")[2]  # lr1e-4-s1: (epoch, train_loss, val_loss, val_acc) as in EPOCHS
    loss_lines, accuracy_lines = loss_plot_lines([path], tmp_path / "runs" / "lr1e-4-s1" / "loss.png")
    epoch = [1.0, 2.0, 3.0, 4.0]
    assert loss_lines == {"train": (epoch, [0.6, 0.5, 0.4, 0.3]), "validation": (epoch, [0.5, 0.4, 0.45, 0.48])}
    assert accuracy_lines == {"lr1e-4-s1": (epoch, [0.7, 0.75, 0.85, 0.8])}


@pytest.mark.parametrize("name", ["overlay.txt", "foreign.png"])
def test_the_runs_table_refuses_an_overlay_path_it_may_not_write_before_writing_anything(tmp_path, name):
    write_runs(tmp_path / "runs")
    (tmp_path / "foreign.png").write_bytes(b"a user's own figure")
    message = refusal(lambda: plot_loss.main(["--table", f"{tmp_path / 'runs'}/*/", "--out", str(tmp_path / name)]))
    assert_outcome(message, name)
    assert not (tmp_path / "runs_summary.csv").exists()
    assert (tmp_path / "foreign.png").read_bytes() == b"a user's own figure"
