"""manage_data.py's commands (synth, prepare, info, manifest, verify, env) and download, the latter against a
real HTTP server on 127.0.0.1 serving files written here."""

import gzip
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
import data
import manage_data
import pcam_files
from test_helpers import (
    HERE,
    download,
    folder_held_by_another_command,
    labels_of,
    linked_set,
    one_line_error,
    run_main,
    serve,
    tissue,
    train_args,
    write_split,
)


def no_partial_files(directory):
    """No temporary .partial file is left anywhere under directory."""
    return not [name for _, _, names in os.walk(directory) for name in names if ".partial" in name]


class TestDataCommands:
    """The data commands synth, prepare, info, manifest and verify, on good and bad folders."""

    def test_sigterm_mid_write_ends_in_one_line_and_leaves_no_partial_file(self, tmp_path, capsys):
        def write_until_stopped(path):
            Path(path).write_bytes(b"the first half")
            os.kill(os.getpid(), signal.SIGTERM)  # as scancel or a time limit sends it
            Path(path).write_bytes(b"never written")

        with pytest.raises(SystemExit) as ended:
            common.run_command("cmd", common.write_atomically, str(tmp_path / "out"), write_until_stopped)
        assert ended.value.code == 128 + signal.SIGTERM and os.listdir(tmp_path) == []
        assert capsys.readouterr().err == "cmd: interrupted by SIGTERM; run the same command again\n"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back

    def test_ctrl_c_is_one_line_with_exit_code_130(self, capsys):
        def interrupted():
            raise KeyboardInterrupt

        with pytest.raises(SystemExit) as ended:
            common.run_command("cmd", interrupted)
        assert (
            ended.value.code == 130
            and capsys.readouterr().err == "cmd: interrupted by SIGINT; run the same command again\n"
        )

    @pytest.mark.parametrize("command", [["manage_data.py", "info", "--data-dir"], ["eda.py", "--data-dir"]])
    def test_a_reader_gone_from_the_pipe_ends_the_command_quietly(self, small_set, tmp_path, command):
        read_end, write_end = os.pipe()
        os.close(read_end)  # `| head` that has read its lines and gone
        out = ["--out-dir", str(tmp_path / "eda")] if command[0] == "eda.py" else []
        process = subprocess.run(
            [sys.executable, *command, str(small_set), *out],
            cwd=HERE,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_end)
        assert (process.returncode, process.stderr) == (128 + signal.SIGPIPE, "")

    def test_a_held_lock_names_its_holder_to_the_next_command_at_once(self, tmp_path):
        lock = common.hold_lock(tmp_path / "pcam.lock", "in use by {holder}")
        with pytest.raises(common.UserError, match=f"in use by PID {os.getpid()} on {socket.gethostname()}$"):
            common.hold_lock(tmp_path / "pcam.lock", "in use by {holder}")  # while the holder is still at work
        lock.close()
        common.hold_lock(tmp_path / "pcam.lock", "in use by {holder}").close()  # let go: the next one takes it

    def test_env_names_the_files_of_a_split_that_are_missing(self, tmp_path):
        write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
        result = run_main("manage_data.py", "env", "--data-dir", str(tmp_path))
        output = result.stdout + result.stderr
        assert result.returncode == 1 and "valid split missing in" in result.stderr, output
        missing = ", ".join(os.path.basename(path) for path in pcam_files.split_paths(tmp_path, "valid"))
        assert f"data valid: missing {missing}" in output, output
        assert "data train: camelyonpatch_level_2_split_train_x.h5 " in output, output
        x_path = pcam_files.split_paths(tmp_path, "train")[0]
        one_line_error(run_main("manage_data.py", "info", "--data-dir", x_path), f"{x_path} is a file, not a folder")

    def test_synth_writes_a_split_of_one_image_and_none_of_zero(self, tmp_path):
        manage_data.main(["synth", "--data-dir", str(tmp_path), "--n-train", "8", "--n-valid", "1", "--n-test", "0"])
        assert len(data.load_split(tmp_path, "valid")) == 1
        assert not any(os.path.exists(path) for path in pcam_files.split_paths(tmp_path, "test"))

    def test_synth_writes_pcam_files_with_the_defects_asked_for(self, tmp_path):
        options = "--n-train 300 --n-valid 50 --n-test 0 --poison 0.21 --dtype float32".split()
        run_main("manage_data.py", "synth", "--data-dir", str(tmp_path), *options, check=True)
        assert not os.path.exists(pcam_files.split_paths(tmp_path, "test")[0])
        with h5py.File(pcam_files.split_paths(tmp_path, "train")[0]) as h5file:
            x = h5file["x"][()]
            counts = {k: int(v) for k, v in h5file["x"].attrs.items()}
        assert x.dtype == np.float32 and x.shape == (300, 96, 96, 3)
        assert counts == {"poison_black": 16, "poison_white": 16, "poison_nan": 16, "poison_1e5": 15}  # 63 in turn
        assert np.isnan(x).any(axis=(1, 2, 3)).sum() == 16
        assert (x > 255).any(axis=(1, 2, 3)).sum() == 15
        kept = data.load_split(tmp_path, "train", filter_data=True)
        assert len(kept) == 268
        centres = data.clean(x[kept.indices, 36:60, 36:60]).mean(axis=(1, 2, 3))  # positives: a dark blob here
        assert centres[kept.labels == 0].mean() - centres[kept.labels == 1].mean() > 5

    def test_synth_never_overwrites_a_data_set(self, small_set, tmp_path):
        x_train = pcam_files.split_paths(small_set, "train")[0]
        before = hashlib.sha256(Path(x_train).read_bytes()).hexdigest()
        for extra in ([], ["--force"]):
            one_line_error(run_main("manage_data.py", "synth", "--data-dir", str(small_set), *extra), str(small_set))
        assert hashlib.sha256(Path(x_train).read_bytes()).hexdigest() == before
        synthetic = tmp_path / "synthetic"
        options = "--n-train 20 --n-valid 8 --n-test 8".split()
        run_main("manage_data.py", "synth", "--data-dir", str(synthetic), *options, check=True)
        one_line_error(run_main("manage_data.py", "synth", "--data-dir", str(synthetic), "--n-train", "30"), "--force")
        options = "--n-train 30 --n-test 0 --force".split()
        run_main("manage_data.py", "synth", "--data-dir", str(synthetic), *options, check=True)
        assert len(data.load_split(synthetic, "train")) == 30
        assert pcam_files.present_splits(synthetic) == ["train", "valid"]  # no test split left of the set replaced

    def test_prepare_writes_a_clean_contiguous_uint8_copy(self, tmp_path):
        source = tmp_path / "course"
        run_main(
            "manage_data.py",
            "synth",
            "--data-dir",
            str(source),
            "--n-train",
            "120",
            "--n-valid",
            "40",
            "--n-test",
            "0",
            "--poison",
            "0.1",
            "--dtype",
            "float32",
            check=True,
        )
        packed = tmp_path / "packed"
        write_split(packed, "train", tissue(30), labels_of(30, 10), chunks=(4, 96, 96, 3), compression="gzip")
        for src, out in ((source, tmp_path / "fast"), (packed, tmp_path / "fast_packed")):
            result = run_main("manage_data.py", "prepare", "--data-dir", str(src), "--out", str(out), check=True)
            assert re.search(r"^prepare train: [\d.]+ of [\d.]+ GB, [\d.]+ GB/s, done in \d+s$", result.stdout, re.M)
            assert not [name for name in os.listdir(out) if name.endswith(".partial")]
        x_source, x_fast = (
            pcam_files.split_paths(source, "train")[0],
            pcam_files.split_paths(tmp_path / "fast", "train")[0],
        )
        assert os.path.getsize(x_fast) < os.path.getsize(x_source) / 3.9  # float32 -> uint8
        original, prepared = data.load_split(source, "valid"), data.load_split(tmp_path / "fast", "valid")
        assert torch.equal(original[list(range(40))][0], prepared[list(range(40))][0])
        assert prepared.labels.tolist() == original.labels.tolist()
        unpacked = data.load_split(tmp_path / "fast_packed", "train")
        assert torch.equal(unpacked[[0, 29]][0], data.load_split(packed, "train")[[0, 29]][0])
        assert isinstance(unpacked._reader, pcam_files.MappedRows)  # the chunked, compressed file became memmap-able
        again = run_main(
            "manage_data.py", "prepare", "--data-dir", str(source), "--out", str(tmp_path / "fast"), check=True
        )
        assert "already a prepared copy" in again.stdout

    def test_prepare_follows_its_source_not_mtimes(self, tmp_path):
        def synth(directory, seed):
            run_main(
                "manage_data.py",
                "synth",
                "--data-dir",
                str(directory),
                "--n-train",
                "40",
                "--n-valid",
                "16",
                "--n-test",
                "0",
                "--seed",
                str(seed),
                "--force",
                check=True,
            )

        source, other, out = tmp_path / "source", tmp_path / "other", tmp_path / "out"
        synth(source, 0)
        run_main("manage_data.py", "prepare", "--data-dir", str(source), "--out", str(out), check=True)
        synth(source, 1)  # set B written over set A, with A's old mtimes (as cp -p or rsync -t leave them)
        for path in (p for split in ("train", "valid") for p in pcam_files.split_paths(source, split)):
            os.utime(path, (1e9, 1e9))
        again = run_main("manage_data.py", "prepare", "--data-dir", str(source), "--out", str(out), check=True)
        assert "already a prepared copy" not in again.stdout
        assert torch.equal(
            data.load_split(out, "train")[list(range(40))][0], data.load_split(source, "train")[list(range(40))][0]
        )
        synth(other, 2)
        one_line_error(run_main("manage_data.py", "prepare", "--data-dir", str(other), "--out", str(out)), str(source))

    def test_info_prints_a_table_per_split(self, small_set):
        lines = run_main("manage_data.py", "info", "--data-dir", str(small_set), check=True).stdout.splitlines()
        train = next(line for line in lines if line.startswith("train")).split()
        assert train[1] == "200" and train[2] == "uint8" and train[-2:] == ["120", "80"]
        assert any(line.startswith("test") for line in lines)

    def test_info_sizes_a_split_by_both_of_its_files(self, tmp_path):
        x_path, y_path = write_split(tmp_path, "train", tissue(40), labels_of(40, 20))
        with h5py.File(y_path, "a") as h5file:  # another dataset beside y: 1 MiB more in the y file
            h5file.create_dataset("notes", data=np.zeros(2**20, np.uint8))
        lines = run_main("manage_data.py", "info", "--data-dir", str(tmp_path), check=True).stdout.splitlines()
        mib = next(line for line in lines if line.startswith("train")).split()[-3]
        assert mib == f"{(os.path.getsize(x_path) + os.path.getsize(y_path)) / 2**20:.1f}" and float(mib) > 2

    def test_checksum_progress_comes_each_quarter_and_ends_at_100_percent(self, tmp_path, capsys):
        path = tmp_path / "camelyonpatch_level_2_split_train_x.h5"
        with open(path, "wb") as sparse:
            sparse.truncate(128 * 2**20)  # eight 16 MiB reads, the quarters landing exactly on some of them
        assert common.file_digest(path) == hashlib.sha256(bytes(128 * 2**20)).hexdigest()
        assert capsys.readouterr().out == ""
        common.file_digest(path, show_progress=True)
        lines = [f"sha256 {path.name}: {percent}% of 128 MiB" for percent in (12, 25, 50, 75, 100)]
        assert capsys.readouterr().out.splitlines() == lines

    def test_manifest_then_verify_names_the_changed_file(self, small_set):
        run_main("manage_data.py", "manifest", "--data-dir", str(small_set), check=True)
        manifest_path = small_set / pcam_files.MANIFEST_NAME
        upper = re.sub(r'"sha256": "(\w+)"', lambda m: m.group(0).upper(), manifest_path.read_text())
        manifest_path.write_text(upper.replace('"SHA256"', '"sha256"'))  # as PowerShell's Get-FileHash writes them
        verified = run_main("manage_data.py", "verify", "--data-dir", str(small_set), check=True).stdout
        assert "all 6 files match" in verified and "verify: camelyonpatch_level_2_split_train_x.h5 ok" in verified
        x_valid = pcam_files.split_paths(small_set, "valid")[0]
        with h5py.File(x_valid, "r+") as h5file:
            h5file["x"][0, 0, 0, 0] = 255 - h5file["x"][0, 0, 0, 0]
        result = run_main("manage_data.py", "verify", "--data-dir", str(small_set))
        one_line_error(result, "camelyonpatch_level_2_split_valid_x.h5 (contents differ)")
        assert "train_x" not in result.stderr

    @pytest.mark.parametrize("entry", ["[]", '"a string"', '{"bytes": SIZE}', '{"bytes": SIZE, "sha256": 5}'])
    def test_verify_reads_a_hand_edited_manifest_in_one_line(self, small_set, entry):
        name = "camelyonpatch_level_2_split_train_y.h5"
        entry = entry.replace("SIZE", str(os.path.getsize(small_set / name)))
        (small_set / pcam_files.MANIFEST_NAME).write_text(f'{{"files": {{"{name}": {entry}}}}}')
        one_line_error(run_main("manage_data.py", "verify", "--data-dir", str(small_set)), pcam_files.MANIFEST_NAME)
        (small_set / pcam_files.MANIFEST_NAME).write_text(f'{{"files": [{entry}]}}')
        one_line_error(run_main("manage_data.py", "verify", "--data-dir", str(small_set)), pcam_files.MANIFEST_NAME)
        (small_set / pcam_files.MANIFEST_NAME).write_text('{"files": {}}')
        one_line_error(run_main("manage_data.py", "verify", "--data-dir", str(small_set)), "lists no files")

    def test_a_file_where_an_output_folder_belongs_is_refused_before_any_work(self, small_set, tmp_path):
        in_the_way = tmp_path / "a_file"
        in_the_way.write_text("mine")
        for command, fragment in (
            (["eda.py", "--data-dir", str(small_set), "--out-dir", str(in_the_way)], "--out-dir"),
            (["manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(in_the_way)], "--out"),
            (["manage_data.py", "synth", "--data-dir", str(in_the_way)], "--data-dir"),
        ):
            result = run_main(*command)
            one_line_error(result, f"{fragment} {in_the_way} is a file")
            assert "scanning" not in result.stdout and "prepare train" not in result.stdout
        one_line_error(
            run_main("manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(tmp_path)),
            "is a folder",
        )
        one_line_error(run_main("manage_data.py", "synth", "--data-dir", ""), "argument --data-dir: is empty")
        assert in_the_way.read_text() == "mine"

    def test_a_split_with_x_but_no_y_is_an_error_everywhere(self, small_set, tmp_path):
        os.remove(pcam_files.split_paths(small_set, "test")[1])
        missing = "camelyonpatch_level_2_split_test_y.h5 not found"
        for command in ("info", "manifest"):
            one_line_error(run_main("manage_data.py", command, "--data-dir", str(small_set)), missing)
        one_line_error(
            run_main("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(tmp_path / "out")),
            missing,
        )
        one_line_error(
            run_main("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "figures")), missing
        )

    def test_manifest_never_replaces_a_file_it_did_not_write(self, small_set, tmp_path):
        x_train = pcam_files.split_paths(small_set, "train")[0]
        before = Path(x_train).read_bytes()
        for extra in ([], ["--force"]):
            one_line_error(
                run_main("manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", x_train, *extra),
                "is a data file",
            )
        assert Path(x_train).read_bytes() == before
        notes = tmp_path / "notes.json"
        notes.write_text('{"owner": "someone else"}')
        one_line_error(
            run_main("manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(notes)), "--force"
        )
        assert notes.read_text() == '{"owner": "someone else"}'
        for extra in (["--force"], []):  # forced once, then it is the manifest's own to rewrite
            run_main(
                "manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(notes), *extra, check=True
            )
        assert (
            "all 6 files match"
            in run_main(
                "manage_data.py", "verify", "--data-dir", str(small_set), "--manifest", str(notes), check=True
            ).stdout
        )

    def test_a_data_folder_has_one_writer_at_a_time(self, small_set, tmp_path):
        busy = tmp_path / "busy"
        with folder_held_by_another_command(busy):
            one_line_error(
                run_main("manage_data.py", "synth", "--data-dir", str(busy), "--n-train", "20", "--n-valid", "8"),
                "PID 4242 on node-7",
            )
            one_line_error(
                run_main("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(busy)),
                "PID 4242 on node-7",
            )
        assert os.listdir(busy) == [manage_data.LOCK_NAME]
        run_main("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(busy), check=True)
        other = tmp_path / "other"
        write_split(other, "train", tissue(30, seed=5), labels_of(30, 10))
        one_line_error(
            run_main("manage_data.py", "prepare", "--data-dir", str(other), "--out", str(busy)), "prepared copy of"
        )
        assert torch.equal(
            data.load_split(busy, "train")[[0, 199]][0], data.load_split(small_set, "train")[[0, 199]][0]
        )

    def test_empty_splits_and_sizes_are_refused(self, small_set, tmp_path):
        folder = linked_set(small_set, tmp_path / "data", splits=("train",))
        write_split(folder, "valid", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0))
        for command in (["info"], ["prepare", "--out", str(tmp_path / "out")]):
            one_line_error(
                run_main("manage_data.py", *command, "--data-dir", str(folder)), "valid_x.h5 holds no images"
            )
        assert not os.path.exists(pcam_files.split_paths(tmp_path / "out", "valid")[0])
        one_line_error(
            run_main("eda.py", "--data-dir", str(folder), "--out-dir", str(tmp_path / "figures")), "holds no images"
        )
        for flag in ("--n-train", "--n-valid"):
            one_line_error(run_main("manage_data.py", "synth", "--data-dir", str(tmp_path / "s"), flag, "0"), flag)
        for share in ("1.5", "-0.1"):
            one_line_error(
                run_main("manage_data.py", "synth", "--data-dir", str(tmp_path / "s"), "--poison", share), share
            )
        assert not os.path.exists(tmp_path / "s")

    @pytest.mark.download
    def test_a_full_disk_is_one_line_everywhere(self, small_disk, synth_dir, straight_run, pcam_server):
        synth = run_main("manage_data.py", "synth", "--data-dir", str(small_disk / "synth"))
        one_line_error(synth, f"images needs 0.2 GiB but 0.0 GiB is free on {small_disk}")  # refused before writing
        assert no_partial_files(small_disk) and not (small_disk / "synth").exists()
        for path in list(small_disk.rglob("*.h5")):
            path.unlink()
        result = run_main("train.py", *train_args(synth_dir, small_disk / "run", "--epochs", "1"))
        one_line_error(result, "last.pt: No space left on device")
        assert no_partial_files(small_disk)
        shutil.rmtree(small_disk / "run")
        free = os.statvfs(small_disk)
        (small_disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 100_000))  # 0.1 MB left
        result = download(pcam_server, small_disk / "pcam", "train")
        one_line_error(result, "No space left on device")
        assert "attempt" not in result.stdout  # a full disk is not retried
        shutil.rmtree(small_disk / "pcam")
        free = os.statvfs(small_disk)
        (small_disk / "filler-2").write_bytes(bytes(max(0, free.f_bavail * free.f_frsize - 40_000)))
        evaluated = small_disk / "eval" / "test"
        args = (str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--out-dir", str(evaluated))
        one_line_error(run_main("evaluate.py", *args), "No space left on device")
        assert not (small_disk / "eval").exists()  # no half an evaluation
        free = os.statvfs(small_disk)
        (small_disk / "filler-3").write_bytes(bytes(free.f_bavail * free.f_frsize))  # not a byte left
        result = run_main("train.py", *train_args(synth_dir, small_disk / "new" / "run", "--epochs", "1"))
        one_line_error(result, "cannot write to --out-dir")
        assert not (small_disk / "new").exists()  # nor the folders made on the way, nor an empty train.lock

    @pytest.mark.download
    def test_read_only_folders_and_files_in_the_way_are_one_line(self, read_only_dir, small_set, tmp_path, pcam_server):
        one_line_error(
            run_main("manage_data.py", "synth", "--data-dir", str(read_only_dir / "synth")), "Read-only file system"
        )
        one_line_error(
            run_main("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(read_only_dir)),
            "Read-only file system",
        )
        manifest = ("--data-dir", str(small_set), "--manifest", str(read_only_dir / "m.json"))
        result = run_main("manage_data.py", "manifest", *manifest)
        one_line_error(result, "Read-only file system")
        assert "sha256" not in result.stdout  # refused before any file is hashed
        for out_dir in (read_only_dir, read_only_dir / "eda"):  # figures that cannot be written, a folder not made
            result = run_main("eda.py", "--data-dir", str(small_set), "--out-dir", str(out_dir))
            one_line_error(result, "Read-only file system")
            assert "scanning" not in result.stdout  # refused before the first scan
        result = download(pcam_server, read_only_dir, "valid")
        one_line_error(result, "Read-only file system")
        assert "attempt" not in result.stdout  # a read-only folder is not retried
        (tmp_path / "a_file").write_text("")
        one_line_error(
            run_main("manage_data.py", "synth", "--data-dir", str(tmp_path / "a_file" / "synth")), "Not a directory"
        )
        one_line_error(
            run_main(
                "manage_data.py",
                "manifest",
                "--data-dir",
                str(small_set),
                "--manifest",
                str(tmp_path / "no_such_folder" / "m.json"),
            ),
            "No such file or directory",
        )

    def test_read_only_out_dirs_of_runs_evaluations_and_plots_are_refused_before_the_work(
        self, read_only_dir, small_set, straight_run
    ):
        one_line_error(
            run_main("plot_loss.py", str(straight_run), "--out", str(read_only_dir / "loss.png")),
            "Read-only file system",
        )
        evaluated = run_main(
            "evaluate.py",
            str(straight_run / "best.pt"),
            "--data-dir",
            str(small_set),
            "--out-dir",
            str(read_only_dir / "eval"),
        )
        one_line_error(evaluated, "cannot write --out-dir")  # before the scoring, not at its first file
        run = run_main("train.py", *train_args(small_set, read_only_dir, "--epochs", "1"))  # it exists: no lock made
        one_line_error(run, "cannot write to --out-dir")
        table = run_main("plot_loss.py", "--table", str(straight_run), "--out", str(read_only_dir / "runs.png"))
        one_line_error(table, "Read-only file system")
        assert table.stdout == ""  # refused before the table is printed


@pytest.mark.download
class TestDownload:
    """The download command, against a real HTTP server on 127.0.0.1."""

    def test_download_fetches_verifies_and_unpacks(self, pcam_server, tmp_path):
        result = download(pcam_server, tmp_path / "data", "train", "valid")
        assert result.returncode == 0, result.stderr
        assert "md5 ok" in result.stdout and "download" in result.stdout
        assert result.stdout.count(" ready (") == 4, result.stdout  # a line per unpacked file
        rates = re.findall(r"_train_x\.h5\.gz\S*: 100%, ([\d.]+) MiB/s", result.stdout)
        assert len(rates) == 1 and float(rates[0]) > 0, result.stdout  # bytes over the seconds they took
        for split in ("train", "valid"):
            for got, sent in zip(
                pcam_files.split_paths(tmp_path / "data", split),
                pcam_files.split_paths(pcam_server.source, split),
                strict=True,
            ):
                assert Path(got).read_bytes() == Path(sent).read_bytes()
        assert sorted(os.listdir(tmp_path / "data")) == sorted(
            [
                manage_data.LOCK_NAME,
                *(os.path.basename(p) for s in ("train", "valid") for p in pcam_files.split_paths(tmp_path, s)),
            ]
        )
        assert download(pcam_server, tmp_path / "data", "train").stdout.count("already present") == 2

    def test_an_archive_download_did_not_fetch_is_checked_and_kept(self, pcam_server, tmp_path):
        name = "camelyonpatch_level_2_split_valid_y.h5.gz"
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        y_path = pcam_files.split_paths(data_dir, "valid")[1]
        for mine in (b"my notes, not an archive", gzip.compress(b"not the served file")):
            (data_dir / name).write_bytes(mine)
            result = download(pcam_server, data_dir, "valid")
            one_line_error(result, "already there")
            assert "kept" in result.stderr and (data_dir / name).read_bytes() == mine and not os.path.exists(y_path)
        served = pcam_server.files[name]
        (data_dir / name).write_bytes(served)  # the right archive, copied in by hand: unpacked, and kept
        assert download(pcam_server, data_dir, "valid").returncode == 0
        assert (data_dir / name).read_bytes() == served and Path(y_path).read_bytes() == gzip.decompress(served)
        assert name not in [requested for requested, _ in pcam_server.requests]

    def test_download_holds_the_folders_lock(self, pcam_server, tmp_path):
        busy = tmp_path / "data"
        with folder_held_by_another_command(busy):
            one_line_error(download(pcam_server, busy, "valid"), "PID 4242 on node-7")
        assert os.listdir(busy) == [manage_data.LOCK_NAME] and pcam_server.requests == []

    def test_download_resumes_a_cut_connection_with_range(self, pcam_server, tmp_path):
        pcam_server.cut_once.add("camelyonpatch_level_2_split_test_x.h5.gz")
        result = download(pcam_server, tmp_path / "data", "test")
        assert result.returncode == 0, result.stderr
        assert "resuming" in result.stdout
        ranges = [rng for name, rng in pcam_server.requests if name == "camelyonpatch_level_2_split_test_x.h5.gz"]
        assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0
        x_path = pcam_files.split_paths(tmp_path / "data", "test")[0]
        assert Path(x_path).read_bytes() == Path(pcam_files.split_paths(pcam_server.source, "test")[0]).read_bytes()

    def test_download_resumes_a_partial_file_left_by_an_earlier_run(self, pcam_server, tmp_path):
        name = "camelyonpatch_level_2_split_valid_y.h5.gz"
        os.makedirs(tmp_path / "data")
        (tmp_path / "data" / (name + ".part")).write_bytes(pcam_server.files[name][:100])
        assert download(pcam_server, tmp_path / "data", "valid").returncode == 0
        assert ("camelyonpatch_level_2_split_valid_y.h5.gz", "bytes=100-") in pcam_server.requests

    def test_a_part_file_as_long_as_the_archive_but_wrong_is_deleted_after_the_servers_416(self, pcam_server, tmp_path):
        name = "camelyonpatch_level_2_split_valid_y.h5.gz"
        os.makedirs(tmp_path / "data")
        (tmp_path / "data" / (name + ".part")).write_bytes(bytes(len(pcam_server.files[name])))  # nothing to fetch
        one_line_error(download(pcam_server, tmp_path / "data", "valid"), f"{name}: md5 does not match")
        assert not (tmp_path / "data" / (name + ".part")).exists()

    def test_a_download_stopped_while_unpacking_unpacks_next_time_and_keeps_no_archive(
        self, pcam_server, tmp_path, monkeypatch
    ):
        unpacked, copy = [], shutil.copyfileobj

        def stopped_at_the_second(*args):  # valid_x unpacks, valid_y is fetched whole, then scancel comes
            if unpacked:
                raise KeyboardInterrupt("SIGTERM")  # as run_command's handler raises it
            unpacked.append(copy(*args))

        monkeypatch.setattr(manage_data.shutil, "copyfileobj", stopped_at_the_second)
        source = ("--base-url", pcam_server.base_url, "--checksums", pcam_server.checksums)
        with pytest.raises(SystemExit) as ended:
            manage_data.main(["download", "--data-dir", str(tmp_path / "data"), "--splits", "valid", *source])
        assert ended.value.code == 128 + signal.SIGTERM
        monkeypatch.undo()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            pcam_server.base_url = f"http://127.0.0.1:{closed.getsockname()[1]}/files"  # offline: nothing listens
        assert download(pcam_server, tmp_path / "data", "valid").returncode == 0
        valid = [os.path.basename(path) for path in pcam_files.split_paths(tmp_path / "data", "valid")]
        assert sorted(os.listdir(tmp_path / "data")) == sorted([manage_data.LOCK_NAME, *valid])  # no 7 GB archive left

    def test_a_corrupt_download_never_keeps_its_final_name(self, pcam_server, tmp_path):
        name = "camelyonpatch_level_2_split_valid_x.h5.gz"
        pcam_server.files[name] = pcam_server.files[name][:-10] + b"0123456789"
        one_line_error(download(pcam_server, tmp_path / "data", "valid"), "md5 does not match")
        assert not [n for n in os.listdir(tmp_path / "data") if n.startswith("camelyonpatch_level_2_split_valid_x")]

    @pytest.mark.parametrize("kind", ["truncated gzip", "not gzip"])
    def test_an_archive_that_does_not_unpack_is_deleted_and_named(self, pcam_server, tmp_path, kind):
        name = "camelyonpatch_level_2_split_valid_x.h5.gz"
        serve(pcam_server, name, pcam_server.files[name][:-40] if kind == "truncated gzip" else b"<html>moved</html>")
        result = download(pcam_server, tmp_path / "data", "valid")
        one_line_error(result, f"corrupt archive {name}, deleted: it is downloaded again next time")
        assert not [n for n in os.listdir(tmp_path / "data") if n.startswith("camelyonpatch_level_2_split_valid_x")]

    def test_retries_say_resuming_only_once_a_byte_has_arrived(self, pcam_server, tmp_path):
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        pcam_server.base_url = f"http://127.0.0.1:{port}/files"  # nothing listens there
        result = download(pcam_server, tmp_path / "data", "test")
        one_line_error(result, "after 5 attempts")
        assert result.stdout.count("retrying") == 4 and "resuming" not in result.stdout
        assert "resume" not in result.stderr  # nothing arrived: there is nothing to resume

    def test_a_server_that_ignores_range_gives_a_correct_file(self, pcam_server, tmp_path):
        pcam_server.ignore_range = True
        name = "camelyonpatch_level_2_split_valid_y.h5.gz"
        os.makedirs(tmp_path / "data")
        (tmp_path / "data" / (name + ".part")).write_bytes(bytes(100))  # not the body's first bytes: appending shows
        assert download(pcam_server, tmp_path / "data", "valid").returncode == 0
        assert (name, "bytes=100-") in pcam_server.requests
        y_path = pcam_files.split_paths(tmp_path / "data", "valid")[1]
        assert Path(y_path).read_bytes() == Path(pcam_files.split_paths(pcam_server.source, "valid")[1]).read_bytes()

    def test_checksums_in_upper_case_or_with_paths_match_as_md5sum_reads_them(self, pcam_server, tmp_path):
        sums = [line.split() for line in Path(pcam_server.checksums).read_text().splitlines()]
        Path(pcam_server.checksums).write_text("".join(f"{md5.upper()}  ./{name}\n" for md5, name in sums))
        assert download(pcam_server, tmp_path / "data", "valid").returncode == 0

    def test_a_file_without_a_checksum_is_named_before_anything_is_fetched(self, pcam_server, tmp_path):
        sums = Path(pcam_server.checksums).read_text().splitlines()
        Path(pcam_server.checksums).write_text("".join(f"{line}\n" for line in sums if "train_y" not in line))
        one_line_error(
            download(pcam_server, tmp_path / "data", "train"), "no checksum for camelyonpatch_level_2_split_train_y"
        )
        assert pcam_server.requests == []

    def test_a_base_url_that_is_not_http_is_refused_before_any_attempt(self, pcam_server, tmp_path):
        pcam_server.base_url = f"file://{tmp_path}"
        result = download(pcam_server, tmp_path / "data", "valid")
        one_line_error(result, "is not an http:// or https:// URL")
        assert "attempt" not in result.stdout

    def test_download_reports_a_missing_file_on_the_server(self, pcam_server, tmp_path):
        del pcam_server.files["camelyonpatch_level_2_split_train_y.h5.gz"]
        one_line_error(download(pcam_server, tmp_path / "data", "train"), "HTTP 404")
