"""Tests for pcam-mlp, on real HDF5 files written here and a real HTTP server on 127.0.0.1, in the order of the
files they test: data.py, the data commands, model.py, train.py, evaluate.py, plot_loss.py, eda.py, bench.py,
then the Slurm job scripts, the Makefile and mutate.py. Fixtures are in conftest.py, helpers in test_helpers.py.
The markers slurm (needs the local Slurm) and download (serves files over HTTP on 127.0.0.1) select those
areas: pytest test_all.py -m "not slurm and not download" runs everything else."""

import ast
import fcntl
import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import matplotlib.pyplot
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import eda
import evaluate
import gpu_check
import manage_data
import pcam_files
import plot_loss
import run_folder
import train
from model import MLP
from test_helpers import (
    HERE,
    SMALL_JOB,
    assert_same_weights,
    copy_project,
    download,
    evaluate_model,
    folder_held_by_another_command,
    is_nonblank_png,
    is_running,
    labels_of,
    linked_set,
    loss_columns,
    loss_plot_lines,
    make,
    make_env,
    needs_slurm,
    one_line_error,
    read_csv_rows,
    run_script,
    save_checkpoint,
    serve,
    settled_job,
    slurm_is_up,
    submitted_job,
    throwaway_repo,
    tissue,
    train_args,
    wait_for_job,
    wait_until,
    write_split,
)


class TestCleaningAndFilter:
    """data.py: pixels cleaned to uint8, and the filter of black and white tiles."""

    @pytest.mark.filterwarnings("error")  # a NaN left to the uint8 cast warns, and casts to 0 only on some CPUs
    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_cleaning_maps_nan_inf_and_out_of_range_pixels(self, tmp_path, dtype):
        images = tissue(4, dtype=dtype)
        images[0, 0, 0, 0] = 1e5
        images[1, 5, 5, 1] = np.nan
        images[2, 1, 2, 0], images[2, 1, 3, 0] = np.inf, -np.inf
        images[3, 7, 7, 2] = -30.0
        ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(4, 2)))
        assert ds[0][0][0, 0, 0].item() == 255
        assert ds[1][0][1, 5, 5].item() == 0
        assert ds[2][0][0, 1, 2].item() == 255 and ds[2][0][0, 1, 3].item() == 0
        assert ds[3][0][2, 7, 7].item() == 0
        image, label = ds[0]
        assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
        assert label.dtype == torch.long and label.dim() == 0
        untouched = np.clip(images[0], 0, 255).astype(np.uint8).transpose(2, 0, 1)
        assert np.array_equal(ds[0][0].numpy(), untouched)

    @pytest.mark.parametrize("dtype", [np.int16, np.uint16])
    def test_integer_pixels_are_clipped_not_wrapped(self, tmp_path, dtype):
        images = tissue(3, dtype=dtype)
        images[0, 0, :3, 0] = [256, 300, 1000]  # a uint8 cast would wrap them to 0, 44, 232
        if np.issubdtype(dtype, np.signedinteger):
            images[1, 2, 2:4, 1] = [-1, -200]  # and these to 255, 56
        ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(3, 1)))
        expected = np.clip(images.astype(np.int64), 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)
        assert np.array_equal(ds[[0, 1, 2]][0].numpy(), expected)
        assert ds[0][0][0, 0, :3].tolist() == [255, 255, 255]

    def test_big_endian_float_files_are_read_and_filtered(self, tmp_path):
        images = tissue(6, dtype=">f4")
        images[2], images[4, 0, 0, 0] = 0, np.nan
        ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(6, 3)), filter_data=True)
        assert ds.indices.tolist() == [0, 1, 3, 4, 5]
        assert np.array_equal(ds[[0]][0][0].numpy(), images[0].astype(np.uint8).transpose(2, 0, 1))
        assert ds[[3]][0][0, 0, 0, 0].item() == 0

    @pytest.mark.parametrize("x_options", [{}, {"chunks": (2, 96, 96, 3)}], ids=["contiguous", "chunked"])
    def test_a_big_endian_file_filters_as_its_native_copy(self, tmp_path, x_options):
        images = tissue(6, dtype=np.float32)
        images[1] = np.nan  # cleaned to 0: a black tile
        images[3, :48], images[3, 48:] = 512.0, -2.0  # raw mean 255, cleaned 127.5: tissue, read bit by bit
        native = data.PCAMDataset(*write_split(tmp_path / "native", "train", images, labels_of(6, 3), **x_options))
        swapped = write_split(tmp_path / "swapped", "train", images.astype(">f4"), labels_of(6, 3), **x_options)
        filtered = data.PCAMDataset(*swapped, filter_data=True)
        assert filtered.indices.tolist() == [0, 2, 3, 4, 5]
        assert torch.equal(filtered[[0, 1, 2]][0], native[[0, 2, 3]][0])

    def test_filter_drops_exactly_the_black_and_white_tiles(self, tmp_path):
        images = tissue(100)
        images[17], images[60], images[33] = 0, 255, 40
        paths = write_split(tmp_path, "train", images, labels_of(100, 50))
        filtered = data.PCAMDataset(*paths, filter_data=True)
        assert len(filtered) == 98 and len(filtered.indices) == 98
        assert 17 not in filtered.indices and 60 not in filtered.indices
        assert len(data.PCAMDataset(*paths)) == 100
        strict = data.PCAMDataset(*paths, filter_data=True, black_threshold=40, white_threshold=250)
        assert len(strict) == 97 and 33 not in strict.indices  # a dim tile at the threshold goes too

    def test_filter_works_in_blocks_smaller_than_the_file(self, tmp_path, monkeypatch):
        monkeypatch.setattr(pcam_files, "BLOCK_BYTES", 7 * pcam_files.IMAGE_BYTES)  # 7-image blocks over 50 images
        images = tissue(50)
        images[[3, 7, 49]] = 0
        paths = write_split(tmp_path, "train", images, labels_of(50, 25))
        assert data.PCAMDataset(*paths, filter_data=True).indices.tolist() == [
            i for i in range(50) if i not in (3, 7, 49)
        ]

    def test_filtering_a_float_file_agrees_with_its_uint8_copy_at_the_thresholds(self, tmp_path):
        images = tissue(6, dtype=np.float32)
        images[0] = 5.5  # truncates to 5: at the black threshold
        images[1] = 6.0
        images[2] = 249.9  # truncates to 249: kept
        images[3] = 250.0
        images[4, :, :, :] = 4.0
        images[4, 0, 0, 0] = np.nan  # mean just under 4: dropped either way
        paths = write_split(tmp_path / "float", "train", images, labels_of(6, 3))
        as_uint8 = write_split(tmp_path / "uint8", "train", data.clean(images), labels_of(6, 3))
        assert data.PCAMDataset(*paths, filter_data=True).indices.tolist() == [1, 2, 5]
        assert data.PCAMDataset(*as_uint8, filter_data=True).indices.tolist() == [1, 2, 5]

    @pytest.mark.parametrize("shape, dtype", [((40,), np.int64), ((40, 1), np.uint8), ((40, 1, 1, 1), np.float32)])
    def test_label_layouts_are_accepted(self, tmp_path, shape, dtype):
        labels = labels_of(40, 10).reshape(shape).astype(dtype)
        ds = data.PCAMDataset(*write_split(tmp_path, "train", tissue(40), labels))
        assert ds.labels.tolist() == labels.reshape(-1).astype(int).tolist()

    def test_transform_receives_the_cleaned_uint8_array(self, tmp_path):
        images = tissue(3, dtype=np.float32)
        images[0, 0, 0, 0] = np.nan
        seen = []

        def transform(image):
            seen.append((image.shape, image.dtype, image[0, 0, 0]))
            return torch.zeros(1)

        ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(3, 1)), transform=transform)
        assert ds[0][0].shape == (1,)
        assert seen == [((96, 96, 3), np.uint8, 0)]


class TestStorageAndPreload:
    """data.py: the row readers of each storage layout, pickling, and preloading (the resident path's copy)."""

    def test_memmap_and_h5py_paths_read_the_same_images(self, tmp_path):
        images, labels = tissue(64), labels_of(64, 20)
        plain = data.PCAMDataset(*write_split(tmp_path / "plain", "train", images, labels))
        packed = data.PCAMDataset(
            *write_split(tmp_path / "packed", "train", images, labels, chunks=(8, 96, 96, 3), compression="gzip")
        )
        for rows in ([5, 63, 0, 5, 17], [20, 21, 22]):  # scattered rows, and a run of rows read as one slice
            assert torch.equal(plain[rows][0], packed[rows][0])
            assert torch.equal(plain[rows][1], packed[rows][1])
        assert isinstance(plain._reader, pcam_files.MappedRows) and isinstance(packed._reader, pcam_files.ChunkedRows)
        assert np.array_equal(plain[rows][0].permute(0, 2, 3, 1).numpy(), images[rows])

    def test_a_float_file_reads_a_run_of_rows_in_one_system_call(self, tmp_path, monkeypatch):
        images = tissue(8, dtype=np.float32)
        ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(8, 4)))
        reads, preadv = [], os.preadv
        monkeypatch.setattr(
            os, "preadv", lambda fd, buffers, offset: reads.append(offset) or preadv(fd, buffers, offset)
        )
        for rows, calls in (([2, 3, 4, 5], 1), ([6], 1), ([5, 1], 2)):
            reads.clear()
            expected = torch.from_numpy(images[rows].astype(np.uint8)).permute(0, 3, 1, 2)
            assert torch.equal(ds[rows][0], expected) and len(reads) == calls, rows
        assert isinstance(ds._reader, pcam_files.PositionalRows)
        descriptor = ds._reader.fd
        del ds  # the reader goes with its dataset, and its file descriptor with it
        with pytest.raises(OSError):
            os.fstat(descriptor)

    def test_pickled_dataset_carries_no_open_handle(self, small_set):
        ds = data.load_split(small_set, "train")
        ds[[1, 2]]  # opens the file in this process
        state = ds.__getstate__()
        assert state["_reader"] is None and ds._reader is not None
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(clone[[3, 4]][0], ds[[3, 4]][0])

    def test_preload_serves_the_same_batches(self, tmp_path, monkeypatch):
        monkeypatch.setattr(
            pcam_files, "BLOCK_BYTES", 8 * pcam_files.IMAGE_BYTES
        )  # 8-image blocks, most with a dropped row
        images, labels = tissue(40), labels_of(40, 16)
        dropped = [0, 5, 6, 17, 39]
        images[dropped[:3]], images[dropped[3:]] = 0, 255
        write_split(tmp_path, "train", images, labels)
        streaming = data.load_split(tmp_path, "train", filter_data=True)
        preloaded = data.load_split(tmp_path, "train", filter_data=True, preload=True)
        rows = list(range(len(images) - len(dropped)))
        assert len(preloaded) == len(rows)
        assert torch.equal(streaming[rows][0], preloaded[rows][0])
        assert torch.equal(streaming[rows][1], preloaded[rows][1])
        assert np.array_equal(preloaded[rows][0].permute(0, 2, 3, 1).numpy(), np.delete(images, dropped, axis=0))

    def test_preload_refuses_when_memory_is_short(self, small_set, monkeypatch):
        monkeypatch.setattr(data, "free_memory", lambda: (1000, "MemAvailable"))
        with pytest.raises(common.UserError, match=r"in RAM \(--data-on-device\) needs .* free under MemAvailable"):
            data.load_split(small_set, "train", preload=True)


class TestProgress:
    """pcam_files.Progress: the line-based progress of whole-file passes."""

    def test_progress_lines_come_5_to_30_seconds_apart_and_when_done(self, capsys):
        now = [0.0]
        progress = pcam_files.Progress("filter train", 27e9, clock=lambda: now[0])
        line_times = []
        for second in range(3, 301, 3):  # a block every 3 s for 300 s
            now[0] = float(second)
            progress.update(27e9 * second / 300)
            if capsys.readouterr().out:
                line_times.append(second)
        gaps = np.diff([0, *line_times])
        assert line_times[-1] == 300 and all(5 <= gap <= 30 for gap in gaps), line_times
        assert len(line_times) < 100 / 3

    def test_progress_line_says_how_far_how_fast_and_how_long(self, capsys):
        now = [100.0]
        progress = pcam_files.Progress("filter train", 27e9, clock=lambda: now[0])
        now[0] = 130.0
        progress.update(12.3e9)
        now[0] = 160.0
        progress.update(27e9)
        assert capsys.readouterr().out.splitlines() == [
            "filter train: 12.30 of 27.00 GB, 0.41 GB/s, eta 36s",
            "filter train: 27.00 of 27.00 GB, 0.45 GB/s, done in 60s",
        ]

    def test_a_real_filter_pass_ends_with_a_done_line(self, small_set, capsys):
        data.load_split(small_set, "train", filter_data=True, preload=True)
        assert re.search(
            r"^filter and load camelyonpatch_level_2_split_train_x.h5: 0.01 of 0.01 GB, [\d.]+ GB/s, done in \d+s$",
            capsys.readouterr().out,
            re.M,
        )


@pytest.fixture
def memory_cgroup():
    """A fresh cgroup v1 memory controller folder with a 1 GiB limit, removed after the test."""
    folder = Path(f"/sys/fs/cgroup/memory/pcam-test-{os.getpid()}")
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(2**30))
    except OSError as error:
        if folder.exists():
            folder.rmdir()
        pytest.skip(f"no writable cgroup v1 memory controller here ({error.strerror}): the cgroup limit is untested")
    yield folder
    folder.rmdir()  # its processes have ended, so it is empty


class TestMemoryLimits:
    """data.free_memory: the smallest of MemAvailable, the memory cgroup's room and the Slurm allocation."""

    def test_the_memory_cgroup_limit_decides_inside_one(self, memory_cgroup):
        report = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {memory_cgroup}/cgroup.procs && exec "$0" -c '
                '"import data; free, which = data.free_memory(); print(free, which)"',
                sys.executable,
            ],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert report.returncode == 0, report.stderr
        free, which = report.stdout.split(maxsplit=1)
        assert which.strip() == "cgroup memory.limit_in_bytes"
        assert 0 < int(free) < 2**30

    def test_slurm_allocations_count_in_mib_per_node_or_per_cpu_less_what_the_process_holds(self, monkeypatch):
        held = data.resident_bytes()
        assert held > 50 * 2**20  # python with torch and h5py loaded
        monkeypatch.setenv("SLURM_MEM_PER_NODE", "8000")
        free, which = data.free_memory()
        assert which == "SLURM_MEM_PER_NODE" and 8000 * 2**20 - held - 2**24 <= free <= 8000 * 2**20 - held + 2**24
        monkeypatch.setenv("SLURM_MEM_PER_NODE", "3")
        assert data.free_memory() == (0, "SLURM_MEM_PER_NODE")  # the imports alone take more
        monkeypatch.delenv("SLURM_MEM_PER_NODE")
        monkeypatch.setenv("SLURM_MEM_PER_CPU", "2000")
        monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")
        assert abs(data.free_memory()[0] - (6000 * 2**20 - held)) <= 2**24
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
        free, which = data.free_memory()
        assert which == "SLURM_MEM_PER_CPU x CPUs" and abs(free - (8000 * 2**20 - held)) <= 2**24

    def test_page_cache_the_kernel_can_drop_counts_as_room_in_a_cgroup(self, tmp_path):
        for name, value in (("memory.limit_in_bytes", 1000), ("memory.usage_in_bytes", 900)):
            (tmp_path / name).write_text(f"{value * 2**20}\n")
        assert data.cgroup_folder_room(tmp_path, "memory.limit_in_bytes", "memory.usage_in_bytes") == 100 * 2**20
        (tmp_path / "memory.stat").write_text(f"cache {700 * 2**20}\ntotal_inactive_file {600 * 2**20}\nrss 1\n")
        assert data.cgroup_folder_room(tmp_path, "memory.limit_in_bytes", "memory.usage_in_bytes") == 700 * 2**20

    def test_a_resident_split_may_take_80_percent_of_free_memory_and_no_more(self, small_set, monkeypatch):
        needed = 200 * pcam_files.IMAGE_BYTES  # small_set's train split
        for free, fits in ((needed * 5 // 4, True), (needed * 5 // 4 - 1, False)):
            monkeypatch.setattr(data, "free_memory", lambda free=free: (free, "MemAvailable"))
            if fits:
                assert len(data.load_split(small_set, "train", preload=True)) == 200
            else:
                with pytest.raises(common.UserError, match="free under MemAvailable"):
                    data.load_split(small_set, "train", preload=True)


class TestLoaders:
    """data.py: batches, class balance and seeds of the loaders and of the resident batches."""

    def test_loader_batches_have_the_contract_shapes(self, small_set):
        train_loader, _ = data.get_dataloaders(small_set, batch_size=32)
        images, labels = next(iter(train_loader))
        assert images.shape == (32, 3, 96, 96) and images.dtype == torch.uint8
        assert labels.shape == (32,) and labels.dtype == torch.long
        assert sum(len(labels) for _, labels in train_loader) == 200  # one epoch = the kept train rows
        test_loader = data.get_test_loader(small_set, batch_size=16)
        assert next(iter(test_loader))[0].shape == (16, 3, 96, 96)
        assert train_loader.num_workers == test_loader.num_workers == 0  # no worker processes unless asked for

    def test_a_batch_size_of_one_is_the_smallest_the_loaders_take(self, tmp_path):
        write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
        write_split(tmp_path, "valid", tissue(3), labels_of(3, 1))
        train_loader, val_loader = data.get_dataloaders(tmp_path, batch_size=1)
        assert [len(labels) for _, labels in val_loader] == [1, 1, 1]
        assert len(next(iter(train_loader))[1]) == 1
        with pytest.raises(common.UserError, match="batch size must be positive, got 0"):
            data.get_dataloaders(tmp_path, batch_size=0)

    def test_validation_reads_every_kept_row_once_in_order(self, tmp_path):
        images = tissue(70)
        images[[10, 11]] = 255
        write_split(tmp_path, "train", tissue(20), labels_of(20, 10))
        write_split(tmp_path, "valid", images, labels_of(70, 30))
        _, val_loader = data.get_dataloaders(tmp_path, batch_size=16, filter_data=True)
        seen = torch.cat([batch for batch, _ in val_loader])
        expected = np.delete(images, [10, 11], axis=0).transpose(0, 3, 1, 2)
        assert np.array_equal(seen.numpy(), expected)

    def test_train_loader_balances_an_80_20_file(self, tmp_path):
        write_split(tmp_path, "train", tissue(500), labels_of(500, 100))
        write_split(tmp_path, "valid", tissue(8), labels_of(8, 4))
        train_loader, _ = data.get_dataloaders(tmp_path, batch_size=100, seed=3)
        drawn = torch.cat([labels for _ in range(8) for _, labels in train_loader])
        assert abs(drawn.float().mean().item() - 0.5) < 0.05  # 4,000 draws: 3 sigma is 0.024

    def test_balance_is_computed_on_the_kept_rows(self, tmp_path):
        images = tissue(200)
        labels = labels_of(200, 100)
        positives = np.flatnonzero(labels.reshape(-1) == 1)
        images[positives[:80]] = 0  # the filter removes 80 of the 100 positives
        write_split(tmp_path, "train", images, labels)
        write_split(tmp_path, "valid", tissue(8), labels_of(8, 4))
        train_loader, _ = data.get_dataloaders(tmp_path, batch_size=120, filter_data=True, seed=0)
        drawn = torch.cat([labels for _ in range(20) for _, labels in train_loader])
        assert abs(drawn.float().mean().item() - 0.5) < 0.04

    def test_same_seed_same_batches_whatever_the_workers(self, small_set):
        def epochs(num_workers, seed):
            train_loader, _ = data.get_dataloaders(small_set, batch_size=32, num_workers=num_workers, seed=seed)
            return [torch.cat([labels for _, labels in train_loader]) for _ in range(2)], [
                images.sum().item() for images, _ in train_loader
            ]

        no_workers = epochs(0, 7)
        for got, expected in zip(epochs(2, 7), no_workers, strict=True):
            assert (
                all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
                if isinstance(got[0], torch.Tensor)
                else got == expected
            )
        assert epochs(1, 7)[1] == no_workers[1]
        assert epochs(0, 8)[1] != no_workers[1]

    @pytest.mark.parametrize("script", ["the docs/data.md snippet", "a pass left part way"])
    def test_a_script_using_loaders_with_workers_exits_promptly(self, synth_dir, tmp_path, script):
        page = Path(HERE, "docs", "data.md").read_text()
        snippet = page.split("## From Python\n\n```python\n", 1)[1].split("```", 1)[0]
        assert "num_workers=" in snippet
        if script == "a pass left part way":  # an iterator still alive, with its workers, when Python exits
            snippet = (
                "import data\ntrain_loader, _ = data.get_dataloaders('data', batch_size=64, num_workers=4)\n"
                "batches = iter(train_loader)\nfor _ in range(3):\n    next(batches)\n"
            )
        os.symlink(synth_dir, tmp_path / "data")
        try:
            result = subprocess.run(
                [sys.executable, "-c", snippet + "print('script done', flush=True)"],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": HERE},
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired as timeout:
            pytest.fail(f"{script} did not exit within 120 s; it printed {timeout.stdout!r}")
        assert result.returncode == 0 and "script done" in result.stdout, result.stderr

    def test_workers_end_with_their_pass(self, small_set):
        train_loader, val_loader = data.get_dataloaders(small_set, batch_size=32, num_workers=2)
        for loader in (train_loader, val_loader):
            assert sum(1 for _ in loader) == len(loader)
            assert multiprocessing.active_children() == []
        for _ in zip(range(2), train_loader, strict=False):  # a pass left part way, as a dry run or an error leaves it
            pass
        assert multiprocessing.active_children() == []

    def test_device_batches_draw_the_same_indices_as_the_loader(self, tmp_path):
        images = tissue(300, seed=3)
        images[[5, 77, 140]] = 0  # blackouts: the filter drops them, so positions and file rows differ
        write_split(tmp_path, "train", images, labels_of(300, 90))
        write_split(tmp_path, "valid", tissue(70, seed=4), labels_of(70, 30))
        loaders = data.get_dataloaders(tmp_path, batch_size=32, filter_data=True, seed=5, preload=True)
        streamed = data.get_dataloaders(tmp_path, batch_size=32, filter_data=True, seed=5, preload=True)
        resident = [data.DeviceBatches(loader, torch.device("cpu")) for loader in loaders]
        for _ in range(2):  # two epochs: the sampler's generator carries on from one to the next
            for loader, gathered in zip(streamed, resident, strict=True):
                pairs = list(zip(loader, gathered, strict=True))
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
        assert torch.equal(
            data.generators(streamed[0])["sampler"].get_state(), data.generators(resident[0])["sampler"].get_state()
        )
        assert torch.equal(streamed[0].generator.get_state(), resident[0].generator.get_state())

    def test_a_split_copied_to_a_device_leaves_host_memory_and_one_kept_on_the_cpu_stays(self, small_set):
        for device, host_copy_kept in (("cpu", True), ("meta", False)):  # meta: a device that is not the CPU
            train_loader, _ = data.get_dataloaders(small_set, batch_size=32, seed=2, preload=True)
            data.DeviceBatches(train_loader, torch.device(device))
            assert (train_loader.dataset._memory is not None) == host_copy_kept, device

    def test_device_batches_draw_a_pass_without_iterating_the_sampler(self, small_set, monkeypatch):
        loaders = data.get_dataloaders(small_set, batch_size=32, seed=2, preload=True)
        expected = [list(loader) for loader in data.get_dataloaders(small_set, batch_size=32, seed=2, preload=True)]
        resident = [data.DeviceBatches(loader, torch.device("cpu")) for loader in loaders]

        def listed(sampler):
            raise AssertionError(f"{type(sampler).__name__} iterated in Python, an int at a time")

        for sampler_class in (torch.utils.data.WeightedRandomSampler, torch.utils.data.SequentialSampler):
            monkeypatch.setattr(sampler_class, "__iter__", listed)
        for gathered, batches in zip(resident, expected, strict=True):
            assert all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(gathered, batches, strict=True)
            )


def bad_sets():
    """name -> (writer(data_dir), message fragment)."""

    def with_train(images, labels, **options):
        return lambda d: write_split(d, "train", images, labels, **options)

    def missing_key(d):
        with_train(tissue(4), labels_of(4, 2))(d)
        with h5py.File(pcam_files.split_paths(d, "train")[0], "w") as h5file:
            h5file.create_dataset("images", data=tissue(4))

    def truncated(d):
        x_path, _ = with_train(tissue(20), labels_of(20, 10))(d)
        with open(x_path, "r+b") as x_file:
            x_file.truncate(os.path.getsize(x_path) // 2)

    def not_hdf5(d):
        x_path, _ = with_train(tissue(4), labels_of(4, 2))(d)
        with open(x_path, "w") as x_file:
            x_file.write("<html>503 Service Unavailable</html>")

    return {
        "missing key": (missing_key, "no dataset 'x'"),
        "row mismatch": (with_train(tissue(5), labels_of(4, 2)), "has 5 images but"),
        "bad shape": (with_train(np.zeros((4, 32, 32, 3), np.uint8), labels_of(4, 2)), "expected (96, 96, 3)"),
        "bad labels": (with_train(tissue(4), np.array([0, 1, 2, 1], np.uint8)), "labels must be 0 or 1, found 2"),
        "two label columns": (with_train(tissue(4), np.zeros((4, 2), np.uint8)), "labels have shape (4, 2)"),
        "3-d labels": (with_train(tissue(4), labels_of(4, 2).reshape(4, 1, 1)), "labels have shape (4, 1, 1)"),
        "truncated": (truncated, "truncated"),
        "not hdf5": (not_hdf5, "not a readable HDF5 file"),
    }


class TestBadInput:
    """data.py: a bad file is a precise exception from Python, one line and exit 1 from a command."""

    @pytest.mark.parametrize("name", list(bad_sets()))
    def test_bad_files_raise_a_precise_error(self, tmp_path, name):
        write, fragment = bad_sets()[name]
        write(tmp_path)
        with pytest.raises(common.UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            ds = data.load_split(tmp_path, "train")
            ds[[0, 1]]
        one_line_error(run_script("manage_data.py", "info", "--data-dir", str(tmp_path)), fragment)

    def test_missing_data_names_the_files_and_the_fix(self, tmp_path):
        with pytest.raises(pcam_files.MissingDataError, match="does not exist"):
            data.get_dataloaders(tmp_path / "nowhere")
        write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
        fix = r"camelyonpatch_level_2_split_valid_x\.h5.*`python manage_data\.py download"
        with pytest.raises(pcam_files.MissingDataError, match=fix):
            data.get_dataloaders(tmp_path)
        one_line_error(run_script("manage_data.py", "info", "--data-dir", str(tmp_path / "nowhere")), "does not exist")

    def test_a_split_emptied_by_the_filter_or_of_one_class_is_refused(self, tmp_path):
        write_split(tmp_path / "blank", "train", np.zeros((6, 96, 96, 3), np.uint8), labels_of(6, 3))
        with pytest.raises(common.UserError, match="removed every image"):
            data.load_split(tmp_path / "blank", "train", filter_data=True)
        write_split(tmp_path / "one", "train", tissue(6), np.zeros(6, np.uint8))
        write_split(tmp_path / "one", "valid", tissue(6), labels_of(6, 3))
        with pytest.raises(common.UserError, match="single class"):
            data.get_dataloaders(tmp_path / "one", num_workers=2)

    def test_a_split_of_one_image_loads_and_one_of_none_is_refused(self, tmp_path):
        one = data.PCAMDataset(*write_split(tmp_path / "one", "train", tissue(1), labels_of(1, 1)))
        assert len(one) == 1 and one[0][1].item() == 1
        with pytest.raises(common.UserError, match="holds no images"):
            data.PCAMDataset(*write_split(tmp_path / "none", "train", tissue(0), labels_of(0, 0)))

    def test_opening_a_file_on_the_0_to_1_scale_is_refused(self, tmp_path):
        for images in (2, 1):  # one image is a sample too
            paths = write_split(
                tmp_path / str(images), "train", tissue(images, dtype=np.float32) / 255, labels_of(images, 1)
            )
            with pytest.raises(common.UserError, match="all within 0..1"):
                data.PCAMDataset(*paths)

    def test_pixel_scale_is_checked_from_a_sample(self, tmp_path, poisoned_dir, small_set):
        write_split(tmp_path / "unit", "train", tissue(40, dtype=np.float32) / 255, labels_of(40, 10))
        write_split(tmp_path / "wide", "train", tissue(40, dtype=np.uint16) * 16, labels_of(40, 10))
        write_split(tmp_path / "wide float", "train", tissue(40, dtype=np.float32) * 257, labels_of(40, 10))
        write_split(tmp_path / "negative", "train", tissue(40, dtype=np.float32) - 300, labels_of(40, 10))
        write_split(tmp_path / "no pixel", "train", np.full((4, 96, 96, 3), np.nan, np.float32), labels_of(4, 2))
        for name, fragment in (
            ("unit", "all within 0..1"),
            ("wide", "uint16 pixel values up to"),
            ("wide float", "float32 pixel values up to"),
            ("negative", "(median -"),
            ("no pixel", "no finite pixel value"),
        ):
            with pytest.raises(common.UserError, match=re.escape(fragment)):
                data.load_split(tmp_path / name, "train")
            result = run_script(
                "manage_data.py", "prepare", "--data-dir", str(tmp_path / name), "--out", str(tmp_path / "out")
            )
            one_line_error(result, fragment)
        assert len(data.load_split(poisoned_dir, "train")) == 600  # float32 0..255 with NaN and 1e5 pixels
        assert len(data.load_split(small_set, "train")) == 200  # the official files' uint8

    def test_the_pixel_scale_limits_hold_on_both_sides(self, tmp_path):
        unit = tissue(40, dtype=np.float32) / 255
        unit[20, 0, 0, 0] = 1.01  # one value above 1: the 0..255 scale with dark images
        wide_median_255 = np.full((40, 96, 96, 3), 255, np.uint16)
        wide_median_256 = np.full((40, 96, 96, 3), 256, np.uint16)
        for name, images, accepted in (
            ("just above 1", unit, True),
            ("median 255", wide_median_255, True),
            ("median 256", wide_median_256, False),
        ):
            write_split(tmp_path / name, "train", images, labels_of(40, 10))
            if accepted:
                assert len(data.load_split(tmp_path / name, "train")) == 40
            else:
                with pytest.raises(common.UserError, match="expected the 0..255 scale"):
                    data.load_split(tmp_path / name, "train")

    @pytest.mark.parametrize(
        "name, x", [("bool", np.ones((4, 96, 96, 3), bool)), ("strings", np.array([b"abc"] * 4)), ("group", None)]
    )
    def test_x_of_a_kind_that_is_not_images_is_one_line(self, tmp_path, name, x):
        if x is None:
            write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
            with h5py.File(pcam_files.split_paths(tmp_path, "train")[0], "w") as h5file:
                h5file.create_group("x")
        else:
            write_split(tmp_path, "train", x, labels_of(4, 2))
        one_line_error(run_script("manage_data.py", "info", "--data-dir", str(tmp_path)), "'x'")


def no_partial_files(directory):
    """No temporary .partial file is left anywhere under directory."""
    return not [name for _, _, names in os.walk(directory) for name in names if ".partial" in name]


class TestDataCommands:
    """The data commands synth, prepare, info, manifest and verify, on good and bad folders."""

    def test_a_held_lock_names_its_holder_to_the_next_command_at_once(self, tmp_path):
        lock = common.hold_lock(tmp_path / "pcam.lock", "in use by {holder}")
        with pytest.raises(common.UserError, match=f"in use by PID {os.getpid()} on {socket.gethostname()}$"):
            common.hold_lock(tmp_path / "pcam.lock", "in use by {holder}")  # while the holder is still at work
        lock.close()
        common.hold_lock(tmp_path / "pcam.lock", "in use by {holder}").close()  # let go: the next one takes it

    def test_env_names_the_files_of_a_split_that_are_missing(self, tmp_path):
        write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
        result = run_script("manage_data.py", "env", "--data-dir", str(tmp_path))
        output = result.stdout + result.stderr
        assert result.returncode == 1 and "valid split missing in" in result.stderr, output
        missing = ", ".join(os.path.basename(path) for path in pcam_files.split_paths(tmp_path, "valid"))
        assert f"data valid: missing {missing}" in output, output
        assert "data train: camelyonpatch_level_2_split_train_x.h5 " in output, output

    def test_synth_writes_a_split_of_one_image_and_none_of_zero(self, tmp_path):
        manage_data.main(["synth", "--data-dir", str(tmp_path), "--n-train", "8", "--n-valid", "1", "--n-test", "0"])
        assert len(data.load_split(tmp_path, "valid")) == 1
        assert not any(os.path.exists(path) for path in pcam_files.split_paths(tmp_path, "test"))

    def test_synth_writes_pcam_files_with_the_defects_asked_for(self, tmp_path):
        options = "--n-train 300 --n-valid 50 --n-test 0 --poison 0.21 --dtype float32".split()
        run_script("manage_data.py", "synth", "--data-dir", str(tmp_path), *options, check=True)
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
            one_line_error(run_script("manage_data.py", "synth", "--data-dir", str(small_set), *extra), str(small_set))
        assert hashlib.sha256(Path(x_train).read_bytes()).hexdigest() == before
        synthetic = tmp_path / "synthetic"
        options = "--n-train 20 --n-valid 8 --n-test 0".split()
        run_script("manage_data.py", "synth", "--data-dir", str(synthetic), *options, check=True)
        one_line_error(
            run_script("manage_data.py", "synth", "--data-dir", str(synthetic), "--n-train", "30"), "--force"
        )
        options = "--n-train 30 --n-test 0 --force".split()
        run_script("manage_data.py", "synth", "--data-dir", str(synthetic), *options, check=True)
        assert len(data.load_split(synthetic, "train")) == 30

    def test_prepare_writes_a_clean_contiguous_uint8_copy(self, tmp_path):
        source = tmp_path / "course"
        run_script(
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
            result = run_script("manage_data.py", "prepare", "--data-dir", str(src), "--out", str(out), check=True)
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
        again = run_script(
            "manage_data.py", "prepare", "--data-dir", str(source), "--out", str(tmp_path / "fast"), check=True
        )
        assert "already a prepared copy" in again.stdout

    def test_prepare_follows_its_source_not_mtimes(self, tmp_path):
        def synth(directory, seed):
            run_script(
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
        run_script("manage_data.py", "prepare", "--data-dir", str(source), "--out", str(out), check=True)
        synth(source, 1)  # set B written over set A, with A's old mtimes (as cp -p or rsync -t leave them)
        for path in (p for split in ("train", "valid") for p in pcam_files.split_paths(source, split)):
            os.utime(path, (1e9, 1e9))
        again = run_script("manage_data.py", "prepare", "--data-dir", str(source), "--out", str(out), check=True)
        assert "already a prepared copy" not in again.stdout
        assert torch.equal(
            data.load_split(out, "train")[list(range(40))][0], data.load_split(source, "train")[list(range(40))][0]
        )
        synth(other, 2)
        one_line_error(
            run_script("manage_data.py", "prepare", "--data-dir", str(other), "--out", str(out)), str(source)
        )

    def test_info_prints_a_table_per_split(self, small_set):
        lines = run_script("manage_data.py", "info", "--data-dir", str(small_set), check=True).stdout.splitlines()
        train = next(line for line in lines if line.startswith("train")).split()
        assert train[1] == "200" and train[2] == "uint8" and train[-2:] == ["120", "80"]
        assert any(line.startswith("test") for line in lines)

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
        run_script("manage_data.py", "manifest", "--data-dir", str(small_set), check=True)
        verified = run_script("manage_data.py", "verify", "--data-dir", str(small_set), check=True).stdout
        assert "all 6 files match" in verified and "verify: camelyonpatch_level_2_split_train_x.h5 ok" in verified
        x_valid = pcam_files.split_paths(small_set, "valid")[0]
        with h5py.File(x_valid, "r+") as h5file:
            h5file["x"][0, 0, 0, 0] = 255 - h5file["x"][0, 0, 0, 0]
        result = run_script("manage_data.py", "verify", "--data-dir", str(small_set))
        one_line_error(result, "camelyonpatch_level_2_split_valid_x.h5 (contents differ)")
        assert "train_x" not in result.stderr

    @pytest.mark.parametrize("entry", ["[]", '"a string"', '{"bytes": SIZE}', '{"bytes": SIZE, "sha256": 5}'])
    def test_verify_reads_a_hand_edited_manifest_in_one_line(self, small_set, entry):
        name = "camelyonpatch_level_2_split_train_y.h5"
        entry = entry.replace("SIZE", str(os.path.getsize(small_set / name)))
        (small_set / pcam_files.MANIFEST_NAME).write_text(f'{{"files": {{"{name}": {entry}}}}}')
        one_line_error(run_script("manage_data.py", "verify", "--data-dir", str(small_set)), pcam_files.MANIFEST_NAME)
        (small_set / pcam_files.MANIFEST_NAME).write_text(f'{{"files": [{entry}]}}')
        one_line_error(run_script("manage_data.py", "verify", "--data-dir", str(small_set)), pcam_files.MANIFEST_NAME)

    def test_a_file_where_an_output_folder_belongs_is_refused_before_any_work(self, small_set, tmp_path):
        in_the_way = tmp_path / "a_file"
        in_the_way.write_text("mine")
        for command, fragment in (
            (["eda.py", "--data-dir", str(small_set), "--out-dir", str(in_the_way)], "--out-dir"),
            (["manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(in_the_way)], "--out"),
        ):
            result = run_script(*command)
            one_line_error(result, f"{fragment} {in_the_way} is a file")
            assert "scanning" not in result.stdout and "prepare train" not in result.stdout
        one_line_error(
            run_script("manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(tmp_path)),
            "is a folder",
        )
        one_line_error(run_script("manage_data.py", "synth", "--data-dir", ""), "argument --data-dir: is empty")
        assert in_the_way.read_text() == "mine"

    def test_a_split_with_x_but_no_y_is_an_error_everywhere(self, small_set, tmp_path):
        os.remove(pcam_files.split_paths(small_set, "test")[1])
        missing = "camelyonpatch_level_2_split_test_y.h5 not found"
        for command in ("info", "manifest"):
            one_line_error(run_script("manage_data.py", command, "--data-dir", str(small_set)), missing)
        one_line_error(
            run_script("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(tmp_path / "out")),
            missing,
        )
        one_line_error(
            run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "figures")), missing
        )

    def test_manifest_never_replaces_a_file_it_did_not_write(self, small_set, tmp_path):
        x_train = pcam_files.split_paths(small_set, "train")[0]
        before = Path(x_train).read_bytes()
        for extra in ([], ["--force"]):
            one_line_error(
                run_script("manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", x_train, *extra),
                "is a data file",
            )
        assert Path(x_train).read_bytes() == before
        notes = tmp_path / "notes.json"
        notes.write_text('{"owner": "someone else"}')
        one_line_error(
            run_script("manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(notes)), "--force"
        )
        assert notes.read_text() == '{"owner": "someone else"}'
        for extra in (["--force"], []):  # forced once, then it is the manifest's own to rewrite
            run_script(
                "manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(notes), *extra, check=True
            )
        assert (
            "all 6 files match"
            in run_script(
                "manage_data.py", "verify", "--data-dir", str(small_set), "--manifest", str(notes), check=True
            ).stdout
        )

    def test_a_data_folder_has_one_writer_at_a_time(self, small_set, tmp_path):
        busy = tmp_path / "busy"
        with folder_held_by_another_command(busy):
            one_line_error(
                run_script("manage_data.py", "synth", "--data-dir", str(busy), "--n-train", "20", "--n-valid", "8"),
                "PID 4242 on node-7",
            )
            one_line_error(
                run_script("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(busy)),
                "PID 4242 on node-7",
            )
        assert os.listdir(busy) == [manage_data.LOCK_NAME]
        run_script("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(busy), check=True)
        other = tmp_path / "other"
        write_split(other, "train", tissue(30, seed=5), labels_of(30, 10))
        one_line_error(
            run_script("manage_data.py", "prepare", "--data-dir", str(other), "--out", str(busy)), "prepared copy of"
        )
        assert torch.equal(
            data.load_split(busy, "train")[[0, 199]][0], data.load_split(small_set, "train")[[0, 199]][0]
        )

    def test_empty_splits_and_sizes_are_refused(self, small_set, tmp_path):
        folder = linked_set(small_set, tmp_path / "data", splits=("train",))
        write_split(folder, "valid", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0))
        for command in (["info"], ["prepare", "--out", str(tmp_path / "out")]):
            one_line_error(
                run_script("manage_data.py", *command, "--data-dir", str(folder)), "valid_x.h5 holds no images"
            )
        assert not os.path.exists(pcam_files.split_paths(tmp_path / "out", "valid")[0])
        one_line_error(
            run_script("eda.py", "--data-dir", str(folder), "--out-dir", str(tmp_path / "figures")), "holds no images"
        )
        for flag in ("--n-train", "--n-valid"):
            one_line_error(run_script("manage_data.py", "synth", "--data-dir", str(tmp_path / "s"), flag, "0"), flag)
        for share in ("1.5", "-0.1"):
            one_line_error(
                run_script("manage_data.py", "synth", "--data-dir", str(tmp_path / "s"), "--poison", share), share
            )
        assert not os.path.exists(tmp_path / "s")

    @pytest.mark.download
    def test_a_full_disk_is_one_line_everywhere(self, small_disk, synth_dir, pcam_server):
        one_line_error(
            run_script("manage_data.py", "synth", "--data-dir", str(small_disk / "synth")), "No space left on device"
        )
        assert no_partial_files(small_disk)
        for path in list(small_disk.rglob("*.h5")):
            path.unlink()
        result = run_script("train.py", *train_args(synth_dir, small_disk / "run", "--epochs", "1"))
        one_line_error(result, "last.pt: No space left on device")
        assert no_partial_files(small_disk)
        shutil.rmtree(small_disk / "run")
        free = os.statvfs(small_disk)
        (small_disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 100_000))  # 0.1 MB left
        result = download(pcam_server, small_disk / "pcam", "train")
        one_line_error(result, "No space left on device")
        assert "attempt" not in result.stdout  # a full disk is not retried

    @pytest.mark.download
    def test_read_only_folders_and_files_in_the_way_are_one_line(
        self, read_only_dir, small_set, straight_run, tmp_path, pcam_server
    ):
        one_line_error(
            run_script("manage_data.py", "synth", "--data-dir", str(read_only_dir / "synth")), "Read-only file system"
        )
        one_line_error(
            run_script("manage_data.py", "prepare", "--data-dir", str(small_set), "--out", str(read_only_dir)),
            "Read-only file system",
        )
        one_line_error(
            run_script(
                "manage_data.py", "manifest", "--data-dir", str(small_set), "--manifest", str(read_only_dir / "m.json")
            ),
            "Read-only file system",
        )
        for out_dir in (read_only_dir, read_only_dir / "eda"):  # figures that cannot be written, a folder not made
            one_line_error(
                run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(out_dir)), "Read-only file system"
            )
        one_line_error(
            run_script("plot_loss.py", str(straight_run), "--out", str(read_only_dir / "loss.png")),
            "Read-only file system",
        )
        result = download(pcam_server, read_only_dir, "valid")
        one_line_error(result, "Read-only file system")
        assert "attempt" not in result.stdout  # a read-only folder is not retried
        (tmp_path / "a_file").write_text("")
        one_line_error(
            run_script("manage_data.py", "synth", "--data-dir", str(tmp_path / "a_file" / "synth")), "Not a directory"
        )
        one_line_error(
            run_script(
                "manage_data.py",
                "manifest",
                "--data-dir",
                str(small_set),
                "--manifest",
                str(tmp_path / "no_such_folder" / "m.json"),
            ),
            "No such file or directory",
        )


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

    def test_download_reports_a_missing_file_on_the_server(self, pcam_server, tmp_path):
        del pcam_server.files["camelyonpatch_level_2_split_train_y.h5.gz"]
        one_line_error(download(pcam_server, tmp_path / "data", "train"), "HTTP 404")


class TestModel:
    """model.py: the MLP's layers, normalisation, parameter count and gradients."""

    def test_mlp_maps_a_batch_to_two_logits(self):
        assert MLP()(torch.rand(8, 3, 96, 96) * 255).shape == (8, 2)
        widths = [tuple(layer.weight.shape) for layer in MLP().modules() if isinstance(layer, torch.nn.Linear)]
        assert widths == [(64, 3 * 96 * 96), (32, 64), (2, 32)]  # train.py's --hidden-units 64 32 by default
        assert MLP(hidden_units=(16,), num_classes=5)(torch.rand(3, 3, 96, 96)).shape == (3, 5)
        torch.manual_seed(0)
        model = MLP(hidden_units=(16, 8), dropout_rate=0.5).eval()
        mean, std = [150.0, 120.0, 170.0], [40.0, 50.0, 30.0]
        model.set_normalization(mean, std)
        images = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
        # by hand: normalise per channel, flatten each image in (H, W, C) order, Linear -> ReLU ..., Linear
        activations = (images.double() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        activations = activations.permute(0, 2, 3, 1).reshape(4, -1)
        linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
        assert [linear.out_features for linear in linears] == [16, 8, 2]
        for index, linear in enumerate(linears):
            activations = activations @ linear.weight.double().T + linear.bias.double()
            if index < len(linears) - 1:
                activations = activations.clamp_min(0)
        torch.testing.assert_close(model(images).double(), activations, rtol=1e-4, atol=1e-4)

    def test_mlp_parameter_count_for_64_32(self):
        expected = (3 * 96 * 96 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)
        assert sum(p.numel() for p in MLP(hidden_units=(64, 32)).parameters()) == expected == 1_771_682

    def test_one_sgd_step_changes_the_weights(self):
        torch.manual_seed(0)
        model = MLP()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 96, 96)), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        optimizer.step()
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))

    def test_the_normalisation_fold_is_fp32_under_bf16_autocast(self):
        model = MLP()
        model.set_normalization([150.0, 120.0, 170.0], [40.0, 50.0, 30.0])
        weight, bias = model.normalised_first_layer()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weight_bf16, bias_bf16 = model.normalised_first_layer()
        assert weight_bf16.dtype == bias_bf16.dtype == torch.float32
        assert torch.equal(weight_bf16, weight) and torch.equal(bias_bf16, bias)

    def test_normalisation_travels_in_the_state_dict(self):
        model = MLP()
        model.set_normalization([10.0, 20.0, 30.0], [2.0, 4.0, 8.0])
        clone = MLP()
        clone.load_state_dict(model.state_dict())
        assert clone.channel_mean.flatten().tolist() == [10.0, 20.0, 30.0]
        assert clone.channel_std.flatten().tolist() == [2.0, 4.0, 8.0]
        images = torch.rand(2, 3, 96, 96) * 255
        model.eval()
        clone.eval()
        assert torch.equal(model(images), clone(images))
        plain = MLP()  # the same weights with the default mean 0, std 1: forward must apply both buffers
        plain.load_state_dict(model.state_dict())
        plain.set_normalization([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        plain.eval()
        mean, std = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1), torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
        normalised = (images - mean) / std
        torch.testing.assert_close(model(images), plain(normalised), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(images), plain(images), rtol=1e-2, atol=1e-2)

    def test_mlp_gives_the_same_logits_whatever_the_dtype_and_layout(self):
        torch.manual_seed(0)
        model = MLP().eval()
        model.set_normalization([150.0, 120.0, 170.0], [40.0, 50.0, 30.0])
        stored = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8)  # (B, H, W, C), as in the files
        channels_last = stored.permute(0, 3, 1, 2)  # what data.py yields
        forms = [
            channels_last,
            channels_last.contiguous(),
            channels_last.float(),
            channels_last.float().contiguous(),
            channels_last.transpose(2, 3).contiguous().transpose(2, 3),
        ]  # (B, C, W, H) in memory: a third layout
        logits = [model(images) for images in forms]
        assert all(torch.allclose(other, logits[0], rtol=0, atol=1e-5) for other in logits[1:])

    def test_mlp_normalises_then_flattens_in_hwc_order(self):
        torch.manual_seed(0)
        model = MLP().eval()
        model.set_normalization([150.0, 120.0, 170.0], [40.0, 50.0, 30.0])
        stored = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8)
        normalised = (stored.float() - torch.tensor([150.0, 120.0, 170.0])) / torch.tensor([40.0, 50.0, 30.0])
        expected = model.layers(normalised.flatten(1))  # the checkpoints' meaning: (H, W, C) pixel order
        assert torch.allclose(model(stored.permute(0, 3, 1, 2)), expected, rtol=0, atol=1e-5)

    def test_mlp_gradients_are_those_of_normalising_the_input(self):
        torch.manual_seed(0)
        model = MLP(dropout_rate=0.0)
        model.set_normalization([150.0, 120.0, 170.0], [40.0, 50.0, 30.0])
        stored, labels = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8), torch.tensor([0, 1, 1, 0])
        normalised = (stored.float() - torch.tensor([150.0, 120.0, 170.0])) / torch.tensor([40.0, 50.0, 30.0])
        gradients = []
        for logits in (lambda: model(stored.permute(0, 3, 1, 2)), lambda: model.layers(normalised.flatten(1))):
            model.zero_grad()
            torch.nn.functional.cross_entropy(logits(), labels).backward()
            gradients.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*gradients, strict=True))


# 64 images, no dropout, a high learning rate: it overfits within a few epochs, and the validation loss rises
OVERFIT_FLAGS = ["--batch-size", "16", "--lr", "0.003", "--dropout", "0"]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """A run whose validation loss falls, then rises: (run folder, validation losses, best epoch, stdout)."""
    base = tmp_path_factory.mktemp("overfit")
    manage_data.main(
        ["synth", "--data-dir", str(base / "tiny"), "--n-train", "64", "--n-valid", "128", "--n-test", "64"]
    )
    result = run_script(
        "train.py", *train_args(base / "tiny", base / "run", *OVERFIT_FLAGS, "--epochs", "5"), check=True
    )
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
        result = run_script("train.py", *train_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"), check=True)
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
        help_text = run_script(*script.split(), "--help", check=True).stdout
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
        result = run_script(*command.split())
        one_line_error(result, fragment)
        assert result.stderr.strip().endswith("--help")

    def test_help_shows_zero_and_list_defaults(self):
        help_text = " ".join(run_script("train.py", "--help", check=True).stdout.split())
        for shown in ("L2 weight decay (default: 0.0)", "(default: 0)", "hidden layer widths (default: 64 32)"):
            assert shown in help_text

    def test_dry_run_takes_one_batch_each_and_writes_nothing(self, synth_dir, tmp_path):
        result = run_script("train.py", *train_args(synth_dir, tmp_path / "dry", "--dry-run"), check=True)
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
            output = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--dry-run", *flags)).stdout
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

    def test_the_resident_and_loader_paths_train_identically(self, synth_dir, straight_run, tmp_path, capsys):
        train.main(train_args(synth_dir, tmp_path / "streamed", "--epochs", "3", "--data-on-device", "no"))
        assert "data path: loader (--data-on-device no)" in capsys.readouterr().out
        assert loss_columns(tmp_path / "streamed") == loss_columns(straight_run)
        assert_same_weights(tmp_path / "streamed", straight_run)

    def test_the_data_path_follows_the_flag_then_free_memory(self, small_set, monkeypatch):
        def path(free, *flags):
            monkeypatch.setattr(data, "free_memory", lambda: (free, "MemAvailable"))
            args = train.parse_args(["--data-dir", str(small_set), *flags])
            return data.choose_data_path(args.data_dir, args.data_on_device, args.dry_run, torch.device("cpu"))

        plenty, short = 2**30, 2**20  # train+valid take 264 images, 7.3 MB
        chosen = [path(plenty, "--data-on-device", flag)[0] for flag in ("auto", "yes", "no")]
        assert chosen == ["resident", "resident", "loader"]
        assert path(short)[0] == "loader" and path(plenty, "--dry-run")[0] == "loader"
        assert path(plenty, "--dry-run", "--data-on-device", "yes")[0] == "resident"

    def test_the_data_path_follows_free_memory(self, synth_dir, tmp_path, monkeypatch, capsys):
        needed = (1536 + 512) * pcam_files.IMAGE_BYTES
        for free, path in (
            (needed / data.RESIDENT_SHARE * 1.01, "resident"),
            (needed / data.RESIDENT_SHARE * 0.99, "loader"),
        ):
            monkeypatch.setattr(data, "free_memory", lambda free=free: (int(free), "MemAvailable"))
            train.main(train_args(synth_dir, tmp_path / path, "--epochs", "1"))
            assert f"data path: {path} (uint8 train+valid" in capsys.readouterr().out
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(synth_dir, tmp_path / "forced", "--epochs", "1", "--data-on-device", "yes"))
        assert "--data-on-device yes: uint8 train+valid 0.05 GiB over 70% of 0.07 GiB free under MemAvailable" in str(
            stop.value.code
        )
        assert not (tmp_path / "forced" / "metrics.csv").exists()

    @pytest.mark.parametrize("data_on_device", ["yes", "no"])
    def test_filter_data_reads_each_split_file_once(self, synth_dir, tmp_path, monkeypatch, capsys, data_on_device):
        passes, iter_raw_blocks = [], pcam_files.iter_raw_blocks

        def counted(x_path, *task):
            passes.append(os.path.basename(x_path))
            return iter_raw_blocks(x_path, *task)

        monkeypatch.setattr(data, "iter_raw_blocks", counted)
        train.main(
            train_args(
                synth_dir, tmp_path / "run", "--epochs", "1", "--filter-data", "--data-on-device", data_on_device
            )
        )
        assert sorted(passes) == sorted(
            os.path.basename(pcam_files.split_paths(synth_dir, s)[0]) for s in pcam_files.SPLITS
        )
        out = capsys.readouterr().out
        assert out.index("data path: ") < out.index("filter")  # the decision, then the pass it decided

    def test_a_slurm_memory_allocation_sends_the_run_to_the_loader(self, synth_dir, tmp_path, monkeypatch, capsys):
        monkeypatch.setenv("SLURM_MEM_PER_NODE", "1")  # 1 MiB: far less than the node's free memory
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        assert (
            "data path: loader (uint8 train+valid 0.05 GiB over 70% of 0.00 GiB free under SLURM_MEM_PER_NODE, cpu)"
            in capsys.readouterr().out
        )


# the loader path, with DataLoader workers, for the signal tests
WORKER_FLAGS = ["--num-workers", "2", "--data-on-device", "no"]


# 192 steps: a signal sent at step 10 reaches the run long before its first epoch ends, however busy the machine
LONG_EPOCH = ["--batch-size", "8"]


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


def signal_at(args, marker, signum, env=None):
    """Send train.py signum once it has logged marker; (exit code, the rest of its log)."""
    process = train_until(args, marker, env)
    process.send_signal(signum)
    output = process.stdout.read()
    return process.wait(timeout=120), output


def start_run(args):
    """train.py in its own process group, returned once step 10 is logged."""
    return train_until(args, " step 10/", new_session=True)


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
        resumed = run_script("train.py", *args, "--resume", check=True)
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
        assert capsys.readouterr().out.count("data path: resident (") == 2
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
        assert not run_dir.exists()  # nothing trained: the folder this run made goes again

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
                one_line_error(run_script("train.py", *args, *extra), f"PID {first.pid} on {socket.gethostname()}")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
        epoch = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"]
        resumed = run_script(
            "train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", str(epoch + 1)), "--resume", check=True
        )
        assert f"resuming {tmp_path / 'run'} after epoch {epoch}" in resumed.stdout  # the killed run left no lock

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
        save_checkpoint({**last, "written_on": {**last["written_on"], "device": "cuda"}}, tmp_path / "run" / "last.pt")
        resumed = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2"))
        assert resumed.returncode == 0, resumed.stderr
        assert "written on cuda, resumed on cpu: results need not match bit for bit" in resumed.stdout

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
        result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2", "--bf16"))
        one_line_error(result, "--bf16")
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 1

    @pytest.mark.parametrize("foreign", ["last.pt", "best.pt"])
    def test_resume_refuses_another_runs_checkpoint_and_changes_nothing(self, synth_dir, tmp_path, foreign):
        for name in ("mine", "other"):
            train.main(train_args(synth_dir, tmp_path / name, "--epochs", "1"))
        shutil.copy(tmp_path / "other" / foreign, tmp_path / "mine" / foreign)
        kept = {name: (tmp_path / "mine" / name).read_bytes() for name in ("metrics.csv", "best.pt", "run.json")}
        result = run_script("train.py", *train_args(synth_dir, tmp_path / "mine", "--resume", "--epochs", "2"))
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

    def test_resume_continues_to_the_runs_epochs_never_rewinds_and_leaves_a_finished_run_alone(
        self, synth_dir, tmp_path
    ):
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "2")
        exit_code, output = signal_at(args, "epoch 2/2 step 10/", signal.SIGTERM)
        assert exit_code == 75, output
        train.main(train_args(synth_dir, tmp_path / "run", "--resume"))  # no --epochs: the run's own 2
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 2
        one_line_error(
            run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "1")),
            "--epochs 1 is below the 2 epochs",
        )

        def files():
            return {
                p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file()
            }

        before = files()
        for extra in ([], ["--epochs", "2"]):  # the second as make demo runs it
            again = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--resume", *extra), check=True)
            assert again.stdout.strip().splitlines() == [
                f"{tmp_path / 'run'}: complete, 2 of 2 epochs done; nothing to do"
            ]
        assert files() == before

    def test_an_absurd_validation_loss_stops_the_run(self, synth_dir, tmp_path):
        # one SGD step per epoch at lr 100: a finite training loss, a validation loss of several hundred
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "2", "--optimizer", "sgd", "--lr", "100")
        result = run_script("train.py", *args, "--batch-size", "2048", "--dropout", "0")
        one_line_error(result, "validation loss")
        assert "epoch 1" in result.stderr and "--lr" in result.stderr
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
        assert not (tmp_path / "run" / "best.pt").exists()

    def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(self, synth_dir, tmp_path):
        result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e30"))
        one_line_error(result, "training loss became")
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0

    def test_non_finite_weights_or_validation_loss_never_reach_a_checkpoint(self, synth_dir, tmp_path):
        # one step per epoch: the step's own loss is finite, the weights it leaves behind are not
        result = run_script(
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
            (["--batch-size", "-4"], "--batch-size must be positive"),
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
        one_line_error(run_script("train.py", *args), fragment)
        assert not (tmp_path / "run" / "metrics.csv").exists()

    def test_a_refused_run_removes_every_folder_it_made_and_no_other(self, synth_dir, tmp_path):
        (tmp_path / "mine").mkdir()  # the user's own empty folder
        deep = train_args(synth_dir, tmp_path / "mine" / "a" / "b", "--resume")
        one_line_error(run_script("train.py", *deep), "no checkpoint")
        in_a_job = subprocess.run(  # its folder is runs/slurm-123, and runs/ is made for it
            [sys.executable, os.path.join(HERE, "train.py"), "--data-dir", str(synth_dir), "--resume"],
            cwd=tmp_path / "mine",
            env={**os.environ, "SLURM_JOB_ID": "123"},
            capture_output=True,
            text=True,
        )
        one_line_error(in_a_job, "no checkpoint")
        assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_cuda_without_cuda_is_refused_and_auto_falls_back(self, synth_dir, tmp_path):
        result = run_script("train.py", *train_args(synth_dir, tmp_path / "r")[:-2], "--device", "cuda")
        one_line_error(result, "CUDA is not available")
        auto = run_script("train.py", *train_args(synth_dir, tmp_path / "r")[:-2], "--dry-run")
        assert "CUDA not available, using CPU" in auto.stdout

    @pytest.mark.parametrize("available", [True, False])
    def test_the_device_asked_for_is_the_one_used_and_auto_follows_cuda(self, monkeypatch, capsys, available):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert common.pick_device("cpu").type == "cpu"
        if available:
            assert common.pick_device("cuda").type == "cuda"
        else:
            with pytest.raises(common.UserError, match="--device cuda, but CUDA is not available here"):
                common.pick_device("cuda")
        assert capsys.readouterr().out == ""  # no fallback to announce
        assert common.pick_device("auto").type == ("cuda" if available else "cpu")
        assert ("CUDA not available, using CPU" in capsys.readouterr().out) is not available

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_a_gpu_job_without_usable_cuda_stops_and_says_what_it_found(self, synth_dir, tmp_path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(
            "#!/bin/sh\necho '| NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: 12.4 |'\n"
        )
        (bin_dir / "nvidia-smi").chmod(0o755)
        job = {"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
        job["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        args = [*train_args(synth_dir, tmp_path / "run")[:-2], "--epochs", "1"]  # --device auto
        result = run_script("train.py", *args, env=job)
        one_line_error(result, "CUDA is not available")
        assert result.returncode not in (0, train.REQUEUE_EXIT_CODE)
        for found in ("CPU build", "driver CUDA 12.4", "CUDA_VISIBLE_DEVICES=0", "--device cpu"):
            assert found in result.stderr
        assert not (tmp_path / "run" / "metrics.csv").exists()
        env_check = run_script("manage_data.py", "env", "--data-dir", str(synth_dir), env=job)
        assert result.stderr[result.stderr.index("CUDA is not available") :].strip() in env_check.stdout
        run_script("train.py", *args, "--device", "cpu", env=job, check=True)  # make demo on a GPU node

    @pytest.mark.parametrize(
        "env, given",
        [
            ({"SLURM_GPUS": "1"}, True),
            ({"SLURM_GPUS_PER_NODE": "a100:2"}, True),
            ({"SLURM_JOB_GPUS": "0"}, True),
            ({"SLURM_GPUS": "0"}, False),  # make train GPUS=0
            ({}, False),
        ],
    )
    def test_a_job_given_gpus_is_recognised_by_any_of_slurms_variables(self, monkeypatch, env, given):
        for name in (
            "SLURM_GPUS",
            "SLURM_GPUS_PER_NODE",
            "SLURM_JOB_GPUS",
            "SLURM_GPUS_ON_NODE",
            "CUDA_VISIBLE_DEVICES",
        ):
            monkeypatch.delenv(name, raising=False)
        for name, value in {"SLURM_JOB_ID": "7", **env}.items():
            monkeypatch.setenv(name, value)
        assert common.slurm_gave_gpus() is given
        monkeypatch.delenv("SLURM_JOB_ID")
        assert common.slurm_gave_gpus() is False

    def test_an_empty_out_dir_is_refused(self, synth_dir, tmp_path):
        result = run_script(
            "train.py", "--data-dir", str(synth_dir), "--out-dir", "", "--epochs", "1", "--device", "cpu"
        )
        one_line_error(result, "argument --out-dir: is empty")
        assert "step 1/" not in result.stdout

    def test_unwritable_out_dir_and_missing_data_are_reported(self, synth_dir, tmp_path):
        (tmp_path / "a_file").write_text("")
        with pytest.raises(SystemExit) as stop:
            train.main(["--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "a_file" / "run")])
        assert "cannot write to --out-dir" in str(stop.value.code)
        with pytest.raises(SystemExit) as stop:
            train.main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "run")])
        assert "does not exist" in str(stop.value.code) and "manage_data.py synth" in str(stop.value.code)

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
            one_line_error(
                run_script("train.py", *train_args(synth_dir, tmp_path / name, "--resume", "auto")), fragment
            )
            assert os.listdir(tmp_path / name) == [file_name] and (tmp_path / name / file_name).read_text() == text
        train.main(train_args(synth_dir, tmp_path / "done", "--epochs", "1", "--lr", "0.001"))
        kept = {path.name: path.read_bytes() for path in (tmp_path / "done").iterdir() if path.is_file()}
        train.main(train_args(synth_dir, tmp_path / "done", "--epochs", "1", "--lr", "0.001", "--resume", "auto"))
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(synth_dir, tmp_path / "done", "--epochs", "1", "--lr", "0.5", "--resume", "auto"))
        assert "--lr 0.5 does not match the run in the checkpoint" in str(stop.value.code)
        assert {path.name: path.read_bytes() for path in (tmp_path / "done").iterdir() if path.is_file()} == kept

    def test_a_new_run_never_writes_over_a_finished_one(self, synth_dir, tmp_path):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        (tmp_path / "run" / "last.pt").unlink()  # a user saving disk space keeps best.pt and the metrics
        kept = {name: (tmp_path / "run" / name).read_bytes() for name in ("best.pt", "metrics.csv", "run.json")}
        one_line_error(run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", "1")), "best.pt")
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

    def test_a_resumed_run_reads_the_data_it_started_on(self, synth_dir, tmp_path, monkeypatch):
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
        monkeypatch.setenv("PCAM_DIR", str(tmp_path / "elsewhere"))
        train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--epochs", "2", "--device", "cpu"])
        assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["dir"] == str(synth_dir)
        assert len(read_csv_rows(tmp_path / "run" / "metrics.csv")) == 2

    @pytest.mark.parametrize("name", list(bad_test_splits()))
    def test_every_split_is_checked_before_the_first_step(self, synth_dir, tmp_path, name):
        write, fragment = bad_test_splits()[name]
        write(linked_set(synth_dir, tmp_path / "data"))
        result = run_script("train.py", *train_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))
        one_line_error(result, fragment)
        assert "epoch 1/1" not in result.stdout
        assert not (tmp_path / "run").exists()  # nothing for make plot to pick up

    def test_a_zero_row_validation_split_is_one_line_before_training(self, synth_dir, tmp_path):
        linked_set(synth_dir, tmp_path / "data", splits=("train",))
        write_split(tmp_path / "data", "valid", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0))
        result = run_script("train.py", *train_args(tmp_path / "data", tmp_path / "run"))
        one_line_error(result, "valid_x.h5 holds no images")
        assert "step 1/" not in result.stdout

    def test_non_finite_or_negative_numbers_are_refused_up_front(self, synth_dir, tmp_path):
        for flags in (
            ["--lr", "inf"],
            ["--lr", "nan"],
            ["--weight-decay", "-1"],
            ["--momentum", "-1"],
            ["--weight-decay", "inf"],
            ["--momentum", "nan"],
        ):
            result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", *flags))
            one_line_error(result, flags[0])
            assert not (tmp_path / "run").exists()

    def test_train_honours_the_manifest(self, small_set, tmp_path):
        run_script("manage_data.py", "manifest", "--data-dir", str(small_set), check=True)
        run_script("train.py", *train_args(small_set, tmp_path / "run", "--epochs", "1"), check=True)
        assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["manifest_matched"] is True
        x_valid = pcam_files.split_paths(small_set, "valid")[0]
        os.utime(x_valid, (1e9, 1e9))
        result = run_script("train.py", *train_args(small_set, tmp_path / "again", "--epochs", "1"))
        one_line_error(result, "camelyonpatch_level_2_split_valid_x.h5 (size or mtime changed)")
        assert "manage_data.py verify" in result.stderr and "manage_data.py manifest" in result.stderr
        assert "step 1/" not in result.stdout

    def test_a_manifest_naming_a_file_that_is_gone_stops_train_and_verify(self, small_set, tmp_path):
        run_script("manage_data.py", "manifest", "--data-dir", str(small_set), check=True)
        for path in pcam_files.split_paths(small_set, "test"):
            os.remove(path)
        result = run_script("train.py", *train_args(small_set, tmp_path / "run", "--epochs", "1"))
        one_line_error(result, "camelyonpatch_level_2_split_test_x.h5 (missing)")
        assert "step 1/" not in result.stdout and not (tmp_path / "run").exists()
        one_line_error(
            run_script("manage_data.py", "verify", "--data-dir", str(small_set)),
            "camelyonpatch_level_2_split_test_y.h5 (missing)",
        )

    def test_the_largest_valid_values_are_accepted(self, synth_dir, tmp_path):
        for flags in (["--seed", str(2**32 - 1)], ["--dropout", "0.99"], ["--momentum", "0.99", "--optimizer", "sgd"]):
            result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--dry-run", *flags))
            assert result.returncode == 0 and "dry run: one validation batch" in result.stdout, result.stderr
        one_line_error(run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--dropout", "1")), "--dropout")

    def test_other_typing_mistakes_are_one_line(self, synth_dir, small_set, tmp_path):
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        torch.save({"weights": torch.zeros(3)}, run_dir / "last.pt")
        one_line_error(run_script("train.py", *train_args(synth_dir, run_dir, "--resume")), "not a train.py checkpoint")
        (tmp_path / "metrics.csv").write_bytes(b"\xff\xfe\x00e\x00p\x00o\x00c\x00h")
        one_line_error(run_script("plot_loss.py", str(tmp_path / "metrics.csv")), "is not CSV text")
        (tmp_path / "metrics.csv").write_bytes(bytes(300_000))  # what a crash can leave: one field past csv's limit
        one_line_error(run_script("plot_loss.py", str(tmp_path / "metrics.csv")), "is not CSV text")
        one_line_error(
            run_script("manage_data.py", "synth", "--data-dir", str(tmp_path / "s"), "--seed", "-1"), "--seed -1"
        )
        assert not (tmp_path / "s").exists()
        dry_run = train_args(synth_dir, tmp_path / "dry", "--dry-run")  # as a broken job environment may set it:
        assert run_script("train.py", *dry_run, env={"SLURM_CPUS_PER_TASK": ""}, check=True).returncode == 0
        one_line_error(run_script("train.py", *dry_run, env={"SLURM_CPUS_PER_TASK": "abc"}), "invalid int value: 'abc'")
        for script in (("manage_data.py", "info"), ("train.py",), ("eda.py",)):
            one_line_error(run_script(*script, env={"PCAM_DIR": ""}), "empty")
        one_line_error(
            run_script("manage_data.py", "download", "--data-dir", str(tmp_path / "d"), "--base-url", "example.org/f"),
            "--base-url",
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
    return {
        "not ours": (directory / "other.pt", "is not a train.py checkpoint"),
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
        result = run_script(
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
        run_script(
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
        run_script("train.py", *train_args(data_dir, run_dir, "--epochs", "1", "--filter-data"), check=True)
        rows, labels, scores, _ = read_predictions(run_dir / "eval-test" / "predictions.csv")
        assert rows.tolist() == [row for row in range(40) if row not in (3, 17, 30)]
        assert labels.tolist() == labels_of(40, 16).ravel()[rows].tolist()
        assert json.loads((run_dir / "eval-test" / "metrics.json").read_text())["filter_data"] is True
        evaluated = tmp_path / "evaluated"
        run_script(
            *("evaluate.py", str(run_dir / "best.pt"), "--data-dir", str(data_dir), "--filter-data"),
            *("--out-dir", str(evaluated), "--batch-size", "64"),
            check=True,
        )
        assert (evaluated / "predictions.csv").read_text() == (run_dir / "eval-test" / "predictions.csv").read_text()

    def test_a_test_split_the_filter_empties_skips_test_scoring_and_the_run_is_done(self, synth_dir, tmp_path):
        data_dir = linked_set(synth_dir, tmp_path / "data")
        write_split(data_dir, "test", np.zeros((8, 96, 96, 3), np.uint8), labels_of(8, 4))  # all black tiles
        run_dir = tmp_path / "run"
        result = run_script("train.py", *train_args(data_dir, run_dir, "--epochs", "1", "--filter-data"), check=True)
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
        assert (false_positive_rate[-1], true_positive_rate[-1]) == (1, 1)
        area = np.sum(np.diff(false_positive_rate) * (true_positive_rate[1:] + true_positive_rate[:-1]) / 2)
        assert area == pytest.approx(auc_by_pairs(scores, labels), abs=1e-12)  # the drawn curve has that area

    @pytest.mark.parametrize("name", ["not ours", "text", "hello", "truncated", "other shape", "missing"])
    def test_evaluate_refuses_a_bad_checkpoint_in_one_line(self, straight_run, synth_dir, tmp_path, name):
        path, fragment = bad_checkpoints(straight_run, tmp_path)[name]
        result = run_script("evaluate.py", str(path), "--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "eval"))
        one_line_error(result, fragment)
        assert not (tmp_path / "eval").exists()

    def test_evaluate_refuses_non_finite_weights_in_one_line(self, straight_run, synth_dir, tmp_path):
        best = torch.load(straight_run / "best.pt", weights_only=True)
        best["model"]["layers.0.weight"][0, 0] = float("nan")
        torch.save(best, tmp_path / "nan.pt")
        result = run_script("evaluate.py", str(tmp_path / "nan.pt"), "--data-dir", str(synth_dir))
        one_line_error(result, "layers.0.weight")
        assert "non-finite" in result.stderr and not (tmp_path / "eval-test").exists()

    def test_evaluate_of_finite_weights_with_non_finite_outputs_leaves_no_folder(
        self, straight_run, synth_dir, tmp_path
    ):
        best = torch.load(straight_run / "best.pt", weights_only=True)
        best["model"]["layers.0.weight"].fill_(1e38)  # finite, but the logits overflow
        torch.save(best, tmp_path / "huge.pt")
        result = run_script("evaluate.py", str(tmp_path / "huge.pt"), "--data-dir", str(synth_dir))
        one_line_error(result, "not finite")
        assert not (tmp_path / "eval-test").exists()

    def test_evaluate_stays_out_of_a_run_that_is_still_training(self, synth_dir, tmp_path):
        args = train_args(synth_dir, tmp_path / "run", "--epochs", "50")
        live = start_run(args)
        try:
            result = run_script("evaluate.py", str(tmp_path / "run" / "last.pt"), "--data-dir", str(synth_dir))
            one_line_error(result, "still training")
            assert not (tmp_path / "run" / "eval-test").exists()
            into_the_run = run_script(
                *("evaluate.py", str(tmp_path / "run" / "last.pt"), "--data-dir", str(synth_dir)),
                *("--out-dir", str(tmp_path / "run")),
            )
            one_line_error(into_the_run, "still training")
            assert not (tmp_path / "run" / "metrics.json").exists()
            elsewhere = tmp_path / "elsewhere"
            run_script(
                *("evaluate.py", str(tmp_path / "run" / "last.pt"), "--data-dir", str(synth_dir)),
                *("--out-dir", str(elsewhere)),
                check=True,
            )
            assert (elsewhere / "metrics.json").exists()
        finally:
            live.send_signal(signal.SIGKILL)
            live.wait(timeout=60)

    def test_evaluate_reports_a_missing_split_and_another_evaluation_in_one_line(
        self, straight_run, synth_dir, tmp_path
    ):
        write_split(tmp_path / "data", "train", tissue(8), labels_of(8, 4))
        result = run_script("evaluate.py", str(straight_run / "best.pt"), "--data-dir", str(tmp_path / "data"))
        with pytest.raises(pcam_files.MissingDataError) as missing:
            pcam_files.require_split(tmp_path / "data", "test")
        assert result.returncode == 1 and result.stderr == f"evaluate.py: error: {missing.value}\n"
        result = run_script("evaluate.py", str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--filter-data")
        one_line_error(result, "holds an evaluation of another checkpoint or other data")
        users = tmp_path / "mine"
        users.mkdir()
        (users / "predictions.csv").write_text("my own predictions\n")
        args = (str(straight_run / "best.pt"), "--data-dir", str(synth_dir), "--out-dir", str(users))
        one_line_error(run_script("evaluate.py", *args), "predictions.csv not written by evaluate.py")
        assert (users / "predictions.csv").read_text() == "my own predictions\n"


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
        run_script("plot_loss.py", str(straight_run), str(straight_run / "metrics.csv"), "--out", str(out), check=True)
        assert is_nonblank_png(out)
        (straight_run / "loss.png").unlink()
        run_script("plot_loss.py", str(straight_run), check=True)
        assert is_nonblank_png(straight_run / "loss.png")

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
        result = run_script("plot_loss.py", *map(str, runs), check=True)
        assert f"wrote {tmp_path / 'runs.png'}" in result.stdout and is_nonblank_png(tmp_path / "runs.png")
        assert {run: (run / "loss.png").read_bytes() for run in runs} == before  # each run keeps its own plot

    def test_force_never_replaces_a_runs_checkpoints_records_or_locks(self, straight_run, tmp_path):
        run_dir = tmp_path / "run"
        shutil.copytree(straight_run, run_dir)
        (run_dir / run_folder.LOCK_NAME).write_text("")
        kept = {path: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
        for name in ("best.pt", "last.pt", "run.json", "metrics.csv", run_folder.LOCK_NAME):
            one_line_error(
                run_script("plot_loss.py", str(run_dir), "--out", str(run_dir / name), "--force"), "never this output"
            )
            one_line_error(
                run_script(
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
        one_line_error(run_script("plot_loss.py", str(run_dir), "--out", str(tmp_path)), "is a folder")
        assert {path: path.read_bytes() for path in kept} == kept

    def test_plot_never_replaces_a_file_it_did_not_write(self, straight_run, tmp_path):
        _, y_path = write_split(tmp_path / "data", "train", tissue(4), labels_of(4, 2))
        before = Path(y_path).read_bytes()
        for extra in ([], ["--force"]):
            one_line_error(run_script("plot_loss.py", str(straight_run), "--out", y_path, *extra), "is a data file")
        assert Path(y_path).read_bytes() == before
        photo = tmp_path / "photo.png"
        matplotlib.pyplot.imsave(photo, np.zeros((4, 4, 3)))
        before = photo.read_bytes()
        one_line_error(run_script("plot_loss.py", str(straight_run), "--out", str(photo)), "--force")
        assert photo.read_bytes() == before
        run_script("plot_loss.py", str(straight_run), "--out", str(photo), "--force", check=True)
        for _ in range(2):  # its own output it may draw again
            run_script("plot_loss.py", str(straight_run), "--out", str(tmp_path / "loss.png"), check=True)
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
        one_line_error(run_script("plot_loss.py", str(path)), fragment)


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


class TestRunsTable:
    """plot_loss.py --table: one row per run, the spread over seeds, and runs that are not done."""

    def test_runs_table_shows_what_differs_and_the_spread_over_seeds(self, sweep_runs):
        result = run_script("plot_loss.py", "--table", str(sweep_runs / "*"), check=True)
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

    def test_runs_are_named_in_the_legend_by_what_differs(self, sweep_runs):
        names = plot_loss.legend_names(
            [sweep_runs / "seed-1", sweep_runs / "seed-2", sweep_runs / "lr-1e-3"], ["seed-1", "seed-2", "lr-1e-3"]
        )
        assert names == ["lr=0.0001 seed=1", "lr=0.0001 seed=2", "lr=0.001 seed=1"]

    def test_runs_table_lists_running_stopped_and_unreadable_runs(self, sweep_runs, tmp_path):
        root = tmp_path / "runs"
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
        (root / "empty").mkdir()
        (root / "damaged").mkdir()
        (root / "damaged" / "run.json").write_text('{"args": ')
        (root / "odd").mkdir()
        (root / "odd" / "run.json").write_text('{"args": {}, "test": [1]}')
        with open(root / "going" / "train.lock", "w") as lock:  # a live run holds its folder's lock; "killed" does not
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = subprocess.run(
                ["make", "-s", "runs", f"RUNS={root}/*/"],
                cwd=HERE,
                capture_output=True,
                text=True,
                check=False,
                env=make_env(),
                timeout=120,
            )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        table = {row["run"]: row for row in read_csv_rows(root / "runs_summary.csv")}
        statuses = {name: row["status"] for name, row in table.items()}
        assert (table["stopped"]["epochs_done"], table["stopped"]["best_epoch"]) == ("2", "1")
        assert float(table["stopped"]["val_acc"]) == float(first_epoch["val_acc"])  # at the best epoch, not the last
        assert statuses == {
            "damaged": "unreadable: run.json",
            "empty": "unreadable: run.json",
            "going": "running",
            "killed": "not running (killed?)",
            "odd": "unreadable: run.json",
            "no-metrics": "unreadable: metrics.csv",
            "stopped": "stopped",
        }
        for line in result.stdout.splitlines()[1:-1]:
            assert line.endswith(statuses[line.split()[0]])

    def test_runs_table_never_replaces_a_summary_it_did_not_write(self, sweep_runs, tmp_path):
        (tmp_path / "runs_summary.csv").write_text("name,score\nmine,1\n")
        result = run_script("plot_loss.py", "--table", str(sweep_runs / "seed-1"), "--out", str(tmp_path / "t.png"))
        one_line_error(result, "runs_summary.csv")
        assert (tmp_path / "runs_summary.csv").read_text() == "name,score\nmine,1\n"
        assert not (tmp_path / "t.png").exists()
        for _ in range(2):
            out = str(tmp_path / "mine" / "t.png")
            run_script("plot_loss.py", "--table", str(sweep_runs / "seed-1"), "--out", out, check=True)
        assert read_csv_rows(tmp_path / "mine" / "runs_summary.csv")[0]["run"] == "seed-1"

    def test_no_run_found_suggests_another_pattern_than_the_one_that_failed(self, tmp_path):
        for pattern in ("runs/slurm-123_*", "runs/*/", str(tmp_path / "nowhere")):
            result = run_script("plot_loss.py", "--table", pattern)
            one_line_error(result, f"no run found in '{pattern}'")
            assert result.stderr.count(pattern) == 1 and "plot_loss.py --table" not in result.stderr

    def test_runs_table_names_what_it_cannot_find(self, sweep_runs, tmp_path):
        out = str(tmp_path / "o.png")
        missing = run_script(
            "plot_loss.py", "--table", str(tmp_path / "nowhere"), str(sweep_runs / "seed-1"), "--out", out
        )
        assert missing.returncode == 0 and "unreadable: not found" in missing.stdout
        for nothing in (str(tmp_path / "nowhere"), str(tmp_path / "no-match-*"), os.path.join(HERE, "README.md")):
            one_line_error(run_script("plot_loss.py", "--table", nothing), "no run found")
        assert not (tmp_path.parent / "runs_summary.csv").exists() and not os.path.exists(
            os.path.join(HERE, "runs_summary.csv")
        )


def expected_counts(directory, split):
    """Defect counts computed here, independently, from the whole file."""
    x_path, y_path = pcam_files.split_paths(directory, split)
    with h5py.File(x_path) as h5file:
        x = h5file["x"][()]
    cleaned_means = np.clip(np.nan_to_num(x, nan=0, posinf=255, neginf=0), 0, 255).astype(np.uint8).mean(axis=(1, 2, 3))
    labels = pcam_files.read_labels(y_path)
    return [
        len(x),
        int((labels == 0).sum()),
        int(labels.sum()),
        int(np.isnan(x).any(axis=(1, 2, 3)).sum()),
        int(((x < 0) | (x > 255)).any(axis=(1, 2, 3)).sum()),
        int((cleaned_means <= 5).sum()),
        int((cleaned_means >= 250).sum()),
    ]


class TestEda:
    """eda.py: exact defect counts, bounded memory, its figures, and bad input in one line."""

    def test_the_channel_mean_and_std_are_those_of_the_images(self, tmp_path):
        images = tissue(40)  # under HISTOGRAM_IMAGES a class: every image counts
        write_split(tmp_path, "train", images, labels_of(40, 20))
        summary = eda.scan_split(tmp_path, "train", 4, data.BLACK_THRESHOLD, data.WHITE_THRESHOLD).summary()
        pixels = images.reshape(-1, 3).astype(np.float64)
        assert np.allclose(summary["mean"], pixels.mean(axis=0)) and np.allclose(summary["std"], pixels.std(axis=0))

    def test_a_pixel_of_0_beside_a_nan_is_in_range(self, tmp_path):
        images = tissue(8, dtype=np.float32)
        images[1, 0, 0, 0], images[1, 0, 1, 0] = np.nan, 0.0  # a suspect row, for its NaN
        images[2, 0, 0, 0] = -1.0
        write_split(tmp_path, "train", images, labels_of(8, 4))
        scan = eda.scan_split(tmp_path, "train", 4, data.BLACK_THRESHOLD, data.WHITE_THRESHOLD)
        assert scan.flags["nan"].tolist() == [False, True] + [False] * 6
        assert scan.flags["out_of_range"].tolist() == [False, False, True] + [False] * 5

    def test_eda_counts_are_exact_and_its_figures_are_drawn(self, poisoned_dir, tmp_path):
        result = run_script(
            "eda.py", "--data-dir", str(poisoned_dir), "--out-dir", str(tmp_path / "assets"), check=True
        )
        assert "note: test split not in" in result.stdout
        for split in ("train", "valid"):
            line = next(line for line in result.stdout.splitlines() if line.startswith(split + " "))
            assert [int(value) for value in line.split()[1:8]] == expected_counts(poisoned_dir, split)
        assert expected_counts(poisoned_dir, "train")[3:] == [31, 32, 33, 34]  # NaN, <0|>255, black, white
        assert expected_counts(poisoned_dir, "valid")[3:] == [14, 13, 12, 11]
        for name in ("pcam.png", "class_balance.png", "sample_grid.png", "channel_histograms.png"):
            assert is_nonblank_png(tmp_path / "assets" / name)

    def test_eda_memory_stays_bounded_on_a_file_larger_than_a_block(self, poisoned_dir, monkeypatch):
        monkeypatch.setattr(pcam_files, "BLOCK_BYTES", 16 * pcam_files.IMAGE_BYTES * 4)  # 16 float32 images of 600
        x_bytes = os.path.getsize(pcam_files.split_paths(poisoned_dir, "train")[0])
        tracemalloc.start()
        scan = eda.scan_split(poisoned_dir, "train", 4, data.BLACK_THRESHOLD, data.WHITE_THRESHOLD)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert x_bytes > 30 * pcam_files.BLOCK_BYTES
        assert peak < 8 * pcam_files.BLOCK_BYTES, (
            f"peak {peak} bytes for a {x_bytes}-byte file read in {pcam_files.BLOCK_BYTES}"
        )
        assert list(scan.summary().values())[:7] == expected_counts(poisoned_dir, "train")

    def test_eda_figures_hold_their_legend_patches_and_shared_axes(self, tmp_path, monkeypatch):
        write_split(tmp_path, "train", tissue(20), labels_of(20, 10))
        drawn, save = {}, eda.save

        def inspect_then_save(figure, path):
            drawn[os.path.basename(path)] = figure.axes
            save(figure, path)

        monkeypatch.setattr(eda, "save", inspect_then_save)
        eda.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "figures")])
        assert drawn["pcam.png"][0].get_legend() is not None
        assert sum(len(axes.get_images()) for axes in drawn["sample_grid.png"]) > 0
        red, green, blue = drawn["channel_histograms.png"]
        assert red.get_shared_y_axes().joined(red, green) and red.get_shared_y_axes().joined(red, blue)

    def test_eda_counts_16_bit_pixels_outside_0_to_255(self, tmp_path):
        images = tissue(20, dtype=np.uint16)
        images[[2, 5, 11], 0, 0, 0] = [300, 256, 1000]
        write_split(tmp_path, "train", images, labels_of(20, 10))
        result = run_script("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "figures"), check=True)
        train_row = next(line for line in result.stdout.splitlines() if line.startswith("train "))
        assert [int(value) for value in train_row.split()[1:8]] == [20, 10, 10, 0, 3, 0, 0]

    def test_eda_reports_bad_input_in_one_line(self, tmp_path):
        one_line_error(run_script("eda.py", "--data-dir", str(tmp_path / "nowhere")), "does not exist")
        write_split(tmp_path, "train", tissue(4), np.array([0, 1, 3, 1], np.uint8))
        result = run_script("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"))
        one_line_error(result, "labels must be 0 or 1")

    @pytest.mark.parametrize(
        "flags, fragment",
        [
            (["--black-threshold", "nan"], "--black-threshold"),
            (["--white-threshold", "inf"], "--white-threshold"),
            (["--black-threshold", "-1"], "--black-threshold"),
            (["--white-threshold", "256"], "--white-threshold"),
            (["--black-threshold", "200", "--white-threshold", "100"], "below --white-threshold"),
        ],
    )
    def test_eda_thresholds_are_finite_ordered_and_within_0_to_255(self, small_set, tmp_path, flags, fragment):
        result = run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "figures"), *flags)
        one_line_error(result, fragment)
        assert not (tmp_path / "figures").exists()

    def test_eda_keeps_a_png_it_did_not_write(self, small_set, tmp_path):
        figures = tmp_path / "figures"
        figures.mkdir()
        matplotlib.pyplot.imsave(figures / "sample_grid.png", np.zeros((4, 4, 3)))
        before = (figures / "sample_grid.png").read_bytes()
        one_line_error(run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(figures)), "sample_grid.png")
        assert (figures / "sample_grid.png").read_bytes() == before and os.listdir(figures) == ["sample_grid.png"]
        for _ in range(2):
            run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "mine"), check=True)
        assert is_nonblank_png(tmp_path / "mine" / "pcam.png")

    def test_a_corrupt_compressed_chunk_names_the_file(self, tmp_path):
        x_path, _ = write_split(
            tmp_path, "train", tissue(64), labels_of(64, 20), chunks=(8, 96, 96, 3), compression="gzip"
        )
        with open(x_path, "r+b") as x_file:  # scramble the middle of the file: compressed chunks, not the header
            x_file.seek(os.path.getsize(x_path) // 2)
            x_file.write(os.urandom(4096))
        one_line_error(
            run_script("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "figures")), "train_x.h5"
        )


class TestGpuCheck:
    """gpu_check.py, the end-to-end check of a GPU node, run here on the CPU."""

    def test_gpu_check_runs_every_check_on_a_tiny_set_on_the_cpu(self, tmp_path):
        result = run_script("gpu_check.py", "--device", "cpu", "--images", "256", "--dir", str(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in result.stdout.splitlines()[3:]}
        for precision in ("fp32", "bf16"):
            for path in ("resident", "loader"):
                assert rows[f"resume equals straight run, {precision}, {path}"] == "yes"
            for batch_size in (256, 1024):
                assert rows[f"training, batch {batch_size}, {precision}, resident"].endswith("images/s")
        assert rows["best.pt loads with weights_only, no GPU visible"].startswith("yes")
        assert rows["eval-test/ equals evaluate.py (predictions.csv)"] == "yes"
        assert os.listdir(tmp_path) == ["gpu_check_256"]  # the runs went with their temporary folder
        if not torch.cuda.is_available():
            one_line_error(run_script("gpu_check.py", "--dir", str(tmp_path)), "CUDA is not available here")

    def test_a_resumed_run_that_differs_is_a_mismatch(self, straight_run, synth_dir, tmp_path):
        other = tmp_path / "other"
        train.main(train_args(synth_dir, other, "--seed", "7"))
        assert gpu_check.same_run(straight_run, straight_run)
        assert not gpu_check.same_run(straight_run, other)


@pytest.mark.slurm
@needs_slurm
class TestSlurmJobs:
    """first_job.sh, train_job.sh and the Makefile's Slurm targets against a real local Slurm."""

    def test_both_job_scripts_are_accepted_by_sbatch(self, project):
        for command in (["first_job.sh"], ["--cpus-per-task=1", "--mem=1500M", "train_job.sh"]):  # a 2-CPU node here
            result = subprocess.run(
                ["sbatch", "--test-only", *command], cwd=project, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0 and "to start at" in result.stderr, result.stderr

    def test_make_hello_writes_the_hello_world_log_and_loads_the_modules(self, project):
        # what `export -f module` puts in the environment
        env = {"BASH_FUNC_module%%": '() {  echo "module $*" >&2\n}'}
        job = submitted_job(make(project, "hello", env=env))[1]
        assert wait_for_job(job) == ["COMPLETED"]
        log = (project / f"hello_world_{job}.out").read_text()
        for line in (
            "module load 2025",
            "module load Python/3.13.1-GCCcore-14.2.0",
            f"job id: {job}",
            "Hello, World!",
            "python: Python 3",
        ):
            assert line in log
        plain = submitted_job(make(project, "hello"))[1]
        wait_for_job(plain)
        assert "skipped loading the course modules" in (project / f"hello_world_{plain}.out").read_text()

    def test_make_train_gpus_0_trains_on_the_cpu_partition_and_leaves_a_complete_run(self, project):
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 2 --batch-size 128"})
        job = submitted_job(output)[0]
        assert f"logs/pcam_train_{job}.out" in output
        assert wait_for_job(job) == ["COMPLETED"]
        run_dir = project / "runs" / f"slurm-{job}"
        assert len(read_csv_rows(run_dir / "metrics.csv")) == 2
        assert (run_dir / "best.pt").exists() and is_nonblank_png(run_dir / "loss.png")
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert "gpu:" in log and "commit:" in log and "CUDA not available, using CPU" in log
        accounted = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job, "-o", "Partition,AllocTRES"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("|")
        assert accounted[0] == "thin_course" and "gpu" not in accounted[1], accounted
        status = make(project, "status")
        assert job in status and "COMPLETED" in status

    def test_a_gpu_job_without_a_usable_gpu_fails_in_one_line_and_is_not_requeued(self, project):
        output = make(project, "train", env={**SMALL_JOB, "GPUS": "1", "ARGS": "--epochs 1"})
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["FAILED"]
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        errors = [line for line in log.splitlines() if line.startswith("train.py: error:")]
        assert len(errors) == 1 and "CUDA" in errors[0] and "Traceback" not in log, log
        assert "epoch 1/1" not in log and "requeueing" not in log
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
        assert "Restarts=0" in show and "Partition=gpu_course" in show, show

    def test_a_job_continues_the_run_in_the_out_dir_its_args_name(self, project, synth_dir):
        run_dir = project / "mine" / "first"
        train.main(train_args(synth_dir, run_dir, "--epochs", "1"))
        output = make(project, "train", env={**SMALL_JOB, "ARGS": f"--out-dir {run_dir} --epochs 2 --batch-size 64"})
        job = submitted_job(output)[0]
        log = project / "logs" / f"pcam_train_{job}.out"
        assert wait_for_job(job) == ["COMPLETED"], log.read_text()
        assert "--resume auto --out-dir" in log.read_text() and f"resuming {run_dir} after epoch 1" in log.read_text()
        assert [row["epoch"] for row in read_csv_rows(run_dir / "metrics.csv")] == ["1", "2"]
        assert not (project / "runs" / f"slurm-{job}").exists()

    def test_a_job_at_its_requeue_limit_names_the_make_train_that_continues_its_run(self, project):
        env = {**SMALL_JOB, "MAX_REQUEUES": "0", "ARGS": "--epochs 50 --batch-size 16 --log-every 1"}
        job = submitted_job(make(project, "train", env=env))[0]
        log = project / "logs" / f"pcam_train_{job}.out"
        wait_until(lambda: log.exists() and "epoch 1/50 step" in log.read_text(), 300, "training in the job")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # as --signal=B:USR1@120 sends it
        assert wait_for_job(job) == ["FAILED"], log.read_text()
        continuation = re.search(r'continue with: make train ARGS="(.*)"$', log.read_text(), re.MULTILINE)
        assert continuation and continuation.group(1) == f"--resume --out-dir runs/slurm-{job}", log.read_text()
        done = torch.load(project / "runs" / f"slurm-{job}" / "last.pt", weights_only=True)["epoch"]
        again = submitted_job(
            make(project, "train", env={**SMALL_JOB, "ARGS": f"{continuation.group(1)} --epochs {done + 1}"})
        )[0]
        assert wait_for_job(again) == ["COMPLETED"], (project / "logs" / f"pcam_train_{again}.out").read_text()
        assert len(read_csv_rows(project / "runs" / f"slurm-{job}" / "metrics.csv")) == done + 1
        assert not (project / "runs" / f"slurm-{again}").exists()

    def test_make_train_passes_arguments_without_running_them(self, project):
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1 --dry-run; touch pwned $(touch pwned2)"})
        job = submitted_job(output)[0]
        wait_for_job(job)
        assert not (project / "pwned").exists() and not (project / "pwned2").exists()
        assert "unrecognized arguments" in (project / "logs" / f"pcam_train_{job}.out").read_text()

    def test_scancel_stops_a_job_for_good(self, project):
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 50 --batch-size 16 --log-every 1"})
        job = submitted_job(output)[0]
        log = project / "logs" / f"pcam_train_{job}.out"
        wait_until(lambda: log.exists() and "epoch 1/50 step" in log.read_text(), 300, "training in the job")
        subprocess.run(["scancel", job], check=True)
        wait_for_job(job)
        show = settled_job(job)
        assert "Restarts=0" in show and "JobState=CANCELLED" in show, show
        assert "requeueing" not in log.read_text() and "stopped by SIGTERM" in log.read_text()

    def test_a_job_near_its_time_limit_checkpoints_requeues_and_resumes_to_the_same_result(
        self, project, synth_dir, tmp_path
    ):
        # Submitted as make train submits it, so train_job.sh's own --signal=B:USR1@120 line is what stops it.
        # Slurm checks time limits every 30 s and signals a job once it is within --signal's time + 30 s of its
        # limit, so USR1@120 of a 3-minute limit comes 30-60 s in: after train.py is up (an earlier USR1 finds it
        # still importing torch) and before its 90 epochs (a second or more each) end. Both runs use one thread,
        # so they share the 2 CPUs here without slowing each other down, and compute the same numbers.
        args = ["--epochs", "90", "--batch-size", "16", "--log-every", "50", "--num-workers", "0"]
        one_thread = {"OMP_NUM_THREADS": "1"}
        output = make(project, "train", env={**SMALL_JOB, **one_thread, "TIME": "00:03:00", "ARGS": " ".join(args)})
        job = submitted_job(output)[0]
        straight = subprocess.Popen(
            [sys.executable, "train.py", "--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "straight"), *args],
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **one_thread},
        )

        def extend_after_first_requeue():
            # the requeued job would be signalled again soon after it starts: give it room to finish
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
            if "Restarts=1" in show and "TimeLimit=00:03:00" in show:
                subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=00:10:00"], check=True)

        assert wait_for_job(job, timeout=480, on_poll=extend_after_first_requeue) == ["COMPLETED"]
        assert straight.wait(timeout=300) == 0
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert "USR1: time limit near" in log and "requeueing job" in log and "restart 1" in log, log
        assert "stopped by SIGUSR1" in log and "resuming" in log, log  # train.py itself checkpointed, then resumed
        run_dir = project / "runs" / f"slurm-{job}"
        assert loss_columns(run_dir) == loss_columns(tmp_path / "straight")
        assert_same_weights(run_dir, tmp_path / "straight")

    def test_make_sweep_leaves_one_run_per_seed(self, project):
        output = make(project, "sweep", env={**SMALL_JOB, "SEEDS": "1 2", "ARGS": "--epochs 1"})
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["COMPLETED", "COMPLETED"]
        logs = re.search(r"logs (\S+\.out)", output).group(1)
        seeds = {}
        for task in (0, 1):
            record = json.loads((project / "runs" / f"slurm-{job}_{task}" / "run.json").read_text())
            seeds[task] = record["args"]["seed"]
            log = (project / logs.replace("*", str(task))).read_text()
            assert log.startswith(f"job {job}_{task} (array {job}, task {task}) on "), log
            assert f"--seed {seeds[task]}" in log and "done: " in log
        assert seeds == {0: 1, 1: 2}
        assert len(os.listdir(project / "logs")) == 2

    def test_the_job_stages_data_to_node_local_scratch_when_asked(self, project, synth_dir, tmp_path):
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1", "STAGE": "yes", "TMPDIR": str(scratch)})
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["COMPLETED"]
        staged = scratch / f"pcam_{job}"
        assert sorted(os.listdir(staged)) == sorted(os.listdir(synth_dir) + [manage_data.PREPARED_NAME])
        record = json.loads((project / "runs" / f"slurm-{job}" / "run.json").read_text())
        assert record["args"]["data_dir"] == str(staged)

    def test_a_staged_job_names_the_users_folder_for_a_half_split(self, project, synth_dir, tmp_path):
        if not slurm_is_up():
            pytest.skip("no Slurm here (start one with .ci/slurm-up.sh)")
        user_dir = linked_set(synth_dir, tmp_path / "user_data")
        write_split(user_dir, "test", tissue(8), labels_of(8, 4))
        os.remove(pcam_files.split_paths(user_dir, "test")[1])
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        output = make(
            project,
            "train",
            env={**SMALL_JOB, "ARGS": "--epochs 1", "STAGE": "yes", "TMPDIR": str(scratch), "DATA_DIR": str(user_dir)},
        )
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["FAILED"]
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert f"test split missing in {user_dir}" in log and "Traceback" not in log


class TestMakeAndShellScripts:
    """The Makefile's local targets, and shellcheck on the shell scripts."""

    def test_make_demo_again_leaves_the_finished_demo_alone(self, project, synth_dir):
        env = {"SYNTH_DIR": str(synth_dir)}
        make(project, "demo", env=env)
        run_dir = project / "runs" / "demo"
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
        output = make(project, "demo", env=env)
        assert "runs/demo: complete, 5 of 5 epochs done; nothing to do" in output
        assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()} == before

    def test_make_plot_skips_failed_runs_and_make_eda_takes_a_folder_with_spaces(self, small_set, tmp_path):
        copy_project(tmp_path)
        (tmp_path / "runs" / "failed-before-epoch-1").mkdir(parents=True)
        result = subprocess.run(
            ["make", "-s", "plot"], cwd=tmp_path, capture_output=True, text=True, check=False, env=make_env()
        )
        assert result.returncode != 0 and "no run found" in result.stderr
        shutil.copytree(small_set, tmp_path / "a folder with spaces")
        make(tmp_path, "eda", "DATA_DIR=a folder with spaces")
        assert is_nonblank_png(tmp_path / "runs" / "eda" / "pcam.png")

    def test_make_eda_plot_and_runs_take_paths_with_spaces_and_leave_assets_alone(self, project, straight_run):
        before = {path.name: path.read_bytes() for path in (project / "assets").iterdir()}
        run = project / "my runs" / "run one"
        shutil.copytree(straight_run, run)
        (run / "loss.png").unlink()
        for _ in range(2):  # and again: each rewrites its own output
            make(project, "eda", "OUT=eda figures")
            make(project, "plot", f"RUN={run}")
            make(project, "plot", f"RUN={run}", "OUT=my runs/overlay.png")
            make(project, "runs", "RUNS=my runs/*/")
        assert is_nonblank_png(project / "eda figures" / "pcam.png") and is_nonblank_png(run / "loss.png")
        assert is_nonblank_png(project / "my runs" / "overlay.png")
        assert read_csv_rows(project / "my runs" / "runs_summary.csv")[0]["run"] == "run one"
        assert {path.name: path.read_bytes() for path in (project / "assets").iterdir()} == before

    def test_job_scripts_pass_shellcheck(self):
        if shutil.which("shellcheck") is None:
            pytest.skip("shellcheck not installed (Debian package shellcheck)")
        result = subprocess.run(
            ["shellcheck", "first_job.sh", "train_job.sh", ".ci/slurm-up.sh", ".ci/run"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout

    @pytest.mark.parametrize("ctrl_c", [False, True], ids=["suite-fails", "ctrl-c"])
    def test_make_test_loaded_stops_its_busy_processes_when_the_suite_fails_and_on_ctrl_c(self, tmp_path, ctrl_c):
        for name in ("Makefile", "requirements.txt"):
            shutil.copy2(os.path.join(HERE, name), tmp_path / name)
        os.symlink(os.path.join(HERE, ".venv"), tmp_path / ".venv")
        (tmp_path / "test_all.py").write_text(
            "import os, pathlib, time\n\n\ndef test_a_suite():\n"
            "    pathlib.Path('started').touch()\n"
            "    while os.environ.get('HOLD') or not pathlib.Path('checked').exists():\n        time.sleep(1)\n"
            "    assert False, 'a failing suite'\n"
        )
        process = subprocess.Popen(
            ["make", "-s", "test-loaded"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=make_env({"HOLD": "yes" if ctrl_c else ""}),
            start_new_session=True,
            # as in a terminal: a suite started in the background (nohup, CI) passes its ignored SIGINT down
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        busy = [int(pid) for pid in re.search(r"busy processes (\d+) (\d+)", process.stdout.readline()).groups()]
        wait_until(lambda: (tmp_path / "started").exists(), 120, "the suite's start")
        assert all(is_running(pid) for pid in busy)
        (tmp_path / "checked").touch()  # the suite may end now
        if ctrl_c:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            exit_code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"make test-loaded did not end; its output:\n{process.communicate()[0]}")
        assert exit_code != 0, process.stdout.read()
        wait_until(lambda: not any(is_running(pid) for pid in busy), 60, "the busy processes' end")


class TestLayout:
    """The repo's shape: flat modules whose imports point one way."""

    def test_the_project_modules_import_each_other_without_a_cycle(self):
        modules = {
            path[:-3] for path in os.listdir(HERE) if path.endswith(".py") and not path.startswith(("test_", "conf"))
        }
        imports = {}
        for module in modules:
            tree = ast.parse(Path(HERE, f"{module}.py").read_text())
            names = {
                alias.name.split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
            }
            names |= {
                node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
            }
            imports[module] = names & modules - {module}
        assert {"data", "train", "model"} <= modules and imports["model"] == imports["common"] == set()

        def reachable(start):
            seen, pending = set(), list(imports[start])
            while pending:
                module = pending.pop()
                if module not in seen:
                    seen.add(module)
                    pending.extend(imports[module])
            return seen

        cycles = sorted(module for module in modules if module in reachable(module))
        assert cycles == [], {module: sorted(imports[module]) for module in cycles}

    def test_every_script_reads_in_one_sitting(self):
        scripts = [path for path in os.listdir(HERE) if path.endswith(".py") and not path.startswith(("test_", "conf"))]
        lines = {path: len(Path(HERE, path).read_text().splitlines()) for path in scripts}
        assert lines["train.py"] < 450 and max(lines.values()) <= 600, lines
        functions = [(path, node) for path in scripts for node in ast.walk(ast.parse(Path(HERE, path).read_text()))]
        too_long = [
            f"{path}:{node.name}"
            for path, node in functions
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 50
        ]
        assert too_long == []


class TestMutate:
    """mutate.py, on a throwaway module and its tests: it must tell a caught mutant from a missed one."""

    def test_a_mutant_a_test_catches_is_killed_one_it_misses_survives_and_equivalents_are_skipped(self, tmp_path):
        code = (
            "def clamp(value, low, high):\n    if value < low:\n        return low\n    return min(value, high)\n\n\n"
            "def unused():\n    return 1\n"
        )
        tests = (
            "import subprocess, sys\nfrom clamp import clamp\n\n\ndef test_low_values_become_low():\n"
            "    assert clamp(-5, 0, 10) == 0\n\n\ndef test_high_values_become_high_in_a_subprocess():\n"
            "    high = 'import clamp; assert clamp.clamp(20, 0, 10) == 10'\n"
            "    subprocess.run([sys.executable, '-c', high], check=True)\n"
        )
        options = throwaway_repo(tmp_path, "clamp", code, tests, "--mutants", "99")
        output = run_script("mutate.py", *options, check=True).stdout
        assert "clamp.py:2: value < low -> value <= low  survived, 2 tests" in output, output
        assert "clamp.py:3: return low -> return None  killed, 1 tests" in output, output
        assert "clamp.py:4: return min(value, high) -> return None  killed, 1 tests" in output, output  # subprocess
        assert "clamp.py:8: return 1 -> return None  no tests" in output, output
        assert "mutation score: 2 killed of 5 (40%), 1 survived, 2 not covered" in output, output
        survivors = (tmp_path / ".mutate" / "survivors.txt").read_text()
        assert survivors == "clamp.py:clamp: value < low -> value <= low  in  if value < low:\n"
        (tmp_path / "mutants_equivalent.txt").write_text(survivors.strip() + "  # a test of this file says why\n")
        output = run_script("mutate.py", *options, check=True).stdout
        assert "mapping lines" not in output and "clamp.py:2: value < low -> value <= low  equivalent" in output
        assert "2 killed of 4 (50%), 0 survived, 2 not covered; 1 skipped as equivalent" in output, output
        moved = "# a line above it moves the mutant's line, not its entry\n" + (tmp_path / "clamp.py").read_text()
        (tmp_path / "clamp.py").write_text(moved)
        output = run_script("mutate.py", *options, check=True).stdout
        assert "clamp.py:3: value < low -> value <= low  equivalent" in output, output
        output = run_script("mutate.py", *options, "--file", "clamp.py", "--line", "4", check=True).stdout
        assert "clamp.py:4: return low -> return None  killed" in output and "1 killed of 1 (100%)" in output, output
        one_line_error(
            run_script("mutate.py", *options, "--file", "clamp.py", "--line", "1"), "no mutant on clamp.py:1"
        )

    def test_again_reruns_only_the_survivors_of_the_same_sample(self, tmp_path):
        code, tests = "def double(x):\n    return x * 2  # twice\n", "from double import double\n\n\ndef test_zero():\n"
        options = throwaway_repo(tmp_path, "double", code, tests + "    assert double(0) == 0\n", "--max-tests", "1")
        result = run_script("mutate.py", *options, "--again")
        one_line_error(result, "no readable .mutate/results.json")
        assert "mapping lines" not in result.stdout  # refused before the suite runs under coverage
        output = run_script("mutate.py", *options, check=True).stdout
        assert "mutation score: 1 killed of 3 (33%), 2 survived" in output, output
        survivors = (tmp_path / ".mutate" / "survivors.txt").read_text().splitlines()
        constant = next(survivor for survivor in survivors if "* 3  # twice" in survivor)  # its line's comment too
        (tmp_path / "mutants_equivalent.txt").write_text(f"{constant}  # say why here\n")
        with open(tmp_path / "test_double.py", "a") as tests:  # runs on the survivors beside the 1 fastest
            tests.write("\n\ndef test_three():\n    assert double(3) == 6\n")
        output = run_script("mutate.py", *options, "--again", check=True).stdout
        assert "double.py:2: return x * 2 -> return None  killed, 0 tests" in output, output  # not run again
        assert "mutation score: 2 killed of 2 (100%), 0 survived, 0 not covered; 1 skipped as equivalent" in output
        (tmp_path / "double.py").write_text("def double(x):\n    return x + x\n")
        one_line_error(run_script("mutate.py", *options, "--again"), "the last run was of another sample")
        (tmp_path / ".mutate" / "results.json").write_text('{"sample": ')
        one_line_error(run_script("mutate.py", *options, "--again"), "no readable .mutate/results.json")

    def test_a_folder_outside_git_ends_in_one_line(self, tmp_path):
        one_line_error(run_script("mutate.py", "--root", str(tmp_path)), "is not a git work tree")

    def test_a_mutant_that_hangs_is_stopped_and_counted_as_killed(self, tmp_path):
        code = "def countdown(n):\n    while n > 0:\n        n = n - 1\n    return n\n"
        tests = "from countdown import countdown\n\n\ndef test_countdown_ends_at_0():\n    assert countdown(3) == 0\n"
        options = throwaway_repo(tmp_path, "countdown", code, tests, "--grace", "2")
        output = run_script("mutate.py", *options, "--file", "countdown.py", "--line", "3", check=True).stdout
        assert "countdown.py:3: n - 1 -> n + 1  killed (timeout)" in output, output
        assert "mutation score: 2 killed of 2 (100%)" in output, output
