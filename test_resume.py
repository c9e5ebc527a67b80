"""train.py stopped (signals, time limits, Ctrl-C, a killed process) and resumed: a resumed run equals the run
that was never stopped, its checkpoints load anywhere, and a resume refuses what it cannot continue."""

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import common
import data
import evaluate
import pcam_files
import plot_loss
import run_folder
import train
from model import MLP
from test_helpers import (
    HERE,
    assert_same_weights,
    labels_of,
    linked_set,
    loss_columns,
    one_line_error,
    read_csv_rows,
    run_main,
    save_checkpoint,
    start_run,
    tissue,
    train_args,
    train_until,
    write_split,
)

# the loader path, with DataLoader workers, for the signal tests
WORKER_FLAGS = ["--num-workers", "2", "--data-on-device", "no"]


# 192 steps: a signal sent at step 10 reaches the run long before its first epoch ends, however busy the machine
LONG_EPOCH = ["--batch-size", "8"]


def signal_at(args, marker, signum, env=None):
    """Send train.py signum once it has logged marker; (exit code, the rest of its log)."""
    process = train_until(args, marker, env)
    process.send_signal(signum)
    output = process.stdout.read()
    return process.wait(timeout=120), output


class TestStopAndResume:
    """train.py: a stopped or failed run keeps its last good state and resumes to the same result."""

    def test_a_checkpoints_rng_state_replays_every_generator(self, small_set, tmp_path):
        train_loader, _ = data.get_dataloaders(small_set, batch_size=8)
        device = torch.device("cpu")

        def draws():
            labels = next(iter(train_loader))[1]  # the sampler's draws
            worker_seed = torch.randint(2**31, (1,), generator=train_loader.generator).item()  # what workers get
            return [random.random(), np.random.rand(), torch.rand(1).item(), labels.tolist(), worker_seed]

        run_folder.seed_everything(4)
        state = run_folder.rng_state(data.generators(train_loader), device)
        first = draws()
        save_checkpoint({"model": {}, "model_args": {}, "rng": state}, tmp_path / "last.pt")
        restored = run_folder.load_checkpoint(tmp_path / "last.pt")["rng"]  # as a resumed run reads it
        run_folder.seed_everything(5)
        run_folder.restore_rng_state(restored, data.generators(train_loader), device)
        assert draws() == first
        run_folder.seed_everything(4)
        assert [random.random(), np.random.rand(), torch.rand(1).item()] == first[:3]

    def test_stopping_after_epoch_1_and_resuming_equals_a_straight_run(self, synth_dir, straight_run, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "split", "--epochs", "1"))
        run_id = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["run_id"]
        (tmp_path / "split" / "run.json").unlink()  # lost: the run goes on, its id taken from its checkpoint
        train.main(["--out-dir", str(tmp_path / "split"), "--data-dir", str(synth_dir), "--resume", "--epochs", "3"])
        assert json.loads((tmp_path / "split" / "run.json").read_text())["run_id"] == run_id
        assert loss_columns(tmp_path / "split") == loss_columns(straight_run)
        assert_same_weights(tmp_path / "split", straight_run)

    def test_resume_auto_starts_in_an_empty_out_dir_then_continues_from_its_last_pt(
        self, synth_dir, straight_run, tmp_path, capsys
    ):
        (tmp_path / "run").mkdir()
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1", "--resume", "auto"))
        assert "resuming" not in capsys.readouterr().out
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "3", "--resume", "auto"))
        assert f"resuming {tmp_path / 'run'} after epoch 1" in capsys.readouterr().out
        assert loss_columns(tmp_path / "run") == loss_columns(straight_run)
        assert_same_weights(tmp_path / "run", straight_run)
        assert train.parse_args(["--resume", "auto", "--resume"]).resume is True  # train_job.sh's, then the user's

    def test_sigterm_mid_epoch_then_resume_matches(self, synth_dir, straight_run, tmp_path):
        args = train_args(synth_dir, tmp_path / "killed", "--epochs", "3")
        exit_code, output = signal_at(args, "epoch 2/3 step 10/", signal.SIGTERM)
        assert exit_code == 75, output
        assert "stopped by SIGTERM" in output and "epoch 2/3 train_loss" not in output
        assert len(read_csv_rows(tmp_path / "killed" / "metrics.csv")) == 1
        resumed = run_main("train.py", *args, "--resume", check=True)
        assert "resuming" in resumed.stdout
        assert loss_columns(tmp_path / "killed") == loss_columns(straight_run)
        assert_same_weights(tmp_path / "killed", straight_run)

    def test_sigusr1_outside_slurm_stops_after_the_step_with_exit_75(self, synth_dir, tmp_path):
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "2", *LONG_EPOCH)
        outside_slurm = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
        exit_code, output = signal_at(args, "epoch 1/2 step 10/", signal.SIGUSR1, env=outside_slurm)
        assert exit_code == 75, output
        assert "stopped by SIGUSR1" in output and "epoch 1/2 train_loss" not in output
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0

    def test_resident_path_stops_after_epoch_1_and_resumes_exactly(self, synth_dir, straight_run, tmp_path, capsys):
        train.main(train_args(synth_dir, tmp_path / "split", "--epochs", "1", "--data-on-device", "yes"))
        train.main(train_args(synth_dir, tmp_path / "split", "--resume", "--epochs", "3", "--data-on-device", "yes"))
        assert capsys.readouterr().out.count("data path: device (") == 2
        assert loss_columns(tmp_path / "split") == loss_columns(straight_run)
        assert_same_weights(tmp_path / "split", straight_run)

    @pytest.mark.parametrize(
        "signal_name, exit_code, status",
        [("SIGTERM", 75, "stopped"), ("SIGUSR1", 75, "stopped"), ("SIGINT", 130, "interrupted")],
    )
    def test_a_signal_to_the_process_group_with_workers_stops_cleanly(
        self, synth_dir, tmp_path, signal_name, exit_code, status
    ):
        process = start_run(train_args(synth_dir, tmp_path / "run", "--epochs", "50", *WORKER_FLAGS, *LONG_EPOCH))
        os.killpg(process.pid, getattr(signal, signal_name))  # what scancel, preemption and Ctrl-C do
        output = process.stdout.read()
        assert process.wait(timeout=120) == exit_code, output
        assert "Traceback" not in output and "Error" not in output
        assert len([line for line in output.splitlines() if line.startswith(("stopped by", "interrupted by"))]) == 1
        if exit_code == 75:
            assert f"stopped by {signal_name}" in output
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == status

    @pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
    def test_a_signal_during_the_start_up_pass_stops_before_training_and_leaves_nothing(
        self, tmp_path, signum, exit_code
    ):
        rows = 1000  # float32, one gzip chunk per image: the filter pass takes a while
        write_split(
            tmp_path,
            "train",
            tissue(rows, dtype=np.float32),
            labels_of(rows, 400),
            chunks=(1, 96, 96, 3),
            compression="gzip",
        )
        write_split(tmp_path, "valid", tissue(64), labels_of(64, 20))
        run_dir = tmp_path / "run"
        process = train_until(train_args(tmp_path, run_dir, "--epochs", "1", "--filter-data"), "data path:")
        process.send_signal(signum)
        output = process.stdout.read()
        assert process.wait(timeout=120) == exit_code, output
        assert "Traceback" not in output and "step 1/" not in output
        assert ("interrupted by SIGINT; nothing was trained" in output) == (signum == signal.SIGINT)
        assert not run_dir.exists()  # nothing trained: the folder this run made goes again

    def test_a_validation_loss_over_ten_times_chance_stops_the_run_as_diverged(self):
        model = MLP()
        train.check_diverged(model, 0.99 * train.DIVERGED_LOSS, 3)  # high, but under the bound
        with pytest.raises(FloatingPointError, match=r"7 in epoch 3, over 6\.93 \(ten times .* ln 2\)"):
            train.check_diverged(model, 7.0, 3)

    def test_a_second_ctrl_c_stops_at_once(self, synth_dir, tmp_path):
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            stop = train.StopRequest()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_name == "SIGINT"  # the first asks for a stop after the step
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        process = train_until(train_args(synth_dir, tmp_path / "run", "--epochs", "50", *LONG_EPOCH), " step 10/")
        process.send_signal(signal.SIGINT)
        output = ""
        for line in process.stdout:
            output += line
            if "received SIGINT" in line:
                process.send_signal(signal.SIGINT)
        output += process.stdout.read()
        assert process.wait(timeout=120) == 130, output
        assert "Traceback" not in output and "interrupted by SIGINT" in output
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0

    def test_an_error_mid_epoch_with_workers_exits_promptly_in_one_line(self, tmp_path):
        rows = 3000
        images = np.broadcast_to((60 + np.arange(rows) % 140).astype(np.uint8)[:, None, None, None], (rows, 96, 96, 3))
        x_path, _ = write_split(
            tmp_path,
            "train",
            np.ascontiguousarray(images),
            labels_of(rows, 1200),
            chunks=(1, 96, 96, 3),
            compression="gzip",
        )
        write_split(tmp_path, "valid", tissue(64), labels_of(64, 20))
        read_up_front = set(np.linspace(0, rows - 1, data.NORMALIZATION_SAMPLE).astype(np.int64)) | set(
            np.linspace(0, rows - 1, pcam_files.SCALE_SAMPLE_ROWS).astype(np.int64)
        )
        with h5py.File(x_path, "r") as h5file:  # every row only training batches read: the first batch fails
            chunks = [h5file["x"].id.get_chunk_info(row) for row in sorted(set(range(rows)) - read_up_front)]
        with open(x_path, "r+b") as x_file:
            for chunk in chunks:
                x_file.seek(chunk.byte_offset)
                x_file.write(b"\xff" * chunk.size)
        args = train_args(tmp_path, tmp_path / "run", "--epochs", "1", *WORKER_FLAGS)
        try:
            result = subprocess.run(
                [sys.executable, "train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=120
            )
        except subprocess.TimeoutExpired:
            pytest.fail("train.py did not exit within 120 s of a read error in a worker")
        one_line_error(result, "train_x.h5")

    def test_one_run_per_folder(self, synth_dir, tmp_path):
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "50")
        first = start_run(args)
        try:
            for extra in ([], ["--resume"]):
                one_line_error(run_main("train.py", *args, *extra), f"PID {first.pid} on {socket.gethostname()}")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
        epoch = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"]
        resumed = run_main(
            "train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", str(epoch + 1)), "--resume", check=True
        )
        assert f"resuming {tmp_path / 'run'} after epoch {epoch}" in resumed.stdout  # the killed run left no lock

    def test_a_users_own_file_named_like_a_lock_is_refused_and_kept(self, synth_dir, tmp_path):
        (tmp_path / "run").mkdir()
        for command, lock in (
            (["train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", "1")], tmp_path / "run" / "train.lock"),
            (["manage_data.py", "synth", "--data-dir", str(tmp_path)], tmp_path / "pcam.lock"),
        ):
            lock.write_text("notes of mine\n")
            one_line_error(run_main(*command), f"{lock} is not a lock file of this project")
            assert lock.read_text() == "notes of mine\n"
        assert sorted(os.listdir(tmp_path)) == ["pcam.lock", "run"] and os.listdir(tmp_path / "run") == ["train.lock"]

    def test_temporary_files_carry_the_writers_pid(self, synth_dir, tmp_path):
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        others = [run_dir / f"{name}.partial" for name in ("last.pt", "best.pt", "metrics.csv", "run.json")]
        for path in others:
            path.write_text("another writer's file")
        train.main(train_args(synth_dir, run_dir, "--epochs", "1"))
        assert [path.read_text() for path in others] == ["another writer's file"] * 4
        assert len(read_csv_rows(run_dir / "metrics.csv")) == 1

    def test_a_checkpoint_write_that_fails_part_way_keeps_the_previous_one(self, tmp_path):
        path = tmp_path / "last.pt"
        save_checkpoint({"epoch": 1, "weights": torch.arange(1000.0)}, path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        on_oversize = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
        try:
            with pytest.raises((OSError, RuntimeError, common.UserError)):
                save_checkpoint({"epoch": 2, "weights": torch.zeros(1_000_000)}, path)  # 4 MB
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, on_oversize)
        previous = torch.load(path, weights_only=True)
        assert previous["epoch"] == 1 and torch.equal(previous["weights"], torch.arange(1000.0))
        assert os.listdir(tmp_path) == ["last.pt"]

    def test_checkpoints_hold_cpu_tensors_and_say_where_they_were_written(self, synth_dir, straight_run, tmp_path):
        def tensors(value):
            if isinstance(value, dict):
                return [t for item in value.values() for t in tensors(item)]
            if isinstance(value, (list, tuple)):
                return [t for item in value for t in tensors(item)]
            return [value] if isinstance(value, torch.Tensor) else []

        for name in ("last.pt", "best.pt"):
            checkpoint = torch.load(straight_run / name, weights_only=True)
            assert len(tensors(checkpoint)) > 10 and {t.device.type for t in tensors(checkpoint)} == {"cpu"}
            assert checkpoint["written_on"] == {
                "device": "cpu",
                "device_name": json.loads((straight_run / "run.json").read_text())["environment"]["device"],
                "cuda": torch.version.cuda,
                "torch": torch.__version__,
            }
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        elsewhere = {**last["written_on"], "device": "cuda", "device_name": "NVIDIA A100", "cuda": "12.8"}
        save_checkpoint({**last, "written_on": elsewhere}, tmp_path / "run" / "last.pt")
        resumed = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2"))
        assert resumed.returncode == 0, resumed.stderr
        note = "checkpoint written with device cuda, device_name NVIDIA A100, cuda 12.8, resumed with device cpu"
        assert f"{note}, device_name " in resumed.stdout and "results need not match bit for bit" in resumed.stdout
        same_place = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "3"))
        assert same_place.returncode == 0 and "checkpoint written with" not in same_place.stdout

    def test_a_cpu_run_never_touches_cuda_even_where_cuda_is_available(self, synth_dir, tmp_path, monkeypatch):
        calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "init"):
            monkeypatch.setattr(torch.cuda, name, lambda *args, name=name, **kwargs: calls.append(name))
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "2", "--resume"))
        assert calls == [] and not torch.cuda.is_initialized()
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 2

    def test_a_bf16_run_resumed_equals_an_uninterrupted_bf16_run(self, synth_dir, straight_run, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "straight", "--epochs", "2", "--bf16"))
        train.main(train_args(synth_dir, tmp_path / "split", "--epochs", "1", "--bf16"))
        train.main(train_args(synth_dir, tmp_path / "split", "--epochs", "2", "--resume"))  # no --bf16: the run's own
        assert loss_columns(tmp_path / "split") == loss_columns(tmp_path / "straight")
        assert_same_weights(tmp_path / "split", tmp_path / "straight")
        assert json.loads((tmp_path / "split" / "run.json").read_text())["args"]["bf16"] is True
        assert loss_columns(tmp_path / "straight")[0] != loss_columns(straight_run)[0]  # bf16 did apply
        evaluate.main(
            [
                str(tmp_path / "straight" / "best.pt"),
                "--data-dir",
                str(synth_dir),
                "--out-dir",
                str(tmp_path / "eval"),
                "--batch-size",
                "64",
            ]
        )
        by_train, by_evaluate = (
            json.loads((folder / "metrics.json").read_text())
            for folder in (tmp_path / "straight" / "eval-test", tmp_path / "eval")
        )
        assert {k: by_train[k] for k in ("loss", "accuracy", "auc", "confusion")} == {
            k: by_evaluate[k] for k in ("loss", "accuracy", "auc", "confusion")
        }

    def test_resume_refuses_an_explicit_different_bf16(self, synth_dir, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        result = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2", "--bf16"))
        one_line_error(result, "--bf16")
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 1

    @pytest.mark.parametrize("foreign", ["last.pt", "best.pt"])
    def test_resume_refuses_another_runs_checkpoint_and_changes_nothing(self, synth_dir, tmp_path, foreign):
        for name in ("mine", "other"):
            train.main(train_args(synth_dir, tmp_path / name, "--epochs", "1"))
        shutil.copy(tmp_path / "other" / foreign, tmp_path / "mine" / foreign)
        kept = {name: (tmp_path / "mine" / name).read_bytes() for name in ("metrics.csv", "best.pt", "run.json")}
        result = run_main("train.py", *train_args(synth_dir, tmp_path / "mine", "--resume", "--epochs", "2"))
        one_line_error(result, f"{foreign} belongs to another run")
        assert {name: (tmp_path / "mine" / name).read_bytes() for name in kept} == kept

    def test_resume_refuses_a_run_json_whose_settings_were_edited(self, synth_dir, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        record = json.loads((tmp_path / "run" / "run.json").read_text())
        record["args"]["lr"] = 0.5  # the same run id, but not the settings last.pt was trained with
        (tmp_path / "run" / "run.json").write_text(json.dumps(record))
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2"))
        assert "belongs to another run than the folder's run.json (settings lr differ" in str(stop.value.code)

    @pytest.mark.parametrize(
        "damage, fragment",
        [
            ({"best.pt": None}, "best.pt is missing and the run ends by scoring it"),
            ({"run.json": None, "best.pt": {"run_id": "f" * 32}}, "best.pt belongs to another run"),
            ({"run.json": {"args": 5}}, "is damaged ('args' is not a JSON object)"),
            ({"run.json": {"resumed_at": "today"}}, "is damaged ('resumed_at' is not a JSON list)"),
            ({"run.json": None, "last.pt": {"args": {}}}, "does not record the settings batch_size, lr,"),
            ({"eval-test": "a file"}, "eval-test is not a folder as a run writes it"),
            (
                {"last.pt": "cut"},
                "last.pt (OSError): it is incomplete or not a checkpoint; put a whole copy of it back",
            ),
            (
                {"best.pt": "cut"},
                "best.pt (OSError): it is incomplete or not a checkpoint; put a whole copy of it back",
            ),
            ({"last.pt": "no epoch"}, "last.pt is not a train.py checkpoint (it lacks epoch); put a whole copy of it"),
        ],
    )
    def test_resume_refuses_a_damaged_run_folder_before_training(
        self, synth_dir, straight_run, tmp_path, damage, fragment
    ):
        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir)
        for name, change in damage.items():
            if name == "eval-test":
                shutil.rmtree(run_dir / name)
                (run_dir / name).write_text(change)
            elif change == "cut":
                (run_dir / name).write_bytes((run_dir / name).read_bytes()[:5000])
            elif change == "no epoch":
                checkpoint = torch.load(run_dir / name, weights_only=True)
                save_checkpoint({key: value for key, value in checkpoint.items() if key != "epoch"}, run_dir / name)
            elif change is None:
                (run_dir / name).unlink()
            elif name == "run.json":
                (run_dir / name).write_text(json.dumps({**json.loads((run_dir / name).read_text()), **change}))
            else:
                checkpoint = torch.load(run_dir / name, weights_only=True)
                save_checkpoint({**checkpoint, **change}, run_dir / name)
        kept = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
        one_line_error(run_main("train.py", *train_args(synth_dir, run_dir, "--resume", "--epochs", "4")), fragment)
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == kept

    def test_a_run_killed_in_its_first_epoch_leaves_the_checkpoint_of_epoch_0(self, synth_dir, tmp_path):
        process = start_run(train_args(synth_dir, tmp_path / "run", "--epochs", "1", "--batch-size", "8"))
        process.kill()  # no handler runs: only what was written before epoch 1 is there
        process.wait(timeout=120)
        assert run_folder.load_checkpoint(tmp_path / "run" / "last.pt", run_folder.CHECKPOINT_KEYS)["epoch"] == 0

    @pytest.mark.parametrize("extra", [[], ["--resume"], ["--resume", "auto"]])
    def test_a_run_killed_before_its_first_checkpoint_starts_again(self, synth_dir, tmp_path, extra):
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps({"status": "running", "run_id": "0" * 32}))
        (run_dir / run_folder.LOCK_NAME).write_text("PID 1 on a node that died\n")  # no flock held: its holder is gone
        train.main(train_args(synth_dir, run_dir, "--epochs", "1", *extra))
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
        assert len(read_csv_rows(run_dir / "metrics.csv")) == 1

    # killed between writing last.pt and metrics.csv (interrupted: by a second Ctrl-C, running: by SIGKILL), or left
    # so by the resume of an older train.py (done), and then edited by hand
    @pytest.mark.parametrize(
        "status, note", [("interrupted", b""), ("running", b""), ("done", b""), ("done", b"my note\r\n")]
    )
    def test_a_resume_writes_the_epochs_metrics_csv_lacks_from_last_pt_and_keeps_a_users_edits(
        self, straight_run, tmp_path, capsys, status, note
    ):
        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir)
        record = json.loads((run_dir / "run.json").read_text())
        (run_dir / "run.json").write_text(json.dumps({**record, "status": status}))
        cut = b"".join((run_dir / "metrics.csv").read_bytes().splitlines(keepends=True)[:-1])
        (run_dir / "metrics.csv").write_bytes(cut)
        plot_loss.plot_runs([str(run_dir)], str(run_dir / "loss.png"))  # of epochs 1 and 2
        stale_plot = (run_dir / "loss.png").read_bytes()
        (run_dir / "metrics.csv").write_bytes(cut + note)
        train.main(["--out-dir", str(run_dir), "--resume"])
        history = torch.load(run_dir / "last.pt", weights_only=True)["history"]
        assert [row["epoch"] for row in read_csv_rows(run_dir / "metrics.csv")] == [str(r["epoch"]) for r in history]
        assert (run_dir / "metrics.csv").read_bytes() == (straight_run / "metrics.csv").read_bytes()
        drawn = (run_dir / "loss.png").read_bytes()
        plot_loss.plot_runs([str(run_dir)], str(run_dir / "loss.png"))  # from the 3 epochs of metrics.csv
        assert drawn == (run_dir / "loss.png").read_bytes() != stale_plot
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
        assert f"{run_dir / 'metrics.csv'} {'differed' if note else 'lacked epochs'}" in capsys.readouterr().out
        kept = run_dir / "metrics.csv.old"
        assert kept.read_bytes() == cut + note if note else not kept.exists()

    def test_a_finished_run_continued_for_more_epochs_drops_its_test_scores_until_it_ends_again(
        self, straight_run, synth_dir, tmp_path, monkeypatch
    ):
        def interrupted(*_):
            raise KeyboardInterrupt

        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir)
        assert "test" in json.loads((run_dir / "run.json").read_text())
        monkeypatch.setattr(train, "train_one_epoch", interrupted)
        result = run_main("train.py", *train_args(synth_dir, run_dir, "--resume", "--epochs", "4"))
        record = json.loads((run_dir / "run.json").read_text())
        assert result.returncode == 130 and record["status"] == "interrupted", result.stderr
        assert "test" not in record and "best_val_loss" not in record
        row = plot_loss.summarize_run(str(run_dir))
        assert row["epochs_done"] == 3 and row["test_acc"] is None and row["test_auc"] is None

    @pytest.mark.parametrize("extra", [["--dry-run"], ["--epochs", "4"]], ids=["dry-run-writes-nothing", "more-epochs"])
    def test_a_resume_keeps_a_users_edit_of_metrics_csv_or_with_dry_run_touches_nothing(
        self, straight_run, synth_dir, tmp_path, extra
    ):
        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir)
        edited = (run_dir / "metrics.csv").read_bytes() + b"my note\r\n"
        (run_dir / "metrics.csv").write_bytes(edited)
        before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
        train.main(train_args(synth_dir, run_dir, "--resume", *extra))
        after = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
        if extra == ["--dry-run"]:
            assert after == before
        else:
            assert after["metrics.csv.old"] == edited
            assert [row["epoch"] for row in read_csv_rows(run_dir / "metrics.csv")] == ["1", "2", "3", "4"]

    def test_resume_continues_to_the_runs_epochs_never_rewinds_and_leaves_a_finished_run_alone(
        self, synth_dir, tmp_path
    ):
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "3")
        exit_code, output = signal_at(args, "epoch 3/3 step 10/", signal.SIGTERM)
        assert exit_code == 75, output
        one_line_error(
            run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "1")),
            "--epochs 1 is below the 2 epochs",
        )
        train.main(train_args(synth_dir, tmp_path / "run", "--resume"))  # no --epochs: the run's own 3
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 3

        def files():
            return {
                p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file()
            }

        before = files()
        rewound = ", past --epochs 1 (a run is never rewound)"
        for extra, past in (([], ""), (["--epochs", "3"], ""), (["--epochs", "1"], rewound)):  # 3: as make demo
            again = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", *extra), check=True)
            assert again.stdout.strip().splitlines() == [
                f"{tmp_path / 'run'}: complete, 3 of 3 epochs done{past}; nothing to do"
            ]
        assert files() == before

    def test_an_absurd_validation_loss_stops_the_run(self, synth_dir, tmp_path):
        # one SGD step per epoch at lr 100: a finite training loss, a validation loss of several hundred
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "2", "--optimizer", "sgd", "--lr", "100")
        result = run_main("train.py", *args, "--batch-size", "2048", "--dropout", "0")
        one_line_error(result, "validation loss")
        assert "epoch 1" in result.stderr and "--lr" in result.stderr
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
        assert not (tmp_path / "run" / "best.pt").exists()

    def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(self, synth_dir, tmp_path):
        result = run_main("train.py", *train_args(synth_dir, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e30"))
        one_line_error(result, "training loss became")
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0

    def test_non_finite_weights_or_validation_loss_never_reach_a_checkpoint(self, synth_dir, tmp_path):
        # one step per epoch: the step's own loss is finite, the weights it leaves behind are not
        result = run_main(
            "train.py",
            *train_args(synth_dir, tmp_path / "run", "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30"),
            "--batch-size",
            "2048",
        )
        one_line_error(result, "in epoch 1")
        last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        assert last["epoch"] == 0 and all(torch.isfinite(t).all() for t in last["model"].values())
        assert not (tmp_path / "run" / "best.pt").exists()
        record = json.loads((tmp_path / "run" / "run.json").read_text())
        assert record["status"] == "failed" and "in epoch 1" in record["error"]

    def test_resume_names_a_model_shape_mismatch(self, synth_dir, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        with pytest.raises(SystemExit) as stop:
            train.main(
                train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2", "--hidden-units", "128", "32")
            )
        assert "--hidden-units [128, 32] does not match the model shape" in str(stop.value.code)
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "2"))
        assert "already holds a run" in str(stop.value.code)

    def test_resume_auto_refuses_folders_it_cannot_continue_in_one_line_and_keeps_a_done_run(self, synth_dir, tmp_path):
        for name, files, fragment in (
            ("list", {"run.json": "[1, 2]"}, "already holds a run (run.json) but no last.pt"),
            ("foreign", {"run.json": '{"status": "stopped"}'}, "already holds a run (run.json) but no last.pt"),
            ("metrics only", {"metrics.csv": "a,b\n"}, "already holds a run (metrics.csv) but no last.pt"),
        ):
            for file_name, text in files.items():
                os.makedirs(tmp_path / name, exist_ok=True)
                (tmp_path / name / file_name).write_text(text)
            one_line_error(run_main("train.py", *train_args(synth_dir, tmp_path / name, "--resume", "auto")), fragment)
            assert os.listdir(tmp_path / name) == [file_name] and (tmp_path / name / file_name).read_text() == text
        train.main(train_args(synth_dir, tmp_path / "done", "--epochs", "1", "--lr", "0.001"))
        kept = {path.name: path.read_bytes() for path in (tmp_path / "done").iterdir() if path.is_file()}
        train.main(train_args(synth_dir, tmp_path / "done", "--epochs", "1", "--lr", "0.001", "--resume", "auto"))
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(synth_dir, tmp_path / "done", "--epochs", "1", "--lr", "0.5", "--resume", "auto"))
        assert "--lr 0.5 does not match the run in the checkpoint" in str(stop.value.code)
        assert {path.name: path.read_bytes() for path in (tmp_path / "done").iterdir() if path.is_file()} == kept

    def test_a_resumed_run_reads_the_data_it_started_on(self, synth_dir, tmp_path, monkeypatch, capsys):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        monkeypatch.setenv("PCAM_DIR", str(tmp_path / "elsewhere"))
        train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--epochs", "2", "--device", "cpu"])
        assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["dir"] == str(synth_dir)
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 2
        linked_set(synth_dir, tmp_path / "staged")
        train.main(train_args(tmp_path / "staged", tmp_path / "run", "--resume", "--epochs", "3"))
        note = f"data: continuing on --data-dir {tmp_path / 'staged'}; the run's last epoch trained on {synth_dir}"
        assert note in capsys.readouterr().out
