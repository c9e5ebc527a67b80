"""Faults a user meets: files damaged, truncated, locked or changing (every command that reads a split names the
file in one line, and advises replacing it only when it is shown to be damaged), interrupted commands run again,
manifests that vouch only for what they list, one writer per evaluation folder, sizes and limits checked before
the work, and names outside UTF-8."""

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

import data
import eda
import evaluate
import manage_data
import pcam_files
import plot_loss
import train
from test_helpers import (
    HERE,
    download,
    is_nonblank_png,
    labels_of,
    one_line_error,
    run_main,
    tissue,
    train_args,
    wait_until,
    write_split,
)

COMMANDS = {  # name -> (main, arguments for data folder d and a scratch folder out)
    "info": (manage_data.main, lambda d, out: ["info", "--data-dir", d]),
    "prepare": (manage_data.main, lambda d, out: ["prepare", "--data-dir", d, "--out", f"{out}/prepared"]),
    "eda": (eda.main, lambda d, out: ["--data-dir", d, "--out-dir", f"{out}/eda"]),
    "train": (train.main, lambda d, out: train_args(d, f"{out}/run", "--epochs", "1")),
}


def error_of(command, data_dir, out):
    """The one line a command ends with on data_dir (it must end in one: SystemExit with a message)."""
    main, arguments = COMMANDS[command]
    with pytest.raises(SystemExit) as stop:
        main(arguments(str(data_dir), str(out)))
    message = str(stop.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def h5py_error_offsets(path, kinds=(KeyError, RuntimeError, OSError)):
    """{exception type: a byte offset in path's header whose flip makes h5py raise it while reading the file}."""
    original, found = open(path, "rb").read(), {}
    for offset in range(0, 2048, 7):
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        with open(path, "wb") as target:
            target.write(damaged)
        try:
            with h5py.File(path, "r") as h5file:
                h5file[next(iter(h5file))][()]
        except kinds as error:
            found.setdefault(type(error), offset)
    with open(path, "wb") as target:
        target.write(original)
    return found


class TestDamagedFiles:
    """A damaged header or chunk: one line naming the file, from every command that reads it."""

    @pytest.mark.parametrize("which", ["x", "y"])
    def test_a_flipped_header_byte_is_one_line_naming_the_file(self, tmp_path, which):
        data_dir = tmp_path / "data"
        write_split(data_dir, "train", tissue(64), labels_of(64, 20))
        write_split(data_dir, "valid", tissue(16), labels_of(16, 8))
        path = pcam_files.split_paths(data_dir, "train")[which == "y"]
        offsets = h5py_error_offsets(path)
        assert {KeyError, RuntimeError} <= set(offsets), offsets  # what h5py raises besides OSError
        original = open(path, "rb").read()
        for kind, offset in offsets.items():
            content = bytearray(original)
            content[offset] ^= 0xFF
            with open(path, "wb") as target:
                target.write(content)
            for command in COMMANDS:
                message = error_of(command, data_dir, tmp_path)
                assert f": error: {path} is " in message and "remove it, then download or copy it again" in message
                if kind is not OSError:  # its type as h5py raised it where the command read: KeyError, RuntimeError...
                    assert f"{path} is damaged: h5py cannot read it (" in message, message
        with open(path, "wb") as target:
            target.write(original)

    @pytest.mark.parametrize(
        "images, fragment",
        [
            (np.float32(0), "{x}: 'x' has shape (); expected (images, 96, 96, 3)"),
            (np.zeros(2 * 27648), "{x}: 'x' has shape (55296,); expected (images, 96, 96, 3)"),
            (np.zeros((64, 3, 96, 96)), "{x}: 'x' has shape (64, 3, 96, 96); expected (images, 96, 96, 3)"),
            (tissue(63), "{x} has 63 images but"),
        ],
        ids=["scalar", "flat", "chw", "a-row-short"],
    )
    def test_x_of_another_shape_is_named_as_such_not_as_damage(self, tmp_path, images, fragment):
        data_dir = tmp_path / "data"
        x_path, _ = write_split(data_dir, "train", tissue(64), labels_of(64, 20))
        write_split(data_dir, "valid", tissue(16), labels_of(16, 8))
        with h5py.File(x_path, "w") as h5file:
            h5file.create_dataset("x", data=images)
        for command in COMMANDS:
            assert fragment.format(x=x_path) in error_of(command, data_dir, tmp_path)

    def test_a_damaged_compressed_chunk_of_a_label_file_is_named(self, tmp_path):
        write_split(tmp_path, "train", tissue(64), labels_of(64, 20))
        write_split(tmp_path, "valid", tissue(16), labels_of(16, 8))
        y_path = pcam_files.split_paths(tmp_path, "train")[1]
        with h5py.File(y_path, "w") as h5file:
            h5file.create_dataset("y", data=labels_of(64, 20), chunks=(64, 1, 1, 1), compression="gzip")
        with h5py.File(y_path, "r") as h5file:
            chunk = h5file["y"].id.get_chunk_info(0)
        with open(y_path, "r+b") as target:
            target.seek(chunk.byte_offset + chunk.size // 2)
            target.write(b"\xff\x00\xff")
        for command in ("info", "train"):
            message = error_of(command, tmp_path, tmp_path / "out")
            assert f"{y_path} is damaged: h5py cannot read it (OSError" in message, message

    def test_evaluate_names_a_damaged_test_file(self, synth_dir, straight_run, tmp_path):
        data_dir = tmp_path / "data"
        shutil.copytree(synth_dir, data_dir)
        x_path = pcam_files.split_paths(data_dir, "test")[0]
        with open(x_path, "r+b") as target:
            target.write(b"\x00" * 8)  # the HDF5 signature gone
        with pytest.raises(SystemExit) as stop:
            evaluate.main(
                [str(straight_run / "best.pt"), "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "e")]
            )
        assert f"{x_path} is not a readable HDF5 file (" in str(stop.value.code)
        assert not (tmp_path / "e").exists()


class TestBusyAndChangingFiles:
    """A file another process holds or cuts short: named, and not called damaged when it is whole."""

    def test_a_split_replaced_under_a_streaming_reader_is_named(self, tmp_path):
        write_split(tmp_path, "train", tissue(64), labels_of(64, 20))
        dataset = data.load_split(tmp_path, "train")
        dataset[np.arange(8)]
        write_split(tmp_path, "train", tissue(64, seed=4), labels_of(64, 40))  # synth --force, a new download
        with pytest.raises(pcam_files.UserError, match="changed while being read .* no longer match the labels"):
            dataset[np.arange(8)]

    @pytest.mark.parametrize("preload", [False, True])
    def test_a_split_replaced_during_the_filter_pass_is_named(self, tmp_path, monkeypatch, preload):
        write_split(tmp_path, "train", tissue(64), labels_of(64, 20))
        monkeypatch.setattr(pcam_files, "BLOCK_BYTES", 16 * pcam_files.IMAGE_BYTES)
        filter_block = data.outlier_rows

        def replaced_at_the_first_block(block, *thresholds):
            if not os.path.exists(tmp_path / "new"):  # a new copy moved into place, as `mv` does
                os.mkdir(tmp_path / "new")
                for path in write_split(tmp_path / "new", "train", tissue(64, seed=4), labels_of(64, 40)):
                    os.replace(path, tmp_path / os.path.basename(path))
            return filter_block(block, *thresholds)

        monkeypatch.setattr(data, "outlier_rows", replaced_at_the_first_block)
        with pytest.raises(pcam_files.UserError, match="changed while being read .* no longer match the labels"):
            data.load_split(tmp_path, "train", filter_data=True, preload=preload)

    def test_what_h5py_says_of_locks_and_filters_is_not_called_damage(self):
        for text, fragment in (
            (
                "Unable to synchronously open file (unable to lock file, errno = 11, error message = 'x')",
                "is locked by",
            ),
            (
                "Unable to synchronously open file (unable to lock file, errno = 37, error message = 'x')",
                "set HDF5_USE",
            ),
            ("Can't synchronously read data (required filter 'blosc' is not registered)", "an HDF5 filter this h5py"),
        ):
            message = str(pcam_files.file_problem("f.h5", OSError(text)))
            assert fragment in message and "remove it" not in message, message

    def test_a_file_held_open_for_writing_elsewhere_is_locked_not_damaged(self, synth_dir, tmp_path, capsys):
        data_dir = tmp_path / "data"
        shutil.copytree(synth_dir, data_dir)
        y_path = pcam_files.split_paths(data_dir, "valid")[1]
        holder = subprocess.Popen(  # a notebook with the file open in "a" mode
            [
                sys.executable,
                "-c",
                f"import h5py; f = h5py.File({str(y_path)!r}, 'a'); print('open', flush=True); input()",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "open"
            for command in ("info", "train", "eda"):
                message = error_of(command, data_dir, tmp_path)
                assert f"{y_path} is locked by another process that has it open for writing" in message, message
                assert "remove it" not in message and "damaged" not in message.replace(
                    "nothing shows the file is damaged", ""
                )
        finally:
            holder.communicate("\n", timeout=60)
        capsys.readouterr()
        manage_data.main(["info", "--data-dir", str(data_dir)])  # intact: once let go, it reads
        assert capsys.readouterr().out.count(" 512 ") == 1  # the valid split's rows

    def test_a_training_file_truncated_under_a_streaming_run_with_workers_is_one_line(self, tmp_path):
        write_split(tmp_path, "train", tissue(3000, seed=1), labels_of(3000, 1000))
        write_split(tmp_path, "valid", tissue(64, seed=2), labels_of(64, 32))
        x_path = pcam_files.split_paths(tmp_path, "train")[0]
        flags = ("--epochs", "100", "--data-on-device", "no", "--num-workers", "2", "--log-every", "1")
        process = subprocess.Popen(
            [sys.executable, "train.py", *train_args(tmp_path, tmp_path / "run", *flags)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: (tmp_path / "run" / "last.pt").exists(), 300, "the run's first checkpoint")
        with open(x_path, "r+b") as x_file:  # in place, as a copy started over the file would
            x_file.truncate(os.path.getsize(x_path) // 3)
        out, err = process.communicate(timeout=600)
        assert process.returncode == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"{x_path} changed while being read" in err and "manage_data.py verify" in err


def test_the_whole_file_passes_stop_at_a_file_cut_short_under_them(tmp_path, monkeypatch):
    x_path, _ = write_split(tmp_path, "train", tissue(64), labels_of(64, 20))
    monkeypatch.setattr(pcam_files, "BLOCK_BYTES", 16 * pcam_files.IMAGE_BYTES)
    blocks = pcam_files.iter_raw_blocks(x_path)
    next(blocks)
    with open(x_path, "r+b") as x_file:
        x_file.truncate(os.path.getsize(x_path) // 2)
    with pytest.raises(pcam_files.UserError, match="shrank to"):
        for _ in blocks:
            pass


class TestRunTheSameCommandAgain:
    """Every "run the same command again" works: an interrupted synth, a complete run that lost its metrics.csv."""

    def test_an_interrupted_synth_writes_its_set_anew_when_run_again(self, tmp_path, monkeypatch, capsys):
        command = ["synth", "--data-dir", str(tmp_path / "set"), "--n-train", "64", "--n-valid", "32", "--n-test", "32"]
        write_split_for_real = manage_data.write_synth_split

        def stopped_at_valid(data_dir, split, *args):
            if split == "valid":
                raise KeyboardInterrupt  # Ctrl-C while the second split is written
            write_split_for_real(data_dir, split, *args)

        monkeypatch.setattr(manage_data, "write_synth_split", stopped_at_valid)
        with pytest.raises(SystemExit) as stop:
            manage_data.main(command)
        assert stop.value.code == 130 and "run the same command again" in capsys.readouterr().err
        assert os.path.exists(pcam_files.split_paths(tmp_path / "set", "train")[0])
        with pytest.raises(SystemExit) as stop:  # nothing trains on the half of a set
            train.main(train_args(tmp_path / "set", tmp_path / "run", "--epochs", "1"))
        assert "holds a synthetic set that an interrupted synth left half written" in str(stop.value.code)
        monkeypatch.setattr(manage_data, "write_synth_split", write_split_for_real)
        manage_data.main(command)  # as make demo's synth runs it: no --force
        assert "holds the half-written set of an interrupted synth; writing it anew" in capsys.readouterr().out
        manage_data.main([*command[:2], str(tmp_path / "straight"), *command[3:]])
        for split in pcam_files.SPLITS:
            pairs = zip(*(pcam_files.split_paths(tmp_path / d, split) for d in ("set", "straight")), strict=True)
            for again, straight in pairs:
                with h5py.File(again) as one, h5py.File(straight) as other:
                    key = next(iter(one))
                    assert np.array_equal(one[key][()], other[key][()]), again
        with pytest.raises(SystemExit) as stop:  # a complete set is kept: overwriting it needs --force
            manage_data.main(command)
        assert "already holds PCAM split files" in str(stop.value.code)

    def test_a_complete_run_resumed_after_losing_metrics_csv_writes_it_again(self, straight_run, tmp_path, capsys):
        run = tmp_path / "run"
        shutil.copytree(straight_run, run)
        kept = (run / "metrics.csv").read_text()
        (run / "metrics.csv").unlink()
        train.main(["--out-dir", str(run), "--resume"])
        assert "metrics.csv was missing: written again from" in capsys.readouterr().out
        assert (run / "metrics.csv").read_text() == kept

    @pytest.mark.parametrize("make", [os.mkfifo, os.mkdir], ids=["fifo", "folder"])
    def test_a_resume_refuses_a_metrics_csv_that_is_not_a_file_and_leaves_it(self, straight_run, tmp_path, make):
        run = tmp_path / "run"
        shutil.copytree(straight_run, run)
        (run / "metrics.csv").unlink()
        make(run / "metrics.csv")
        signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the resume waited on metrics.csv"))
        signal.alarm(60)  # a FIFO opened for reading waits for a writer
        try:
            one_line_error(run_main("train.py", "--out-dir", str(run), "--resume"), "metrics.csv is not a regular")
        finally:
            signal.alarm(0)
        assert not (run / "metrics.csv").is_file() and not (run / "metrics.csv.old").exists()


def test_a_manifest_vouches_only_for_the_split_files_it_lists(tmp_path, capsys):
    write_split(tmp_path, "train", tissue(64), labels_of(64, 20))
    write_split(tmp_path, "valid", tissue(16), labels_of(16, 8))
    manage_data.main(["manifest", "--data-dir", str(tmp_path)])
    write_split(tmp_path, "test", tissue(16, seed=5), labels_of(16, 8))  # added beside the 4 it lists
    unlisted = "camelyonpatch_level_2_split_test_x.h5 (present, not in the manifest)"
    for main, arguments in (
        (manage_data.main, ["verify", "--data-dir", str(tmp_path)]),
        (train.main, train_args(tmp_path, tmp_path / "run", "--epochs", "1")),
    ):
        with pytest.raises(SystemExit) as stop:
            main(arguments)
        assert unlisted in str(stop.value.code) and "manage_data.py manifest" in str(stop.value.code)
    assert not (tmp_path / "run" / "metrics.csv").exists()
    manage_data.main(["manifest", "--data-dir", str(tmp_path)])
    manage_data.main(["verify", "--data-dir", str(tmp_path)])
    assert "verify: all 6 files match" in capsys.readouterr().out


def test_a_second_evaluate_py_into_the_same_folder_refuses_while_the_first_writes(straight_run, synth_dir, tmp_path):
    out_dir = tmp_path / "evaluation"
    out_dir.mkdir()
    holder = subprocess.Popen(  # an evaluate.py at work in out_dir: its lock held, as hold_lock holds it
        [sys.executable, "-c", HOLDER, str(out_dir / evaluate.LOCK_NAME)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(SystemExit) as stop:
            evaluate.main([str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--out-dir", str(out_dir)])
        message = str(stop.value.code)
        assert f"{out_dir} is being written by another evaluate.py (PID {holder.pid} on " in message, message
        assert os.listdir(out_dir) == [evaluate.LOCK_NAME]
    finally:
        holder.communicate(b"\n", timeout=60)
    evaluate.main([str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--out-dir", str(out_dir)])
    assert sorted(os.listdir(out_dir)) == sorted([*evaluate.OUTPUT_FILES, evaluate.LOCK_NAME])
    (tmp_path / "live").mkdir()  # a refusal removes the folder it made
    with open(tmp_path / "live" / "train.lock", "w") as lock:  # a run at work there
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as stop:
            evaluate.main(
                [
                    str(straight_run / "best.pt"),
                    "--data-dir",
                    str(synth_dir),
                    "--out-dir",
                    str(tmp_path / "live" / "eval"),
                ]
            )
    assert "still training" in str(stop.value.code) and os.listdir(tmp_path / "live") == ["train.lock"]


HOLDER = """
import fcntl, os, socket, sys
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.write(f"PID {os.getpid()} on {socket.gethostname()}\\n")
lock.flush()
print("held", flush=True)
sys.stdin.readline()
"""


class TestLimits:
    """Sizes and limits found before the work: synth's room, the process limit for loader workers."""

    def test_synth_refuses_a_set_that_cannot_fit_before_writing_anything(self, tmp_path, monkeypatch):
        folder = tmp_path / "set"
        with pytest.raises(SystemExit) as stop:  # 25 PiB: no disk holds it
            manage_data.main(["synth", "--data-dir", str(folder), "--n-train", str(10**12)])
        assert "images needs 25,750,137.9 GiB but " in str(stop.value.code) and f"free on {tmp_path};" in str(
            stop.value.code
        )
        monkeypatch.setattr(data, "free_memory", lambda: (9 * 4096 - 1, "MemAvailable"))
        with pytest.raises(SystemExit) as stop:  # labels and draw order: 9 bytes an image of the largest split
            manage_data.main(["synth", "--data-dir", str(folder), "--n-train", "4096", "--n-valid", "64"])
        assert "free under MemAvailable; ask for fewer images" in str(stop.value.code)
        assert not folder.exists()
        monkeypatch.setattr(data, "free_memory", lambda: (9 * 4096, "MemAvailable"))
        manage_data.main(["synth", "--data-dir", str(folder), "--n-train", "4096", "--n-valid", "64", "--n-test", "0"])

    @pytest.mark.parametrize("started", [0, 1])
    def test_loader_workers_that_cannot_start_name_num_workers(self, small_set, tmp_path, monkeypatch, started):
        forks, fork = [], os.fork

        def process_limit_reached():  # after `started` forks, what fork raises at ulimit -u
            forks.append(1)
            if len(forks) > started:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            return fork()

        unraisable = []
        monkeypatch.setattr(os, "fork", process_limit_reached)
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # "Exception ignored in ..." lines
        flags = ("--epochs", "1", "--num-workers", "2", "--data-on-device", "no")
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(small_set, tmp_path / "run", *flags))
        message = str(stop.value.code)
        assert message.startswith("train.py: error: cannot start 2 loader worker processes (Resource temporarily")
        assert "pass a smaller --num-workers" in message and "\n" not in message and unraisable == []


def test_a_run_folder_named_outside_utf_8_completes_and_is_shown_safely(small_set, tmp_path, capsys):
    run = os.path.join(tmp_path, os.fsdecode(b"run-\xe9"))  # a Latin-1 byte: a name from an older system
    train.main(train_args(small_set, run, "--epochs", "1"))
    assert json.loads(open(os.path.join(run, "run.json")).read())["status"] == "done"
    assert is_nonblank_png(os.path.join(run, "loss.png"))
    out = capsys.readouterr().out
    assert "done: " in out and "run-\\xe9" in out  # as `ls -b` shows it
    with open(os.devnull, "w", encoding="utf-8") as strict:  # a UTF-8 log file takes every line
        strict.write(out)
    plot_loss.main(["--table", str(tmp_path / "*")])
    assert "run-\\xe9" in capsys.readouterr().out


class TestARunHoldsToItsData:
    """A run records the data it starts on (data.data_identity) and holds to it: resumed, and when it scores."""

    def test_a_resume_on_a_set_made_anew_at_the_same_path_is_refused(self, tmp_path, capsys):
        options = ["--n-train", "256", "--n-valid", "64", "--n-test", "64"]
        manage_data.main(["synth", "--data-dir", str(tmp_path / "data"), *options])
        train.main(train_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))
        manage_data.main(["synth", "--data-dir", str(tmp_path / "data"), *options, "--seed", "1", "--force"])
        kept = (tmp_path / "run" / "metrics.csv").read_text()
        with pytest.raises(SystemExit) as stop:
            train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--epochs", "2", "--device", "cpu"])
        message = str(stop.value.code)
        assert f"--resume: {tmp_path / 'data'} does not hold the data this run started on: " in message, message
        assert "train labels and images differ (256 rows then, 256 now)" in message and "\n" not in message
        assert (tmp_path / "run" / "metrics.csv").read_text() == kept
        manage_data.main(["synth", "--data-dir", str(tmp_path / "data"), *options, "--force"])  # the same set again
        train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--epochs", "2", "--device", "cpu"])
        assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3

    def test_a_resume_finds_its_folder_from_any_directory_and_names_it_when_gone(
        self, synth_dir, tmp_path, monkeypatch, capsys
    ):
        shutil.copytree(synth_dir, tmp_path / "data")
        monkeypatch.chdir(tmp_path)
        train.main(train_args("data", "run", "--epochs", "1"))  # a relative --data-dir
        monkeypatch.chdir(tmp_path / "run")
        monkeypatch.setenv("PCAM_DIR", str(synth_dir))  # another folder, whose data happens to be the same
        train.main(["--out-dir", ".", "--resume", "--epochs", "2", "--device", "cpu"])
        assert json.loads(open("run.json").read())["args"]["data_dir"] == str(tmp_path / "data")
        (tmp_path / "data").rename(tmp_path / "moved")
        with pytest.raises(SystemExit) as stop:
            train.main(["--out-dir", ".", "--resume", "--epochs", "3", "--device", "cpu"])
        assert f"--resume: this run trained on {tmp_path / 'data'}, which is not there now" in str(stop.value.code)
        train.main(["--out-dir", ".", "--resume", "--epochs", "3", "--device", "cpu", "--data-dir", "../moved"])

    def test_a_test_split_replaced_while_the_run_trains_is_not_scored(self, small_set, tmp_path, monkeypatch, capsys):
        train_epochs = train.train_epochs

        def then_replaced(session):
            train_epochs(session)
            write_split(small_set, "test", tissue(64, seed=9), labels_of(64, 30))  # new files, same size

        monkeypatch.setattr(train, "train_epochs", then_replaced)
        train.main(train_args(small_set, tmp_path / "run", "--epochs", "1"))
        assert "test: not scored: the test split in " in capsys.readouterr().out
        record = json.loads((tmp_path / "run" / "run.json").read_text())
        assert record["status"] == "done" and record["test"] is None
        assert not (tmp_path / "run" / "eval-test").exists()


def test_a_resumed_run_starting_up_is_running_whatever_its_last_attempt_recorded(straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    assert plot_loss.summarize_run(str(run))["status"] == "interrupted"
    with open(run / "train.lock", "w") as lock:  # train.py --resume at work, loading its data
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert plot_loss.summarize_run(str(run))["status"] == "running"


def test_a_folder_that_cannot_be_listed_counts_as_a_run_to_show_as_unreadable(tmp_path, monkeypatch):
    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(plot_loss.os, "listdir", refused)
    assert plot_loss.is_run(str(tmp_path))


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:abc", "http://127.0.0.1:99999/f", "http://h:0/f", "http://my mirror/f", "https://[::1", "http://",
     "http:///files", "ftp://host/files", "http://user:pw@host/f", "http://host/f?x=1", "http://host/f#top",
     "http://[::1%lo]:80/f", "http://host/f\u00a0", "http://d\u00e4.example/f"],
)  # fmt: skip
def test_download_refuses_a_base_url_no_request_can_go_to_before_any_attempt(tmp_path, url):
    result = run_main("manage_data.py", "download", "--data-dir", str(tmp_path / "data"), "--base-url", url)
    one_line_error(result, f"--base-url {url!r} is not an http:// or https:// URL")
    assert "attempt" not in result.stdout and not (tmp_path / "data").exists()


@pytest.mark.download
def test_download_retries_a_reply_that_is_not_http_and_takes_one_without_a_usable_length(pcam_server, tmp_path):
    pcam_server.garble_once.add("camelyonpatch_level_2_split_valid_y.h5.gz")
    pcam_server.bad_length.add("camelyonpatch_level_2_split_valid_x.h5.gz")
    result = download(pcam_server, tmp_path / "data", "valid")
    assert result.returncode == 0, result.stderr
    retried = "download interrupted (the reply is not HTTP: 'SSH-2.0-not-http'; is the port or the scheme wrong?); "
    assert f"{retried}retrying (attempt 2 of 5)\n" in result.stdout and not pcam_server.garble_once
    for key, path in zip("xy", pcam_files.split_paths(tmp_path / "data", "valid"), strict=True):
        with h5py.File(path) as mine, h5py.File(pcam_server.source / os.path.basename(path)) as served:
            assert np.array_equal(mine[key][()], served[key][()]), key
