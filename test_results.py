"""What a run leaves to read: evaluate.py's scores and files, plot_loss.py's curves and the runs table."""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import statistics
from pathlib import Path

import matplotlib.pyplot
import numpy as np
import pytest
import torch

import eda
import evaluate
import manage_data
import pcam_files
import plot_loss
import run_folder
import train
from test_helpers import (
    HERE,
    is_nonblank_png,
    labels_of,
    linked_set,
    loss_plot_lines,
    make,
    one_line_error,
    read_csv_rows,
    run_main,
    start_run,
    tissue,
    train_args,
    write_split,
)


def read_predictions(path):
    """(rows, labels, scores, predictions) of a predictions.csv, whose header must be the contract's."""
    rows = read_csv_rows(path)
    assert list(rows[0]) == ["index", "label", "score", "pred"]
    return (
        np.array([int(row["index"]) for row in rows]),
        np.array([int(row["label"]) for row in rows]),
        np.array([float(row["score"]) for row in rows]),
        np.array([int(row["pred"]) for row in rows]),
    )


def auc_by_pairs(scores, labels):
    """The share of (positive, negative) pairs the scores order correctly, a tie counting half."""
    positive, negative = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(((positive > negative) + 0.5 * (positive == negative)).mean())


def bad_checkpoints(run_dir, directory):
    """Files evaluate.py must refuse: name -> (path, what the error line says)."""
    best = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save({"weights": torch.zeros(3)}, directory / "other.pt")
    (directory / "notes.pt").write_text("not a checkpoint\n")
    (directory / "hello.pt").write_text("hello\n")  # torch's unpickler reads 'h' as an opcode: a KeyError
    whole = (run_dir / "best.pt").read_bytes()
    (directory / "truncated.pt").write_bytes(whole[: len(whole) // 2])  # a save cut off half-way
    torch.save({**best, "model_args": {"hidden_units": [128, 32], "dropout_rate": 0.2}}, directory / "shape.pt")
    torch.save({"model": best["model"]}, directory / "weights-only.pt")
    return {
        "not ours": (directory / "other.pt", "is not a train.py checkpoint (it lacks model, model_args)"),
        "no model_args": (directory / "weights-only.pt", "is not a train.py checkpoint (it lacks model_args)"),
        "text": (directory / "notes.pt", "cannot load checkpoint"),
        "hello": (directory / "hello.pt", "cannot load checkpoint"),
        "truncated": (directory / "truncated.pt", "cannot load checkpoint"),
        "other shape": (directory / "shape.pt", "do not fit the MLP"),
        "missing": (directory / "nowhere.pt", "not found"),
    }


class TestEvaluate:
    """evaluate.py: predictions, metrics and figures that agree, and bad checkpoints refused."""

    def test_evaluate_writes_predictions_metrics_and_figures_that_agree(self, straight_run, synth_dir, tmp_path):
        out = tmp_path / "eval"
        result = run_main(
            "evaluate.py",
            str(straight_run / "best.pt"),
            "--data-dir",
            str(synth_dir),
            "--split",
            "valid",
            "--out-dir",
            str(out),
            "--device",
            "cpu",
            check=True,
        )
        assert result.stdout.startswith("valid: 512 images, loss ") and str(out) in result.stdout
        assert len(result.stdout.splitlines()) == 1, result.stdout  # the checkpoint's digest prints no progress
        rows, labels, scores, predicted = read_predictions(out / "predictions.csv")
        assert rows.tolist() == list(range(512))
        assert labels.tolist() == pcam_files.read_labels(pcam_files.split_paths(synth_dir, "valid")[1]).tolist()
        assert predicted.tolist() == (scores >= 0.5).astype(int).tolist()
        tp, fn = int(((predicted == 1) & (labels == 1)).sum()), int(((predicted == 0) & (labels == 1)).sum())
        fp, tn = int(((predicted == 1) & (labels == 0)).sum()), int(((predicted == 0) & (labels == 0)).sum())
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["confusion"] == [[tn, fp], [fn, tp]] and tn and fp and fn and tp
        assert metrics["accuracy"] == (tp + tn) / 512
        assert metrics["sensitivity"] == tp / (tp + fn) and metrics["specificity"] == tn / (tn + fp)
        assert metrics["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2, abs=1e-12)
        assert metrics["auc"] == pytest.approx(auc_by_pairs(scores, labels), abs=1e-12)
        class_probability = np.where(labels == 1, scores, 1 - scores)
        assert metrics["loss"] == pytest.approx(-np.log(class_probability).mean(), abs=1e-5)
        x_path, y_path = pcam_files.split_paths(synth_dir, "valid")
        assert metrics["data"]["files"] == {os.path.basename(p): os.path.getsize(p) for p in (x_path, y_path)}
        assert metrics["checkpoint"]["sha256"] == hashlib.sha256((straight_run / "best.pt").read_bytes()).hexdigest()
        assert metrics["versions"]["torch"] == torch.__version__ and metrics["split"] == "valid"
        assert is_nonblank_png(out / "roc.png") and is_nonblank_png(out / "confusion.png")
        best_epoch = read_csv_rows(straight_run / "metrics.csv")[metrics["checkpoint"]["epoch"] - 1]
        assert float(best_epoch["val_acc"]) == pytest.approx(metrics["accuracy"], abs=1e-6)  # train.py's validation
        assert float(best_epoch["val_loss"]) == pytest.approx(metrics["loss"], abs=1e-5)

    def test_evaluate_with_filter_data_names_the_rows_of_the_split_file(self, straight_run, tmp_path):
        images = tissue(40, seed=5)
        images[[3, 17]], images[30] = 0, 255  # two black tiles and a white one
        write_split(tmp_path / "data", "test", images, labels_of(40, 16))
        run_main(
            "evaluate.py",
            str(straight_run / "best.pt"),
            "--data-dir",
            str(tmp_path / "data"),
            "--filter-data",
            "--out-dir",
            str(tmp_path / "eval"),
            "--batch-size",
            "16",
            check=True,
        )
        rows, labels, _, _ = read_predictions(tmp_path / "eval" / "predictions.csv")
        assert rows.tolist() == [row for row in range(40) if row not in (3, 17, 30)]
        assert labels.tolist() == labels_of(40, 16).ravel()[rows].tolist()

    def test_train_py_scores_the_filtered_test_split_as_evaluate_py_does(self, synth_dir, tmp_path):
        data_dir = linked_set(synth_dir, tmp_path / "data")
        images = tissue(40, seed=5)
        images[[3, 17]], images[30] = 0, 255  # two black tiles and a white one
        write_split(data_dir, "test", images, labels_of(40, 16))
        run_dir = tmp_path / "run"
        run_main("train.py", *train_args(data_dir, run_dir, "--epochs", "1", "--filter-data"), check=True)
        rows, labels, scores, _ = read_predictions(run_dir / "eval-test" / "predictions.csv")
        assert rows.tolist() == [row for row in range(40) if row not in (3, 17, 30)]
        assert labels.tolist() == labels_of(40, 16).ravel()[rows].tolist()
        assert json.loads((run_dir / "eval-test" / "metrics.json").read_text())["filter_data"] is True
        evaluated = tmp_path / "evaluated"
        run_main(
            *("evaluate.py", str(run_dir / "best.pt"), "--data-dir", str(data_dir), "--filter-data"),
            *("--out-dir", str(evaluated), "--batch-size", "64"),
            check=True,
        )
        assert (evaluated / "predictions.csv").read_text() == (run_dir / "eval-test" / "predictions.csv").read_text()

    def test_a_test_split_the_filter_empties_skips_test_scoring_and_the_run_is_done(self, synth_dir, tmp_path):
        data_dir = linked_set(synth_dir, tmp_path / "data")
        write_split(data_dir, "test", np.zeros((8, 96, 96, 3), np.uint8), labels_of(8, 4))  # all black tiles
        run_dir = tmp_path / "run"
        result = run_main("train.py", *train_args(data_dir, run_dir, "--epochs", "1", "--filter-data"), check=True)
        assert "the outlier filter removed every test image, skipped" in result.stdout
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "done" and record["test"] is None and (run_dir / "best.pt").exists()

    def test_evaluate_scores_equal_those_of_train_py_test_evaluation(self, straight_run, synth_dir):
        by_train = (straight_run / "eval-test" / "predictions.csv").read_text()
        record_test = json.loads((straight_run / "run.json").read_text())["test"]
        matplotlib.pyplot.close("all")  # whatever other tests left open
        evaluate.main(
            [
                str(straight_run / "best.pt"),
                "--data-dir",
                str(synth_dir),
                "--split",
                "test",
                "--batch-size",
                "64",
                "--device",
                "cpu",
            ]
        )  # default out-dir: the run's own eval-test/
        assert (straight_run / "eval-test" / "predictions.csv").read_text() == by_train
        assert matplotlib.pyplot.get_fignums() == []  # its figures closed: a loop of evaluations holds no memory
        assert read_predictions(straight_run / "eval-test" / "predictions.csv")[0].tolist() == list(range(256))
        metrics = json.loads((straight_run / "eval-test" / "metrics.json").read_text())
        assert {key: metrics[key] for key in ("loss", "accuracy", "auc")} == {
            key: record_test[key] for key in ("loss", "accuracy", "auc")
        }
        assert record_test["epoch"] == metrics["checkpoint"]["epoch"]

    def test_roc_auc_counts_tied_scores_as_half(self):
        assert evaluate.roc_auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1])) == 3.5 / 4
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 2, 300)
        scores = np.round(rng.random(300) * 0.6 + 0.4 * labels, 1)  # ten distinct values: many ties
        assert evaluate.roc_auc(scores, labels) == pytest.approx(auc_by_pairs(scores, labels), abs=1e-12)
        false_positive_rate, true_positive_rate = evaluate.roc_points(scores, labels)
        assert (false_positive_rate[[0, -1]].tolist(), true_positive_rate[[0, -1]].tolist()) == ([0, 1], [0, 1])
        area = np.sum(np.diff(false_positive_rate) * (true_positive_rate[1:] + true_positive_rate[:-1]) / 2)
        assert area == pytest.approx(auc_by_pairs(scores, labels), abs=1e-12)  # the drawn curve has that area

    @pytest.mark.parametrize(
        "name", ["not ours", "no model_args", "text", "hello", "truncated", "other shape", "missing"]
    )
    def test_evaluate_refuses_a_bad_checkpoint_in_one_line(self, straight_run, synth_dir, tmp_path, name):
        path, fragment = bad_checkpoints(straight_run, tmp_path)[name]
        result = run_main("evaluate.py", str(path), "--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "eval"))
        one_line_error(result, fragment)
        assert not (tmp_path / "eval").exists()

    def test_evaluate_refuses_non_finite_weights_in_one_line(self, straight_run, synth_dir, tmp_path):
        best = torch.load(straight_run / "best.pt", weights_only=True)
        best["model"]["layers.0.weight"][0, 0] = float("nan")
        torch.save(best, tmp_path / "nan.pt")
        result = run_main("evaluate.py", str(tmp_path / "nan.pt"), "--data-dir", str(synth_dir))
        one_line_error(result, "layers.0.weight")
        assert "non-finite" in result.stderr and not (tmp_path / "eval-test").exists()

    def test_evaluate_of_finite_weights_with_non_finite_outputs_leaves_no_folder(
        self, straight_run, synth_dir, tmp_path
    ):
        best = torch.load(straight_run / "best.pt", weights_only=True)
        best["model"]["layers.0.weight"].fill_(1e38)  # finite, but the logits overflow
        torch.save(best, tmp_path / "huge.pt")
        result = run_main("evaluate.py", str(tmp_path / "huge.pt"), "--data-dir", str(synth_dir))
        one_line_error(result, "not finite")
        assert not (tmp_path / "eval-test").exists()

    def test_evaluate_stays_out_of_a_run_that_is_still_training(self, synth_dir, tmp_path):
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "50")
        live = start_run(args)
        try:
            result = run_main("evaluate.py", str(tmp_path / "run" / "last.pt"), "--data-dir", str(synth_dir))
            one_line_error(result, "still training")
            assert not (tmp_path / "run" / "eval-test").exists()
            into_the_run = run_main(
                *("evaluate.py", str(tmp_path / "run" / "last.pt"), "--data-dir", str(synth_dir)),
                *("--out-dir", str(tmp_path / "run")),
            )
            one_line_error(into_the_run, "still training")
            assert not (tmp_path / "run" / "metrics.json").exists()
            elsewhere = tmp_path / "elsewhere"
            run_main(
                *("evaluate.py", str(tmp_path / "run" / "last.pt"), "--data-dir", str(synth_dir)),
                *("--out-dir", str(elsewhere)),
                check=True,
            )
            assert (elsewhere / "metrics.json").exists()
        finally:
            live.send_signal(signal.SIGKILL)
            live.wait(timeout=60)

    def test_evaluate_leaves_the_eval_test_of_a_run_that_is_not_done_to_the_run(
        self, straight_run, synth_dir, tmp_path
    ):
        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir, ignore=shutil.ignore_patterns("eval-test"))
        record = json.loads((run_dir / "run.json").read_text())
        (run_dir / "run.json").write_text(json.dumps({**record, "status": "stopped"}))
        result = run_main("evaluate.py", str(run_dir / "best.pt"), "--data-dir", str(synth_dir))
        one_line_error(
            result, f"{run_dir / 'eval-test'} is the run's own: train.py writes it when the run in {run_dir} ends"
        )
        assert not (run_dir / "eval-test").exists()

    def test_evaluate_reports_a_missing_split_and_another_evaluation_in_one_line(
        self, straight_run, synth_dir, tmp_path
    ):
        write_split(tmp_path / "data", "train", tissue(8), labels_of(8, 4))
        result = run_main("evaluate.py", str(straight_run / "best.pt"), "--data-dir", str(tmp_path / "data"))
        with pytest.raises(pcam_files.MissingDataError) as missing:
            pcam_files.require_split(tmp_path / "data", "test")
        assert result.returncode == 1 and result.stderr == f"evaluate.py: error: {missing.value}\n"
        result = run_main("evaluate.py", str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--filter-data")
        one_line_error(result, "holds an evaluation of another checkpoint or other data")
        result = run_main(
            "evaluate.py", str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--batch-size", "0"
        )
        one_line_error(result, "--batch-size must be in 1 .. 2**31")
        users = tmp_path / "mine"
        users.mkdir()
        (users / "predictions.csv").write_text("my own predictions\n")
        args = (str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--out-dir", str(users))
        one_line_error(run_main("evaluate.py", *args), "predictions.csv not written by evaluate.py")
        assert (users / "predictions.csv").read_text() == "my own predictions\n"
        for damaged in ('{"split": ', '{"checkpoint": null}'):  # cut short, or not evaluate.py's shape
            (users / "metrics.json").write_text(damaged)
            one_line_error(run_main("evaluate.py", *args), "metrics.json is damaged or not written by evaluate.py")


class TestLossPlot:
    """plot_loss.py: the loss and accuracy curves of one run or several."""

    def test_the_epoch_axes_tick_whole_epochs(self, straight_run, tmp_path):
        figure = plot_loss.plot_runs([str(straight_run)], str(tmp_path / "loss.png"))  # 3 epochs
        for axes in figure.axes[:2]:
            low, high = axes.get_xlim()
            ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
            assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks

    def test_plot_overlays_runs_and_writes_where_asked(self, straight_run, tmp_path):
        out = tmp_path / "assets" / "loss_plot.png"
        run_main("plot_loss.py", str(straight_run), str(straight_run / "metrics.csv"), "--out", str(out), check=True)
        assert is_nonblank_png(out)
        (straight_run / "loss.png").unlink()
        run_main("plot_loss.py", str(straight_run), check=True)
        assert is_nonblank_png(straight_run / "loss.png")
        shutil.copytree(straight_run, tmp_path / "runs" / "demo")
        shutil.copy(out, tmp_path / "runs" / "demo-loss.png")  # as make plot RUN=runs/demo OUT=runs/demo-loss.png
        pattern = str(tmp_path / "runs" / "demo*")  # matches the run and the PNG beside it
        run_main("plot_loss.py", pattern, "--out", str(tmp_path / "sweep.png"), check=True)

    def test_plot_draws_train_and_validation_loss_and_accuracy_of_each_run(self, straight_run, tmp_path):
        def column(rows, name):
            return [float(row[name]) for row in rows]

        def lines_labelled(lines, word):
            return sorted(data for label, data in lines.items() if word in label)

        rows = read_csv_rows(straight_run / "metrics.csv")
        loss_lines, accuracy_lines = loss_plot_lines([straight_run], tmp_path / "one.png")
        epochs = column(rows, "epoch")
        assert lines_labelled(loss_lines, "train") == [(epochs, column(rows, "train_loss"))]
        assert lines_labelled(loss_lines, "validation") == [(epochs, column(rows, "val_loss"))]
        assert list(accuracy_lines.values()) == [(epochs, column(rows, "val_acc"))]
        other = tmp_path / "other"
        other.mkdir()
        (other / "metrics.csv").write_text("epoch,train_loss,val_loss,val_acc\n1,0.9,0.8,0.6\n2,0.7,0.75,0.65\n")
        loss_lines, accuracy_lines = loss_plot_lines([straight_run, other], tmp_path / "two.png")
        assert len(loss_lines) == 4 and len(accuracy_lines) == 2
        assert lines_labelled(loss_lines, "validation") == sorted(
            [(epochs, column(rows, "val_loss")), ([1.0, 2.0], [0.8, 0.75])]
        )
        assert lines_labelled(loss_lines, "train") == sorted(
            [(epochs, column(rows, "train_loss")), ([1.0, 2.0], [0.9, 0.7])]
        )

    def test_overlaid_runs_differ_in_marker_as_well_as_colour(self, straight_run, tmp_path):
        runs = []
        for seed in range(3):
            runs.append(tmp_path / f"seed{seed}")
            shutil.copytree(straight_run, runs[-1], ignore=shutil.ignore_patterns("*.pt", "eval-test"))
        figure = plot_loss.plot_runs([str(run) for run in runs], str(tmp_path / "runs.png"))
        for axes in figure.axes[:2]:
            markers = [line.get_marker() for line in axes.get_lines() if "train" not in line.get_label()]
            assert len(set(markers)) == 3, markers  # told apart without colour
        before = {run: (run / "loss.png").read_bytes() for run in runs}
        result = run_main("plot_loss.py", *map(str, runs), check=True)
        assert f"wrote {tmp_path / 'runs.png'}" in result.stdout and is_nonblank_png(tmp_path / "runs.png")
        assert {run: (run / "loss.png").read_bytes() for run in runs} == before  # each run keeps its own plot

    def test_force_never_replaces_a_runs_checkpoints_records_or_locks(self, straight_run, tmp_path):
        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir)
        (run_dir / run_folder.LOCK_NAME).write_text("")
        kept = {path: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
        for name in ("best.pt", "last.pt", "run.json", "metrics.csv", run_folder.LOCK_NAME):
            one_line_error(
                run_main("plot_loss.py", str(run_dir), "--out", str(run_dir / name), "--force"), "never this output"
            )
            one_line_error(
                run_main(
                    "manage_data.py",
                    "manifest",
                    "--data-dir",
                    str(straight_run.parent),
                    "--manifest",
                    str(run_dir / name),
                    "--force",
                ),
                "never this output",
            )
        one_line_error(run_main("plot_loss.py", str(run_dir), "--out", str(tmp_path)), "is a folder")
        assert {path: path.read_bytes() for path in kept} == kept

    def test_plot_never_replaces_a_file_it_did_not_write(self, straight_run, tmp_path):
        _, y_path = write_split(tmp_path / "data", "train", tissue(4), labels_of(4, 2))
        before = Path(y_path).read_bytes()
        for extra in ([], ["--force"]):
            one_line_error(run_main("plot_loss.py", str(straight_run), "--out", y_path, *extra), "is a data file")
        assert Path(y_path).read_bytes() == before
        photo = tmp_path / "photo.png"
        matplotlib.pyplot.imsave(photo, np.zeros((4, 4, 3)))
        before = photo.read_bytes()
        one_line_error(run_main("plot_loss.py", str(straight_run), "--out", str(photo)), "--force")
        assert photo.read_bytes() == before
        run_main("plot_loss.py", str(straight_run), "--out", str(photo), "--force", check=True)
        for _ in range(2):  # its own output it may draw again
            run_main("plot_loss.py", str(straight_run), "--out", str(tmp_path / "loss.png"), check=True)
        one_line_error(run_main("plot_loss.py", str(straight_run), "--out", str(tmp_path / "loss.pdf")), ".png file")
        assert not (tmp_path / "loss.pdf").exists()
        assert is_nonblank_png(tmp_path / "loss.png")

    @pytest.mark.parametrize(
        "content, fragment",
        [
            (None, "not found"),
            ("", "has no epoch rows"),
            ("epoch,loss\n1,0.5\n", "lacks the columns"),
            ("epoch,train_loss,val_loss,val_acc\n1,0.5,zero,0.7\n", "not numbers"),
        ],
    )
    def test_plot_rejects_bad_metrics_files(self, tmp_path, content, fragment):
        path = tmp_path / "metrics.csv"
        if content is not None:
            path.write_text(content)
        one_line_error(run_main("plot_loss.py", str(path)), fragment)


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """Five 1-epoch runs on a small set: seeds 1, 2, 3 at the default lr, and lr 1e-3 and 3e-4 at seed 1."""
    data_dir, root = tmp_path_factory.mktemp("small_synth"), tmp_path_factory.mktemp("sweep")
    manage_data.main(["synth", "--data-dir", str(data_dir), "--n-train", "256", "--n-valid", "128", "--n-test", "128"])
    runs = {
        "seed-1": ["--seed", "1"],
        "seed-2": ["--seed", "2"],
        "seed-3": ["--seed", "3"],
        "lr-1e-3": ["--seed", "1", "--lr", "1e-3"],
        "lr-3e-4": ["--seed", "1", "--lr", "3e-4"],
    }
    for name, flags in runs.items():
        train.main(train_args(data_dir, root / name, "--epochs", "1", *flags))
    return root


def expected_row(run_dir):
    """The runs-table numbers of a run, computed here from its metrics.csv and run.json."""
    metrics = read_csv_rows(run_dir / "metrics.csv")
    best = min(metrics, key=lambda row: float(row["val_loss"]))
    test = json.loads((run_dir / "run.json").read_text())["test"]
    return {
        "epochs_done": len(metrics),
        "best_epoch": int(best["epoch"]),
        "best_val_loss": float(best["val_loss"]),
        "val_acc": float(best["val_acc"]),
        "val_auc": float(best["val_auc"]),
        "test_acc": test["accuracy"],
        "test_auc": test["auc"],
        "images_per_s": float(best["images_per_s"]),
        "wall_s": float(best["epoch_s"]),
    }


def runs_in_every_state(sweep_runs, root):
    """Run folders under root, named for their state (going, killed, stopped, no-metrics, damaged, ...), and folders
    that are no runs; returns the first epoch's metrics row."""
    for name, status in (
        ("going", "running"),
        ("killed", "running"),
        ("stopped", "stopped"),
        ("no-metrics", "done"),
    ):
        shutil.copytree(sweep_runs / "seed-1", root / name)
        record = json.loads((root / name / "run.json").read_text())
        (root / name / "run.json").write_text(json.dumps({**record, "status": status}))
    (root / "going" / "metrics.csv").write_text(",".join(read_csv_rows(sweep_runs / "seed-1" / "metrics.csv")[0]))
    (root / "no-metrics" / "metrics.csv").unlink()
    first_epoch = read_csv_rows(sweep_runs / "seed-1" / "metrics.csv")[0]
    worse_epoch = {
        **first_epoch,
        "epoch": "2",
        "val_loss": str(float(first_epoch["val_loss"]) + 0.1),
        "val_acc": "0.5",
    }
    with open(root / "stopped" / "metrics.csv", "a") as metrics_file:
        metrics_file.write(",".join(worse_epoch.values()) + "\n")
    (root / "empty").mkdir()  # not a run, no more than eda.py's figures in runs/eda/
    (root / "eda").mkdir()
    for figure in eda.FIGURES:
        (root / "eda" / figure).write_bytes(b"\x89PNG\r\n")
    (root / "checkpoint").mkdir()  # a run's folder, whatever of its files is left
    shutil.copy(sweep_runs / "seed-1" / "last.pt", root / "checkpoint")
    for name, text in (("damaged", '{"args": '), ("odd", '{"args": {}, "test": [1]}')):
        (root / name).mkdir()
        (root / name / "run.json").write_text(text)
    return first_epoch


class TestRunsTable:
    """plot_loss.py --table: one row per run, the spread over seeds, and runs that are not done."""

    def test_runs_table_shows_what_differs_and_the_spread_over_seeds(self, sweep_runs):
        result = run_main("plot_loss.py", "--table", str(sweep_runs / "*"), check=True)
        table = read_csv_rows(sweep_runs / "runs_summary.csv")
        # of the settings, only those that differ
        columns = (
            "run lr seed epochs_done best_epoch best_val_loss val_acc val_auc test_acc test_auc images_per_s wall_s"
        )
        assert list(table[0]) == [*columns.split(), "status"]
        assert [row["run"] for row in table] == [
            "lr-1e-3",
            "lr-3e-4",
            "seed-1",
            "seed-2",
            "seed-3",
            "mean of 3 seeds",
            "std of 3 seeds",
        ]
        by_run = {row["run"]: row for row in table}
        assert (by_run["lr-1e-3"]["lr"], by_run["seed-2"]["seed"], by_run["seed-2"]["lr"]) == ("0.001", "2", "0.0001")
        for name in ("lr-1e-3", "lr-3e-4", "seed-1", "seed-2", "seed-3"):
            expected = expected_row(sweep_runs / name)
            assert {column: float(by_run[name][column]) for column in expected} == pytest.approx(expected)
            assert by_run[name]["status"] == "done" and name in result.stdout
        seeds = [expected_row(sweep_runs / f"seed-{seed}") for seed in (1, 2, 3)]
        for column in ("best_val_loss", "val_acc", "val_auc", "test_acc", "test_auc", "images_per_s", "wall_s"):
            values = [row[column] for row in seeds]
            assert float(by_run["mean of 3 seeds"][column]) == pytest.approx(statistics.fmean(values))
            assert float(by_run["std of 3 seeds"][column]) == pytest.approx(statistics.stdev(values))
        assert by_run["mean of 3 seeds"]["lr"] == "0.0001" and by_run["mean of 3 seeds"]["seed"] == ""
        assert "mean of 3 seeds" in result.stdout and is_nonblank_png(sweep_runs / "runs.png")

    def test_a_one_class_validation_split_and_damaged_records_leave_the_table_whole(self, sweep_runs, tmp_path):
        for seed in (1, 2):  # AUC is nan when the validation split holds one class: no mean, no std
            shutil.copytree(sweep_runs / f"seed-{seed}", tmp_path / f"one-class-{seed}")
            metrics = tmp_path / f"one-class-{seed}" / "metrics.csv"
            lines = metrics.read_text().splitlines()
            auc = lines[0].split(",").index("val_auc")
            rows = [line.split(",") for line in lines[1:]]
            metrics.write_text("\n".join([lines[0], *(",".join(row[:auc] + ["nan"] + row[auc + 1 :]) for row in rows)]))
        changes = {"text-score": {"test": {"accuracy": "x"}}, "true-score": {"test": {"auc": True}}}
        for name, change in {**changes, "list-seed": {"args": {"seed": [1, 2]}}}.items():
            shutil.copytree(sweep_runs / "seed-3", tmp_path / name)
            record = json.loads((tmp_path / name / "run.json").read_text())
            (tmp_path / name / "run.json").write_text(json.dumps({**record, **change}))
        run_main("plot_loss.py", "--table", str(tmp_path / "*"), check=True)
        by_run = {row["run"]: row for row in read_csv_rows(tmp_path / "runs_summary.csv")}
        assert by_run["one-class-1"]["val_auc"] == "nan" and by_run["mean of 2 seeds"]["val_auc"] == ""
        assert float(by_run["mean of 2 seeds"]["val_acc"]) == pytest.approx(
            statistics.fmean(float(by_run[f"one-class-{seed}"]["val_acc"]) for seed in (1, 2))
        )
        assert by_run["text-score"]["status"] == by_run["true-score"]["status"] == "unreadable: run.json"
        assert by_run["list-seed"]["seed"] == "1 2"

    def test_runs_are_named_in_the_legend_by_what_differs(self, sweep_runs):
        names = plot_loss.legend_names(
            [sweep_runs / "seed-1", sweep_runs / "seed-2", sweep_runs / "lr-1e-3"], ["seed-1", "seed-2", "lr-1e-3"]
        )
        assert names == ["lr=0.0001 seed=1", "lr=0.0001 seed=2", "lr=0.001 seed=1"]

    def test_runs_table_lists_running_stopped_and_unreadable_runs(self, sweep_runs, tmp_path):
        root = tmp_path / "runs"
        first_epoch = runs_in_every_state(sweep_runs, root)
        (root / "starting").mkdir()  # a live run before its run.json: minutes of loading on the course copy
        with open(root / "going" / "train.lock", "w") as lock, open(root / "starting" / "train.lock", "w") as starting:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a live run holds its folder's lock; "killed" does not
            fcntl.flock(starting, fcntl.LOCK_EX)
            output = make(HERE, "runs", f"RUNS={root}/*/")
        table = {row["run"]: row for row in read_csv_rows(root / "runs_summary.csv")}
        statuses = {name: row["status"] for name, row in table.items()}
        assert (table["stopped"]["epochs_done"], table["stopped"]["best_epoch"]) == ("2", "1")
        assert float(table["stopped"]["val_acc"]) == float(first_epoch["val_acc"])  # at the best epoch, not the last
        assert statuses == {
            "checkpoint": "unreadable: run.json",
            "damaged": "unreadable: run.json",
            "going": "running",
            "killed": "not running (killed?)",
            "odd": "unreadable: run.json",
            "no-metrics": "unreadable: metrics.csv",
            "starting": "running",
            "stopped": "stopped",
        }
        for line in output.splitlines()[1:-1]:
            assert line.endswith(statuses[line.split()[0]])

    def test_runs_table_never_replaces_a_summary_it_did_not_write(self, sweep_runs, tmp_path):
        (tmp_path / "runs_summary.csv").write_text("run,score\nmine,1\n")  # a header like ours at the start only
        result = run_main("plot_loss.py", "--table", str(sweep_runs / "seed-1"), "--out", str(tmp_path / "t.png"))
        one_line_error(result, "runs_summary.csv")
        assert (tmp_path / "runs_summary.csv").read_text() == "run,score\nmine,1\n"
        assert not (tmp_path / "t.png").exists()
        for _ in range(2):
            out = str(tmp_path / "mine" / "t.png")
            run_main("plot_loss.py", "--table", str(sweep_runs / "seed-1"), "--out", out, check=True)
        assert read_csv_rows(tmp_path / "mine" / "runs_summary.csv")[0]["run"] == "seed-1"

    def test_no_run_found_suggests_another_pattern_than_the_one_that_failed(self, tmp_path):
        for pattern in ("runs/slurm-123_*", "runs/*/", str(tmp_path / "nowhere")):
            result = run_main("plot_loss.py", "--table", pattern)
            one_line_error(result, f"no run found in '{pattern}'")
            assert result.stderr.count(pattern) == 1 and "plot_loss.py --table" not in result.stderr

    def test_runs_table_names_what_it_cannot_find(self, sweep_runs, tmp_path):
        out = str(tmp_path / "o.png")
        missing = run_main(
            "plot_loss.py", "--table", str(tmp_path / "nowhere"), str(sweep_runs / "seed-1"), "--out", out
        )
        assert missing.returncode == 0 and "unreadable: not found" in missing.stdout
        for nothing in (str(tmp_path / "nowhere"), str(tmp_path / "no-match-*"), os.path.join(HERE, "README.md")):
            one_line_error(run_main("plot_loss.py", "--table", nothing), "no run found")
        assert not (tmp_path.parent / "runs_summary.csv").exists() and not os.path.exists(
            os.path.join(HERE, "runs_summary.csv")
        )
