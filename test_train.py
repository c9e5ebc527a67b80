"""train.py: a run learns, repeats itself from a seed and leaves a complete record; and every bad setting or
state it refuses, in one line."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import evaluate
import manage_data
import pcam_files
import plot_loss
import run_folder
import train
from model import MLP
from test_helpers import (
    HERE,
    evaluate_model,
    is_nonblank_png,
    labels_of,
    linked_set,
    loss_columns,
    one_line_error,
    read_csv_rows,
    run_main,
    tissue,
    train_args,
    write_split,
)

# 64 images, no dropout, a high learning rate: it overfits within a few epochs, and the validation loss rises
OVERFIT_FLAGS = ["--batch-size", "16", "--lr", "0.003", "--dropout", "0"]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """A run whose validation loss falls, then rises: (run folder, validation losses, best epoch, stdout)."""
    base = tmp_path_factory.mktemp("overfit")
    manage_data.main(
        ["synth", "--data-dir", str(base / "tiny"), "--n-train", "64", "--n-valid", "128", "--n-test", "64"]
    )
    result = run_main("train.py", *train_args(base / "tiny", base / "run", *OVERFIT_FLAGS, "--epochs", "5"), check=True)
    val_losses = [float(row["val_loss"]) for row in read_csv_rows(base / "run" / "metrics.csv")]
    lowest_epoch = 1 + val_losses.index(min(val_losses))
    assert 1 < lowest_epoch < len(val_losses), f"the validation loss must fall, then rise: {val_losses}"
    return base / "run", val_losses, lowest_epoch, result.stdout


class TestTraining:
    """train.py: a run learns, repeats itself from a seed and leaves a complete record."""

    def test_a_run_learns_and_leaves_a_complete_record(self, straight_run, capsys):
        rows = read_csv_rows(straight_run / "metrics.csv")
        assert list(rows[0]) == [
            "epoch",
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "val_auc",
            "lr",
            "epoch_s",
            "images_per_s",
        ]
        assert [row["epoch"] for row in rows] == ["1", "2", "3"]
        assert float(rows[-1]["val_loss"]) < 0.6 < float(rows[0]["train_loss"]) + 0.1
        record = json.loads((straight_run / "run.json").read_text())
        assert record["status"] == "done" and record["test"]["auc"] > 0.7
        assert record["environment"]["torch"] == torch.__version__ and record["args"]["epochs"] == 3
        assert "camelyonpatch_level_2_split_train_x.h5" in record["data"]["files"]
        for name in ("best.pt", "last.pt"):
            checkpoint = torch.load(straight_run / name, weights_only=True)
            assert {"model", "optimizer", "epoch", "rng", "history"} <= set(checkpoint)
            assert checkpoint["model"]["channel_std"].min() > 1  # the training split's own statistics
        assert is_nonblank_png(straight_run / "loss.png")

    def test_a_finished_run_reports_its_rate_and_draws_its_loss_plot(self, tmp_path, capsys):
        manage_data.main(["synth", "--data-dir", str(tmp_path / "tiny"), "--n-train", "128", "--n-valid", "32"])
        train.main(train_args(tmp_path / "tiny", tmp_path / "run", "--epochs", "1", "--log-every", "1"))
        last_step = [line for line in capsys.readouterr().out.splitlines() if " step 2/2 " in line][-1]
        progress_rate = float(re.search(r"([\d,.]+) images/s", last_step)[1].replace(",", ""))
        epoch_rate = float(read_csv_rows(tmp_path / "run" / "metrics.csv")[0]["images_per_s"])
        assert 0.5 < progress_rate / epoch_rate < 2, (last_step, epoch_rate)  # both: images over the same seconds
        assert is_nonblank_png(tmp_path / "run" / "loss.png")

    def test_an_epochs_seconds_are_within_the_runs_own(self, tmp_path):
        manage_data.main(["synth", "--data-dir", str(tmp_path / "tiny"), "--n-train", "64", "--n-valid", "32"])
        started = time.perf_counter()
        train.main(train_args(tmp_path / "tiny", tmp_path / "run", "--epochs", "2"))
        seconds = [float(row["epoch_s"]) for row in read_csv_rows(tmp_path / "run" / "metrics.csv")]
        assert 0 < sum(seconds) < time.perf_counter() - started, seconds

    def test_train_main_gives_the_callers_signal_handlers_back(self, synth_dir, tmp_path):
        before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        train.main(train_args(synth_dir, tmp_path / "run", "--dry-run"))
        assert {signum: signal.getsignal(signum) for signum in before} == before  # Ctrl-C works again in a notebook

    def test_a_run_logs_a_progress_line_every_50_steps_by_default(self, tmp_path, capsys):
        options = ["--n-train", "1600", "--n-valid", "32", "--n-test", "0"]
        manage_data.main(["synth", "--data-dir", str(tmp_path / "set"), *options])
        out = ["--data-dir", str(tmp_path / "set"), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
        train.main([*out, "--epochs", "1", "--batch-size", "16"])  # 100 steps
        steps = re.findall(r"step (\d+)/100 ", capsys.readouterr().out)
        assert steps == ["50", "100"], steps

    def test_the_normalisation_is_the_mean_and_std_of_every_image_of_a_small_split(self, tmp_path):
        images = tissue(600)  # under NORMALIZATION_SAMPLE, and more than one 512-image read
        images[0], images[599] = 255, 0
        dataset = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(600, 300)))
        mean, std = data.channel_stats(dataset)
        pixels = images.reshape(-1, 3).astype(np.float64)
        assert np.allclose(mean.numpy(), pixels.mean(axis=0), rtol=1e-6)
        assert np.allclose(std.numpy(), pixels.std(axis=0), rtol=1e-5)

    @pytest.mark.parametrize("odd", [None, 1], ids=["blue-all-0", "one-blue-pixel-at-1"])
    def test_a_channel_of_one_value_is_a_blank_split_one_level_off_is_not(self, tmp_path, odd):
        images = tissue(8)
        images[..., 2] = 0
        if odd is not None:
            images[7, 95, 95, 2] = odd
        dataset = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(8, 4)))
        if odd is None:
            with pytest.raises(common.UserError, match=r"the training split is blank: .* from \[\d+, \d+, 0\] to"):
                data.channel_stats(dataset)
        else:
            assert data.channel_stats(dataset)[1][2] > 0

    def test_a_blank_training_split_is_one_line_before_any_run_folder(self, tmp_path):
        write_split(tmp_path / "set", "train", np.zeros((32, 96, 96, 3), np.uint8), labels_of(32, 16))
        write_split(tmp_path / "set", "valid", tissue(4), labels_of(4, 2))
        one_line_error(run_main("train.py", *train_args(tmp_path / "set", tmp_path / "run")), "training split is blank")
        assert not os.path.exists(tmp_path / "run")

    def test_the_same_seed_gives_the_same_metrics(self, synth_dir, straight_run, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "again", "--epochs", "3"))
        assert loss_columns(tmp_path / "again") == loss_columns(straight_run)
        train.main(train_args(synth_dir, tmp_path / "other", "--epochs", "1", "--seed", "1"))
        assert loss_columns(tmp_path / "other")[0] != loss_columns(straight_run)[0]

    def test_evaluation_is_repeatable_and_runs_without_dropout(self, small_set):
        torch.manual_seed(0)
        model = MLP(hidden_units=(32,), dropout_rate=0.5)
        model.set_normalization([128.0] * 3, [40.0] * 3)
        _, val_loader = data.get_dataloaders(small_set, batch_size=16)
        model.train()  # as the training loop leaves it
        first = evaluate_model(model, val_loader)
        model.train()
        second = evaluate_model(model, val_loader)
        assert first == second
        model.eval()
        with torch.no_grad():
            loss_sum = sum(
                F.cross_entropy(model(images), labels, reduction="sum").item() for images, labels in val_loader
            )
        assert first[0] == pytest.approx(loss_sum / len(val_loader.dataset), rel=1e-5)

    def test_best_pt_keeps_the_epoch_of_the_lowest_validation_loss(self, overfit_run):
        run_dir, val_losses, lowest_epoch, output = overfit_run
        best = torch.load(run_dir / "best.pt", weights_only=True)
        assert best["epoch"] == lowest_epoch
        assert best["best_val_loss"] == pytest.approx(min(val_losses), abs=1e-6)
        assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == len(val_losses)
        marked = [int(line.split()[1].split("/")[0]) for line in output.splitlines() if line.endswith("(best)")]
        assert marked == [
            epoch for epoch in range(1, lowest_epoch + 1) if val_losses[epoch - 1] == min(val_losses[:epoch])
        ]

    def test_every_consumer_of_best_reads_the_best_epoch_not_the_last(self, overfit_run):
        run_dir, val_losses, lowest_epoch, _ = overfit_run
        record = json.loads((run_dir / "run.json").read_text())
        assert record["test"]["epoch"] == lowest_epoch
        assert record["best_val_loss"] == pytest.approx(min(val_losses), abs=1e-6)
        evaluated = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
        assert evaluated["checkpoint"]["epoch"] == lowest_epoch
        assert evaluated["checkpoint"]["sha256"] == common.file_digest(run_dir / "best.pt")
        summary = plot_loss.summarize_run(str(run_dir))
        assert summary["best_epoch"] == lowest_epoch and summary["best_val_loss"] == pytest.approx(min(val_losses))
        rows = read_csv_rows(run_dir / "metrics.csv")
        assert summary["val_acc"] == pytest.approx(float(rows[lowest_epoch - 1]["val_acc"]))
        assert summary["val_auc"] == pytest.approx(float(rows[lowest_epoch - 1]["val_auc"]))

    def test_a_run_resumed_after_its_best_epoch_keeps_that_best_pt(self, overfit_run, tmp_path):
        run_dir, val_losses, lowest_epoch, _ = overfit_run
        data_dir = run_dir.parent / "tiny"
        resumed = tmp_path / "resumed"
        train.main(train_args(data_dir, resumed, *OVERFIT_FLAGS, "--epochs", str(lowest_epoch + 1)))
        train.main(train_args(data_dir, resumed, *OVERFIT_FLAGS, "--epochs", str(len(val_losses)), "--resume"))
        assert loss_columns(resumed) == loss_columns(run_dir)
        best = torch.load(resumed / "best.pt", weights_only=True)
        assert best["epoch"] == lowest_epoch
        assert json.loads((resumed / "run.json").read_text())["test"]["epoch"] == lowest_epoch

    def test_a_tiny_minority_class_trains_with_a_warning_naming_the_counts(self, synth_dir, tmp_path):
        write_split(tmp_path / "data", "train", tissue(512), labels_of(512, 1))
        linked_set(synth_dir, tmp_path / "data", splits=("valid",))
        result = run_main("train.py", *train_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"), check=True)
        warnings = [line for line in result.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and "class 1: 1 of 512" in warnings[0], result.stderr
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 1

    @pytest.mark.parametrize(
        "images, minority, warned", [(512, 9, True), (512, 10, False), (2000, 19, True), (2000, 20, False)]
    )
    def test_a_minority_under_10_images_or_1_percent_is_tiny(
        self, synth_dir, tmp_path, capsys, images, minority, warned
    ):
        write_split(tmp_path / "data", "train", tissue(images), labels_of(images, minority))
        linked_set(synth_dir, tmp_path / "data", splits=("valid",))
        train.main(train_args(tmp_path / "data", tmp_path / "run", "--dry-run"))
        assert ("minority class is tiny" in capsys.readouterr().err) == warned

    @pytest.mark.parametrize("script", ["train.py", "evaluate.py", "eda.py", "plot_loss.py", "manage_data.py synth"])
    def test_help_states_each_default_once(self, script):
        help_text = run_main(*script.split(), "--help", check=True).stdout
        options = re.split(r"\n  (?=-)", help_text)
        assert len(options) > 3 and "--data-dir" in help_text or script == "plot_loss.py"
        noise = [
            option for option in options if option.count("(default") > 1 or re.search(r"default: (None|False)", option)
        ]
        assert noise == []

    @pytest.mark.parametrize(
        "command, fragment",
        [
            ("train.py --epochs 1.5", "invalid int value: '1.5'"),
            ("train.py --no-such-flag", "unrecognized arguments: --no-such-flag"),
            ("train.py --data-d data/synth", "unrecognized arguments: --data-d data/synth"),  # flags only whole
            ("evaluate.py best.pt --spl valid", "unrecognized arguments: --spl valid"),
            ("evaluate.py", "the following arguments are required: CHECKPOINT"),
            ("manage_data.py prepare", "the following arguments are required: --out"),
            ("eda.py --splits bogus", "invalid choice: 'bogus'"),
            ("plot_loss.py", "the following arguments are required: RUN_DIR_OR_CSV"),
            ("train.py --resume runs/demo", "--resume: takes auto or nothing, not 'runs/demo': continue a run with"),
            ("eda.py --out-dir=", "argument --out-dir: is empty"),
            ("evaluate.py best.pt --out-dir=", "argument --out-dir: is empty"),
            ("manage_data.py prepare --out=", "argument --out: is empty"),
        ],
    )
    def test_command_line_mistakes_are_one_line_pointing_to_help(self, command, fragment):
        result = run_main(*command.split())
        one_line_error(result, fragment)
        assert result.stderr.strip().endswith("--help")

    def test_help_shows_zero_and_list_defaults(self):
        help_text = " ".join(run_main("train.py", "--help", check=True).stdout.split())
        for shown in ("L2 weight decay (default: 0.0)", "(default: 0)", "hidden layer widths (default: 64 32)"):
            assert shown in help_text

    def test_dry_run_takes_one_batch_each_and_writes_nothing(self, synth_dir, tmp_path):
        result = run_main("train.py", *train_args(synth_dir, tmp_path / "dry", "--dry-run"), check=True)
        assert "epoch 1/5 step 1/" in result.stdout and "dry run: one validation batch" in result.stdout
        assert not (tmp_path / "dry").exists()

    def test_a_dry_run_validates_one_batch(self, synth_dir, tmp_path, monkeypatch):
        scored, predict = [], evaluate.predict

        def counted(model, batches, device, max_batches=None):
            result = predict(model, batches, device, max_batches)
            scored.append(len(result[2]))
            return result

        monkeypatch.setattr(evaluate, "predict", counted)
        train.main(train_args(synth_dir, tmp_path / "dry", "--dry-run"))
        assert scored == [64]  # one batch of --batch-size 64, of a 512-image split

    def test_a_dry_run_of_a_resume_starts_from_the_checkpoints_weights(self, synth_dir, straight_run, tmp_path):
        shutil.copytree(straight_run, tmp_path / "run")
        before = sorted(os.listdir(tmp_path / "run"))

        def validation_loss(*flags):
            output = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--dry-run", *flags)).stdout
            return float(re.search(r"dry run: one validation batch, loss ([\d.]+)", output).group(1))

        assert validation_loss("--resume", "--epochs", "4") < validation_loss() - 0.1  # 3 epochs trained, or none
        assert sorted(os.listdir(tmp_path / "run")) == before

    def test_start_up_says_what_it_runs_on(self, synth_dir, tmp_path, capsys):
        train.main(
            train_args(synth_dir, tmp_path / "r", "--dry-run")
        )  # in-process: among the fastest tests of train.py
        output = capsys.readouterr().out
        for expected in (
            "arguments:",
            "host=",
            "slurm_job_id=",
            "torch=",
            "device=",
            "1,771,682 parameters",
            "train: 1,536 images kept",
            "% positive",
        ):
            assert expected in output


def bad_test_splits():
    """name -> (writer(data_dir), message fragment): a test split broken in one way each."""

    def truncated(d):
        x_path, _ = write_split(d, "test", tissue(64), labels_of(64, 20), chunks=(8, 96, 96, 3), compression="gzip")
        with open(x_path, "r+b") as x_file:
            x_file.truncate(os.path.getsize(x_path) * 2 // 3)

    def half(d):
        write_split(d, "test", tissue(8), labels_of(8, 4))
        os.remove(pcam_files.split_paths(d, "test")[1])

    return {
        "zero rows": (
            lambda d: write_split(d, "test", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0)),
            "holds no images",
        ),
        "truncated": (truncated, "test_x.h5"),
        "x without y": (half, "camelyonpatch_level_2_split_test_y.h5 not found"),
        "scale 0..1": (lambda d: write_split(d, "test", tissue(8, dtype=np.float32) / 255, labels_of(8, 4)), "0..1"),
    }


class TestTrainRefusals:
    """train.py: a user's mistake ends in one line before the first step."""

    @pytest.mark.parametrize(
        "flags, fragment",
        [
            (["--epochs", "0"], "--epochs must be positive"),
            (["--batch-size", "-4"], "--batch-size must be in 1 .. 2**31, got -4"),
            (["--batch-size", "99999999999999999999"], "--batch-size must be in 1 .. 2**31"),
            (["--lr", "0"], "--lr must be positive"),
            (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
            (["--resume"], "no checkpoint"),
            (["--momentum", "1"], "--momentum must be in [0, 1)"),
            (["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
            (["--seed", str(2**32)], "--seed must be in 0 .. 2**32 - 1"),
            (["--hidden-units", "10000000000"], "cannot build the model with --hidden-units"),
        ],
    )
    def test_bad_arguments_end_in_one_line_before_training(self, synth_dir, tmp_path, flags, fragment):
        args = ["--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "run"), *flags]
        one_line_error(run_main("train.py", *args), fragment)
        assert not (tmp_path / "run" / "metrics.csv").exists()

    def test_a_refused_run_removes_every_folder_it_made_and_no_other(self, synth_dir, tmp_path):
        (tmp_path / "mine").mkdir()  # the user's own empty folder
        for out_dir in (tmp_path / "mine" / "a" / "b", tmp_path / "mine"):
            one_line_error(run_main("train.py", *train_args(synth_dir, out_dir, "--resume")), "no checkpoint")
        in_a_job = subprocess.run(  # its folder is runs/slurm-123, and runs/ is made for it
            [sys.executable, os.path.join(HERE, "train.py"), "--data-dir", str(synth_dir), "--resume"],
            cwd=tmp_path / "mine",
            env={**os.environ, "SLURM_JOB_ID": "123"},
            capture_output=True,
            text=True,
        )
        one_line_error(in_a_job, "no checkpoint")
        assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []

    def test_an_empty_out_dir_is_refused(self, synth_dir, tmp_path):
        result = run_main("train.py", "--data-dir", str(synth_dir), "--out-dir", "", "--epochs", "1", "--device", "cpu")
        one_line_error(result, "argument --out-dir: is empty")
        assert "step 1/" not in result.stdout
        auto = run_main("train.py", "--data-dir", str(synth_dir), "--resume", "auto", env={"SLURM_JOB_ID": ""})
        one_line_error(auto, "--resume auto needs --out-dir")  # else each run would start a new runs/<date-time>

    def test_unwritable_out_dir_and_missing_data_are_reported(self, synth_dir, tmp_path):
        (tmp_path / "a_file").write_text("")
        with pytest.raises(SystemExit) as stop:
            train.main(["--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "a_file" / "run")])
        assert "cannot write to --out-dir" in str(stop.value.code)
        with pytest.raises(SystemExit) as stop:
            train.main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "run")])
        assert "does not exist" in str(stop.value.code) and "manage_data.py synth" in str(stop.value.code)

    def test_a_new_run_never_writes_over_a_finished_one(self, synth_dir, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        (tmp_path / "run" / "last.pt").unlink()  # a user saving disk space keeps best.pt and the metrics
        kept = {name: (tmp_path / "run" / name).read_bytes() for name in ("best.pt", "metrics.csv", "run.json")}
        one_line_error(run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", "1")), "best.pt")
        assert {name: (tmp_path / "run" / name).read_bytes() for name in kept} == kept

    def test_a_slurm_job_and_an_array_task_each_get_their_own_folder(self, monkeypatch):
        for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
            monkeypatch.delenv(name, raising=False)
        assert re.fullmatch(r"runs/\d{8}-\d{6}", run_folder.default_out_dir())
        monkeypatch.setenv("SLURM_JOB_ID", "124")
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "123")  # Slurm sets it alone for a job's heterogeneous parts too
        assert run_folder.default_out_dir() == "runs/slurm-124"
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
        assert run_folder.default_out_dir() == "runs/slurm-123_7"

    def test_runs_started_in_the_same_second_get_a_folder_each(self, synth_dir, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(run_folder, "default_out_dir", lambda: os.path.join("runs", "20260101-120000"))
        args = ["--data-dir", str(synth_dir), "--device", "cpu", "--epochs", "1", "--log-every", "1000"]
        for _ in range(2):
            train.main(args)
        assert sorted(os.listdir(tmp_path / "runs")) == ["20260101-120000", "20260101-120000-2"]

    @pytest.mark.parametrize("name", list(bad_test_splits()))
    def test_every_split_is_checked_before_the_first_step(self, synth_dir, tmp_path, name):
        write, fragment = bad_test_splits()[name]
        write(linked_set(synth_dir, tmp_path / "data"))
        result = run_main("train.py", *train_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))
        one_line_error(result, fragment)
        assert "epoch 1/1" not in result.stdout
        assert not (tmp_path / "run").exists()  # nothing for make plot to pick up

    def test_a_zero_row_validation_split_is_one_line_before_training(self, synth_dir, tmp_path):
        linked_set(synth_dir, tmp_path / "data", splits=("train",))
        write_split(tmp_path / "data", "valid", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0))
        result = run_main("train.py", *train_args(tmp_path / "data", tmp_path / "run"))
        one_line_error(result, "valid_x.h5 holds no images")
        assert "step 1/" not in result.stdout

    def test_non_finite_negative_or_float32_overflowing_numbers_are_refused_up_front(self, synth_dir, tmp_path):
        for flags in (
            ["--lr", "inf"],
            ["--lr", "nan"],
            ["--weight-decay", "-1"],
            ["--momentum", "-1"],
            ["--weight-decay", "inf"],
            ["--momentum", "nan"],
            ["--lr", "1e308"],
            ["--lr", "1e39", "--optimizer", "sgd"],
            ["--weight-decay", "1e300"],
        ):
            result = run_main("train.py", *train_args(synth_dir, tmp_path / "run", *flags))
            one_line_error(result, flags[0] + " must be")
            assert not (tmp_path / "run").exists()

    @pytest.mark.parametrize(  # the largest --lr and --weight-decay train.py takes
        "flags, fragment",
        [
            (["--lr", "3.4028234663852877e+37"], "training loss became nan"),
            (["--lr", "3.4028234663852877e+37", "--optimizer", "sgd"], "training loss became nan"),
            (["--weight-decay", "3.4028234663852886e+38", "--optimizer", "sgd"], "training loss became nan"),
            (["--weight-decay", "3.4028234663852886e+38"], None),  # Adam scales its steps: it trains
        ],
    )
    def test_the_largest_lr_and_weight_decay_train_or_diverge_in_one_line(self, synth_dir, tmp_path, flags, fragment):
        result = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", "1", *flags))
        if fragment:
            one_line_error(result, fragment)
        else:
            assert result.returncode == 0, result.stderr

    def test_train_honours_the_manifest(self, small_set, tmp_path):
        run_main("manage_data.py", "manifest", "--data-dir", str(small_set), check=True)
        run_main("train.py", *train_args(small_set, tmp_path / "run", "--epochs", "1"), check=True)
        assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["manifest_matched"] is True
        x_valid = pcam_files.split_paths(small_set, "valid")[0]
        os.utime(x_valid, (1e9, 1e9))
        result = run_main("train.py", *train_args(small_set, tmp_path / "again", "--epochs", "1"))
        one_line_error(result, "camelyonpatch_level_2_split_valid_x.h5 (size or mtime changed)")
        assert "manage_data.py verify" in result.stderr and "manage_data.py manifest" in result.stderr
        assert "step 1/" not in result.stdout
        staged = run_main("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(tmp_path / "staged"))
        one_line_error(staged, "camelyonpatch_level_2_split_valid_x.h5 (size or mtime changed)")  # nor copied

    def test_a_manifest_naming_a_file_that_is_gone_stops_train_and_verify(self, small_set, tmp_path):
        run_main("manage_data.py", "manifest", "--data-dir", str(small_set), check=True)
        for path in pcam_files.split_paths(small_set, "test"):
            os.remove(path)
        result = run_main("train.py", *train_args(small_set, tmp_path / "run", "--epochs", "1"))
        one_line_error(result, "camelyonpatch_level_2_split_test_x.h5 (missing)")
        assert "step 1/" not in result.stdout and not (tmp_path / "run").exists()
        one_line_error(
            run_main("manage_data.py", "verify", "--data-dir", str(small_set)),
            "camelyonpatch_level_2_split_test_y.h5 (missing)",
        )

    def test_the_largest_valid_values_are_accepted(self, synth_dir, tmp_path):
        for flags in (["--seed", str(2**32 - 1)], ["--dropout", "0.99"], ["--momentum", "0.99", "--optimizer", "sgd"]):
            result = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--dry-run", *flags))
            assert result.returncode == 0 and "dry run: one validation batch" in result.stdout, result.stderr
        one_line_error(run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--dropout", "1")), "--dropout")

    def test_other_typing_mistakes_are_one_line(self, synth_dir, small_set, tmp_path):
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        torch.save({"weights": torch.zeros(3)}, run_dir / "last.pt")
        one_line_error(run_main("train.py", *train_args(synth_dir, run_dir, "--resume")), "not a train.py checkpoint")
        (tmp_path / "metrics.csv").write_bytes(b"\xff\xfe\x00e\x00p\x00o\x00c\x00h")
        one_line_error(run_main("plot_loss.py", str(tmp_path / "metrics.csv")), "is not CSV text")
        (tmp_path / "metrics.csv").write_bytes(bytes(300_000))  # what a crash can leave: one field past csv's limit
        one_line_error(run_main("plot_loss.py", str(tmp_path / "metrics.csv")), "is not CSV text")
        one_line_error(
            run_main("manage_data.py", "synth", "--data-dir", str(tmp_path / "s"), "--seed", "-1"), "--seed -1"
        )
        assert not (tmp_path / "s").exists()
        dry_run = train_args(synth_dir, tmp_path / "dry", "--dry-run")  # as a broken job environment may set it:
        assert run_main("train.py", *dry_run, env={"SLURM_CPUS_PER_TASK": ""}, check=True).returncode == 0
        not_a_count = run_main("train.py", *dry_run, env={"SLURM_CPUS_PER_TASK": "abc"})
        one_line_error(not_a_count, "argument --num-workers: $SLURM_CPUS_PER_TASK is 'abc', not a whole number")
        for script in (("manage_data.py", "info"), ("train.py",), ("eda.py",)):
            one_line_error(run_main(*script, env={"PCAM_DIR": ""}), "empty")
        one_line_error(
            run_main("manage_data.py", "download", "--data-dir", str(tmp_path / "d"), "--base-url", "example.org/f"),
            "--base-url",
        )
