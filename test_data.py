"""data.py and pcam_files.py on real HDF5 files written here: cleaning to uint8, the outlier filter, storage
layouts, progress lines, memory limits, the checks of bad files; and eda.py's counts and figures."""

import os
import pickle
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import matplotlib.pyplot
import numpy as np
import pytest
import torch

import common
import data
import eda
import pcam_files
from test_helpers import (
    HERE,
    is_nonblank_png,
    labels_of,
    one_line_error,
    run_main,
    tissue,
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

    def test_a_pass_over_blocks_counts_its_bytes_to_a_done_line(self, small_set, capsys):
        x_path = pcam_files.split_paths(small_set, "valid")[0]
        assert sum(len(block) for _, block in pcam_files.iter_raw_blocks(x_path, "scan valid")) == 64
        assert re.fullmatch(r"scan valid: 0.00 of 0.00 GB, [\d.]+ GB/s, done in \d+s\n", capsys.readouterr().out)

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
        monkeypatch.setenv("SLURM_MEM_PER_CPU", "1")
        assert data.free_memory() == (0, "SLURM_MEM_PER_CPU x CPUs")  # 4 MiB: the imports alone take more

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
        "bad shape": (with_train(np.zeros((4, 32, 32, 3), np.uint8), labels_of(4, 2)), "expected (images, 96, 96, 3)"),
        "int8 pixels": (with_train(tissue(4).astype(np.int8), labels_of(4, 2)), "int8 pixels cannot hold"),
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
        one_line_error(run_main("manage_data.py", "info", "--data-dir", str(tmp_path)), fragment)

    def test_the_splits_present_are_those_with_both_files_and_none_is_an_error(self, tmp_path):
        with pytest.raises(pcam_files.MissingDataError, match="camelyonpatch_level_2_split_train_x.h5"):
            pcam_files.present_splits(tmp_path)
        write_split(tmp_path, "test", tissue(2), labels_of(2, 1))
        assert pcam_files.present_splits(tmp_path) == ["test"]

    def test_missing_data_names_the_files_and_the_fix(self, tmp_path):
        with pytest.raises(pcam_files.MissingDataError, match="does not exist"):
            data.get_dataloaders(tmp_path / "nowhere")
        write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
        fix = r"camelyonpatch_level_2_split_valid_x\.h5.*`python manage_data\.py download"
        with pytest.raises(pcam_files.MissingDataError, match=fix):
            data.get_dataloaders(tmp_path)
        one_line_error(run_main("manage_data.py", "info", "--data-dir", str(tmp_path / "nowhere")), "does not exist")

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
            result = run_main(
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
        one_line_error(run_main("manage_data.py", "info", "--data-dir", str(tmp_path)), "'x'")


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

    def test_eda_says_which_scale_it_takes_integer_pixels_on(self, tmp_path, capsys):
        for dtype in (np.uint16, np.int32, np.uint8):
            write_split(tmp_path / dtype.__name__, "train", tissue(8, dtype=dtype), labels_of(8, 4))
            eda.scan_split(tmp_path / dtype.__name__, "train", 4, data.BLACK_THRESHOLD, data.WHITE_THRESHOLD)
            note = f"holds {np.dtype(dtype).name} pixels, taken on the 0..255 scale as train.py takes them"
            assert (note in capsys.readouterr().out) is (dtype is not np.uint8)

    def test_a_pixel_of_0_beside_a_nan_is_in_range(self, tmp_path):
        images = tissue(8, dtype=np.float32)
        images[1, 0, 0, 0], images[1, 0, 1, 0] = np.nan, 0.0  # a suspect row, for its NaN
        images[2, 0, 0, 0] = -1.0
        write_split(tmp_path, "train", images, labels_of(8, 4))
        scan = eda.scan_split(tmp_path, "train", 4, data.BLACK_THRESHOLD, data.WHITE_THRESHOLD)
        assert scan.flags["nan"].tolist() == [False, True] + [False] * 6
        assert scan.flags["out_of_range"].tolist() == [False, False, True] + [False] * 5
        assert np.array_equal(scan.outlier_examples["nan"], data.clean(images[1]))  # the first of its kind, cleaned
        assert [len(scan.samples[label]) for label in (0, 1)] == [4, 4]  # sample_grid images of each class

    def test_eda_counts_are_exact_and_its_figures_are_drawn(self, poisoned_dir, tmp_path):
        options = ("--data-dir", str(poisoned_dir), "--out-dir", str(tmp_path / "assets"), "--splits")
        result = run_main("eda.py", *options, "train", "valid", "test", "valid", check=True)
        assert "note: test split not in" in result.stdout and result.stdout.count("scanning valid") == 1
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
        result = run_main("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "figures"), check=True)
        train_row = next(line for line in result.stdout.splitlines() if line.startswith("train "))
        assert [int(value) for value in train_row.split()[1:8]] == [20, 10, 10, 0, 3, 0, 0]

    def test_eda_reports_bad_input_in_one_line(self, tmp_path):
        one_line_error(run_main("eda.py", "--data-dir", str(tmp_path / "nowhere")), "does not exist")
        (tmp_path / "empty").mkdir()
        one_line_error(run_main("eda.py", "--data-dir", str(tmp_path / "empty")), "train split missing in")
        write_split(tmp_path, "train", tissue(4), np.array([0, 1, 3, 1], np.uint8))
        result = run_main("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"))
        one_line_error(result, "labels must be 0 or 1")

    def test_eda_notes_the_splits_a_folder_lacks_and_scans_the_others(self, tmp_path):
        write_split(tmp_path / "test-only", "test", tissue(8), labels_of(8, 4))
        args = ("--data-dir", str(tmp_path / "test-only"), "--out-dir", str(tmp_path / "figures"))
        result = run_main("eda.py", *args, check=True)
        assert "note: train split not in" in result.stdout and "note: valid split not in" in result.stdout
        assert "scanning test" in result.stdout and (tmp_path / "figures" / "class_balance.png").exists()

    @pytest.mark.parametrize(
        "flags, fragment",
        [
            (["--black-threshold", "nan"], "--black-threshold"),
            (["--white-threshold", "inf"], "--white-threshold"),
            (["--black-threshold", "-1"], "--black-threshold"),
            (["--white-threshold", "256"], "--white-threshold"),
            (["--black-threshold", "200", "--white-threshold", "100"], "below --white-threshold"),
            (["--black-threshold", "100", "--white-threshold", "100"], "below --white-threshold"),
            (["--sample-grid", "0"], "--sample-grid 0: give 1 to 64"),
            (["--sample-grid", "99999999999999999999"], "give 1 to 64 patches per class"),
        ],
    )
    def test_eda_thresholds_and_grid_size_out_of_range_are_one_line(self, small_set, tmp_path, flags, fragment):
        result = run_main("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "figures"), *flags)
        one_line_error(result, fragment)
        assert not (tmp_path / "figures").exists()

    def test_eda_keeps_a_png_it_did_not_write(self, small_set, tmp_path):
        figures = tmp_path / "figures"
        figures.mkdir()
        matplotlib.pyplot.imsave(figures / "sample_grid.png", np.zeros((4, 4, 3)))
        before = (figures / "sample_grid.png").read_bytes()
        one_line_error(run_main("eda.py", "--data-dir", str(small_set), "--out-dir", str(figures)), "sample_grid.png")
        assert (figures / "sample_grid.png").read_bytes() == before and os.listdir(figures) == ["sample_grid.png"]
        for _ in range(2):
            run_main("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "mine"), check=True)
        assert is_nonblank_png(tmp_path / "mine" / "pcam.png")

    def test_a_corrupt_compressed_chunk_names_the_file(self, tmp_path):
        x_path, _ = write_split(
            tmp_path, "train", tissue(64), labels_of(64, 20), chunks=(8, 96, 96, 3), compression="gzip"
        )
        with open(x_path, "r+b") as x_file:  # scramble the middle of the file: compressed chunks, not the header
            x_file.seek(os.path.getsize(x_path) // 2)
            x_file.write(os.urandom(4096))
        one_line_error(
            run_main("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "figures")), "train_x.h5"
        )
