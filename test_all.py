"""Tests for pcam-mlp, on real HDF5 files written here and a real HTTP server on 127.0.0.1."""
import gzip
import hashlib
import http.server
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, env=None, check=False):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, *args], check=False, cwd=HERE, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def tissue(n, seed=0, dtype=np.uint8):
    """n plausible tissue tiles: mid-range values, never blank."""
    return np.random.default_rng(seed).integers(60, 200, size=(n, 96, 96, 3)).astype(dtype)


def write_split(data_dir, split, images, labels, **x_options):
    """Write one split in PCAM layout; x_options go to h5py (chunks, compression)."""
    os.makedirs(data_dir, exist_ok=True)
    x_path, y_path = data.split_paths(data_dir, split)
    with h5py.File(x_path, "w") as h5file:
        h5file.create_dataset("x", data=images, **x_options)
    with h5py.File(y_path, "w") as h5file:
        h5file.create_dataset("y", data=labels)
    return x_path, y_path


def labels_of(n, positives):
    labels = np.zeros(n, dtype=np.uint8)
    labels[:positives] = 1
    return np.random.default_rng(1).permutation(labels).reshape(n, 1, 1, 1)


@pytest.fixture
def small_set(tmp_path):
    """A uint8 set: 200 train (40% positive), 64 valid, 64 test."""
    for split, n, seed in (("train", 200, 0), ("valid", 64, 1), ("test", 64, 2)):
        write_split(tmp_path, split, tissue(n, seed), labels_of(n, int(0.4 * n)))
    return tmp_path


# ---- cleaning and the outlier filter ----

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cleaning_maps_nan_inf_and_out_of_range_pixels(tmp_path, dtype):
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


def test_big_endian_float_files_are_read_and_filtered(tmp_path):
    images = tissue(6, dtype=">f4")
    images[2], images[4, 0, 0, 0] = 0, np.nan
    ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(6, 3)), filter_data=True)
    assert ds.indices.tolist() == [0, 1, 3, 4, 5]
    assert np.array_equal(ds[[0]][0][0].numpy(), images[0].astype(np.uint8).transpose(2, 0, 1))
    assert ds[[3]][0][0, 0, 0, 0].item() == 0


def test_filter_drops_exactly_the_black_and_white_tiles(tmp_path):
    images = tissue(100)
    images[17], images[60], images[33] = 0, 255, 40
    paths = write_split(tmp_path, "train", images, labels_of(100, 50))
    filtered = data.PCAMDataset(*paths, filter_data=True)
    assert len(filtered) == 98 and len(filtered.indices) == 98
    assert 17 not in filtered.indices and 60 not in filtered.indices
    assert len(data.PCAMDataset(*paths)) == 100
    strict = data.PCAMDataset(*paths, filter_data=True, black_threshold=40, white_threshold=250)
    assert len(strict) == 97 and 33 not in strict.indices  # a dim tile at the threshold goes too


def test_filter_works_in_blocks_smaller_than_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 7 * data.IMAGE_BYTES)  # 7-image blocks over 50 images
    images = tissue(50)
    images[[3, 7, 49]] = 0
    paths = write_split(tmp_path, "train", images, labels_of(50, 25))
    assert data.PCAMDataset(*paths, filter_data=True).indices.tolist() == [i for i in range(50) if i not in (3, 7, 49)]


@pytest.mark.parametrize("shape, dtype", [((40,), np.int64), ((40, 1), np.uint8), ((40, 1, 1, 1), np.float32)])
def test_label_layouts_are_accepted(tmp_path, shape, dtype):
    labels = labels_of(40, 10).reshape(shape).astype(dtype)
    ds = data.PCAMDataset(*write_split(tmp_path, "train", tissue(40), labels))
    assert ds.labels.tolist() == labels.reshape(-1).astype(int).tolist()


def test_transform_receives_the_cleaned_uint8_array(tmp_path):
    images = tissue(3, dtype=np.float32)
    images[0, 0, 0, 0] = np.nan
    seen = []

    def transform(image):
        seen.append((image.shape, image.dtype, image[0, 0, 0]))
        return torch.zeros(1)

    ds = data.PCAMDataset(*write_split(tmp_path, "train", images, labels_of(3, 1)), transform=transform)
    assert ds[0][0].shape == (1,)
    assert seen == [((96, 96, 3), np.uint8, 0)]


# ---- storage layouts, lazy handles, preload ----

def test_memmap_and_h5py_paths_read_the_same_images(tmp_path):
    images, labels = tissue(64), labels_of(64, 20)
    plain = data.PCAMDataset(*write_split(tmp_path / "plain", "train", images, labels))
    packed = data.PCAMDataset(*write_split(tmp_path / "packed", "train", images, labels,
                                           chunks=(8, 96, 96, 3), compression="gzip"))
    rows = [5, 63, 0, 5, 17]
    assert torch.equal(plain[rows][0], packed[rows][0])
    assert torch.equal(plain[rows][1], packed[rows][1])
    assert isinstance(plain._reader, data.MappedRows) and isinstance(packed._reader, data.ChunkedRows)
    assert np.array_equal(plain[rows][0].permute(0, 2, 3, 1).numpy(), images[rows])


def test_pickled_dataset_carries_no_open_handle(small_set):
    ds = data.load_split(small_set, "train")
    ds[[1, 2]]  # opens the file in this process
    state = ds.__getstate__()
    assert state["_reader"] is None and ds._reader is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[[3, 4]][0], ds[[3, 4]][0])


def test_preload_serves_the_same_batches(small_set):
    streaming = data.load_split(small_set, "train", filter_data=True)
    preloaded = data.load_split(small_set, "train", filter_data=True, preload=True)
    rows = [0, 199 - 1, 42]
    assert torch.equal(streaming[rows][0], preloaded[rows][0])


def test_preload_refuses_when_memory_is_short(small_set, monkeypatch):
    monkeypatch.setattr(data, "available_memory_bytes", lambda: 1000)
    with pytest.raises(data.PCAMError, match="--preload needs"):
        data.load_split(small_set, "train", preload=True)


# ---- loaders ----

def test_loader_batches_have_the_contract_shapes(small_set):
    train_loader, _ = data.get_dataloaders(small_set, batch_size=32)
    images, labels = next(iter(train_loader))
    assert images.shape == (32, 3, 96, 96) and images.dtype == torch.uint8
    assert labels.shape == (32,) and labels.dtype == torch.long
    assert sum(len(labels) for _, labels in train_loader) == 200  # one epoch = the kept train rows
    test_images, _ = next(iter(data.get_test_loader(small_set, batch_size=16)))
    assert test_images.shape == (16, 3, 96, 96)


def test_validation_reads_every_kept_row_once_in_order(tmp_path):
    images = tissue(70)
    images[[10, 11]] = 255
    write_split(tmp_path, "train", tissue(20), labels_of(20, 10))
    write_split(tmp_path, "valid", images, labels_of(70, 30))
    _, val_loader = data.get_dataloaders(tmp_path, batch_size=16, filter_data=True)
    seen = torch.cat([batch for batch, _ in val_loader])
    expected = np.delete(images, [10, 11], axis=0).transpose(0, 3, 1, 2)
    assert np.array_equal(seen.numpy(), expected)


def test_train_loader_balances_an_80_20_file(tmp_path):
    write_split(tmp_path, "train", tissue(500), labels_of(500, 100))
    write_split(tmp_path, "valid", tissue(8), labels_of(8, 4))
    train_loader, _ = data.get_dataloaders(tmp_path, batch_size=100, seed=3)
    drawn = torch.cat([labels for _ in range(8) for _, labels in train_loader])
    assert abs(drawn.float().mean().item() - 0.5) < 0.05  # 4,000 draws: 3 sigma is 0.024


def test_balance_is_computed_on_the_kept_rows(tmp_path):
    images = tissue(200)
    labels = labels_of(200, 100)
    positives = np.flatnonzero(labels.reshape(-1) == 1)
    images[positives[:80]] = 0  # the filter removes 80 of the 100 positives
    write_split(tmp_path, "train", images, labels)
    write_split(tmp_path, "valid", tissue(8), labels_of(8, 4))
    train_loader, _ = data.get_dataloaders(tmp_path, batch_size=120, filter_data=True, seed=0)
    drawn = torch.cat([labels for _ in range(20) for _, labels in train_loader])
    assert abs(drawn.float().mean().item() - 0.5) < 0.04


def test_same_seed_same_batches_whatever_the_workers(small_set):
    def epochs(num_workers, seed):
        train_loader, _ = data.get_dataloaders(small_set, batch_size=32, num_workers=num_workers, seed=seed)
        return [torch.cat([labels for _, labels in train_loader]) for _ in range(2)], \
            [images.sum().item() for images, _ in train_loader]

    no_workers = epochs(0, 7)
    for got, expected in zip(epochs(2, 7), no_workers):
        assert all(torch.equal(a, b) for a, b in zip(got, expected)) if isinstance(got[0], torch.Tensor) else got == expected
    assert epochs(1, 7)[1] == no_workers[1]
    assert epochs(0, 8)[1] != no_workers[1]


# ---- bad input: a precise exception from Python, one line and exit 1 from the command line ----

def bad_sets():
    """name -> (writer(data_dir), message fragment)."""
    def with_train(images, labels, **options):
        return lambda d: write_split(d, "train", images, labels, **options)

    def missing_key(d):
        with_train(tissue(4), labels_of(4, 2))(d)
        with h5py.File(data.split_paths(d, "train")[0], "w") as h5file:
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
        "bad labels": (with_train(tissue(4), np.array([0, 1, 2, 1], np.uint8)), "labels must be 0 or 1"),
        "truncated": (truncated, "truncated"),
        "not hdf5": (not_hdf5, "not a readable HDF5 file"),
    }


@pytest.mark.parametrize("name", list(bad_sets()))
def test_bad_files_raise_a_precise_error(tmp_path, name):
    write, fragment = bad_sets()[name]
    write(tmp_path)
    with pytest.raises(data.PCAMError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ds = data.load_split(tmp_path, "train")
        ds[[0, 1]]
    result = run_script("data.py", "info", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_data_names_the_files_and_the_fix(tmp_path):
    with pytest.raises(data.MissingDataError, match="does not exist"):
        data.get_dataloaders(tmp_path / "nowhere")
    write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
    with pytest.raises(data.MissingDataError, match="camelyonpatch_level_2_split_valid_x.h5.*data.py download"):
        data.get_dataloaders(tmp_path)
    result = run_script("data.py", "info", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_a_split_emptied_by_the_filter_or_of_one_class_is_refused(tmp_path):
    write_split(tmp_path / "blank", "train", np.zeros((6, 96, 96, 3), np.uint8), labels_of(6, 3))
    with pytest.raises(data.PCAMError, match="removed every image"):
        data.load_split(tmp_path / "blank", "train", filter_data=True)
    write_split(tmp_path / "one", "train", tissue(6), np.zeros(6, np.uint8))
    write_split(tmp_path / "one", "valid", tissue(6), labels_of(6, 3))
    with pytest.raises(data.PCAMError, match="single class"):
        data.get_dataloaders(tmp_path / "one", num_workers=2)


# ---- data.py commands: synth, prepare, info, manifest, verify ----

def test_synth_writes_pcam_files_with_the_defects_asked_for(tmp_path):
    run_script("data.py", "synth", "--data-dir", str(tmp_path), "--n-train", "300", "--n-valid", "50",
               "--n-test", "0", "--poison", "0.2", "--dtype", "float32", check=True)
    assert not os.path.exists(data.split_paths(tmp_path, "test")[0])
    with h5py.File(data.split_paths(tmp_path, "train")[0]) as h5file:
        x = h5file["x"][()]
        counts = {k: int(v) for k, v in h5file["x"].attrs.items()}
    assert x.dtype == np.float32 and x.shape == (300, 96, 96, 3)
    assert counts == {"poison_black": 15, "poison_white": 15, "poison_nan": 15, "poison_1e5": 15}
    assert np.isnan(x).any(axis=(1, 2, 3)).sum() == 15
    assert (x > 255).any(axis=(1, 2, 3)).sum() == 15
    kept = data.load_split(tmp_path, "train", filter_data=True)
    assert len(kept) == 270


def test_prepare_writes_a_clean_contiguous_uint8_copy(tmp_path):
    source = tmp_path / "course"
    run_script("data.py", "synth", "--data-dir", str(source), "--n-train", "120", "--n-valid", "40",
               "--n-test", "0", "--poison", "0.1", "--dtype", "float32", check=True)
    packed = tmp_path / "packed"
    write_split(packed, "train", tissue(30), labels_of(30, 10), chunks=(4, 96, 96, 3), compression="gzip")
    for src, out in ((source, tmp_path / "fast"), (packed, tmp_path / "fast_packed")):
        result = run_script("data.py", "prepare", "--data-dir", str(src), "--out", str(out), check=True)
        assert "images/s" in result.stdout
        assert not [name for name in os.listdir(out) if name.endswith(".partial")]
    x_source, x_fast = data.split_paths(source, "train")[0], data.split_paths(tmp_path / "fast", "train")[0]
    assert os.path.getsize(x_fast) < os.path.getsize(x_source) / 3.9  # float32 -> uint8
    original, prepared = data.load_split(source, "valid"), data.load_split(tmp_path / "fast", "valid")
    assert torch.equal(original[list(range(40))][0], prepared[list(range(40))][0])
    assert prepared.labels.tolist() == original.labels.tolist()
    unpacked = data.load_split(tmp_path / "fast_packed", "train")
    assert torch.equal(unpacked[[0, 29]][0], data.load_split(packed, "train")[[0, 29]][0])
    assert isinstance(unpacked._reader, data.MappedRows)  # the chunked, compressed file became memmap-able
    again = run_script("data.py", "prepare", "--data-dir", str(source), "--out", str(tmp_path / "fast"), check=True)
    assert "already a prepared copy" in again.stdout


def test_info_prints_a_table_per_split(small_set):
    lines = run_script("data.py", "info", "--data-dir", str(small_set), check=True).stdout.splitlines()
    train = next(line for line in lines if line.startswith("train")).split()
    assert train[1] == "200" and train[2] == "uint8" and train[-2:] == ["120", "80"]
    assert any(line.startswith("test") for line in lines)


def test_manifest_then_verify_names_the_changed_file(small_set):
    run_script("data.py", "manifest", "--data-dir", str(small_set), check=True)
    assert "all 6 files match" in run_script("data.py", "verify", "--data-dir", str(small_set), check=True).stdout
    x_valid = data.split_paths(small_set, "valid")[0]
    with h5py.File(x_valid, "r+") as h5file:
        h5file["x"][0, 0, 0, 0] = 255 - h5file["x"][0, 0, 0, 0]
    result = run_script("data.py", "verify", "--data-dir", str(small_set))
    assert result.returncode == 1
    assert "camelyonpatch_level_2_split_valid_x.h5 (contents differ)" in result.stderr
    assert "train_x" not in result.stderr


# ---- download, against a real HTTP server on 127.0.0.1 ----

class PCAMServer(http.server.BaseHTTPRequestHandler):
    """Serves self.server.files {name: bytes}, honours Range, and cuts the first reply of names in cut_once."""

    def do_GET(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        self.server.requests.append((name, self.headers.get("Range")))
        if name not in self.server.files:
            self.send_error(404)
            return
        body, start = self.server.files[name], 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in self.server.cut_once:
            self.server.cut_once.remove(name)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def pcam_server(tmp_path):
    """Gzipped small PCAM files served on 127.0.0.1, and a checksums file for them."""
    source = tmp_path / "source"
    files = {}
    for split, n in (("train", 40), ("valid", 10), ("test", 10)):
        for path in write_split(source, split, tissue(n), labels_of(n, n // 2)):
            files[os.path.basename(path) + ".gz"] = gzip.compress(Path(path).read_bytes(), mtime=0)
    checksums = tmp_path / "md5.txt"
    checksums.write_text("".join(f"{hashlib.md5(body).hexdigest()}  {name}\n" for name, body in files.items()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PCAMServer)
    server.files, server.cut_once, server.requests = files, set(), []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/records/2546921/files"
    server.checksums, server.source = str(checksums), source
    yield server
    server.shutdown()


def download(server, data_dir, *splits):
    return run_script("data.py", "download", "--data-dir", str(data_dir), "--splits", *splits,
                      env={"PCAM_BASE_URL": server.base_url, "PCAM_CHECKSUMS": server.checksums,
                           "PCAM_RETRY_DELAY_SCALE": "0"})


def test_download_fetches_verifies_and_unpacks(pcam_server, tmp_path):
    result = download(pcam_server, tmp_path / "data", "train", "valid")
    assert result.returncode == 0, result.stderr
    assert "md5 ok" in result.stdout and "download" in result.stdout
    for split in ("train", "valid"):
        for got, sent in zip(data.split_paths(tmp_path / "data", split), data.split_paths(pcam_server.source, split)):
            assert Path(got).read_bytes() == Path(sent).read_bytes()
    assert sorted(os.listdir(tmp_path / "data")) == sorted(
        os.path.basename(p) for s in ("train", "valid") for p in data.split_paths(tmp_path, s))
    assert download(pcam_server, tmp_path / "data", "train").stdout.count("already present") == 2


def test_download_resumes_a_cut_connection_with_range(pcam_server, tmp_path):
    pcam_server.cut_once.add("camelyonpatch_level_2_split_test_x.h5.gz")
    result = download(pcam_server, tmp_path / "data", "test")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    ranges = [rng for name, rng in pcam_server.requests if name == "camelyonpatch_level_2_split_test_x.h5.gz"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0
    x_path = data.split_paths(tmp_path / "data", "test")[0]
    assert Path(x_path).read_bytes() == Path(data.split_paths(pcam_server.source, "test")[0]).read_bytes()


def test_download_resumes_a_partial_file_left_by_an_earlier_run(pcam_server, tmp_path):
    name = "camelyonpatch_level_2_split_valid_y.h5.gz"
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / (name + ".part")).write_bytes(pcam_server.files[name][:100])
    assert download(pcam_server, tmp_path / "data", "valid").returncode == 0
    assert ("camelyonpatch_level_2_split_valid_y.h5.gz", "bytes=100-") in pcam_server.requests


def test_a_corrupt_download_never_keeps_its_final_name(pcam_server, tmp_path):
    name = "camelyonpatch_level_2_split_valid_x.h5.gz"
    pcam_server.files[name] = pcam_server.files[name][:-10] + b"0123456789"
    result = download(pcam_server, tmp_path / "data", "valid")
    assert result.returncode == 1
    assert "md5 does not match" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not [n for n in os.listdir(tmp_path / "data") if n.startswith("camelyonpatch_level_2_split_valid_x")]


def test_download_reports_a_missing_file_on_the_server(pcam_server, tmp_path):
    del pcam_server.files["camelyonpatch_level_2_split_train_y.h5.gz"]
    result = download(pcam_server, tmp_path / "data", "train")
    assert result.returncode == 1 and "HTTP 404" in result.stderr


def test_filtering_a_float_file_agrees_with_its_uint8_copy_at_the_thresholds(tmp_path):
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


# ---- model.py ----

def test_mlp_maps_a_batch_to_two_logits():
    from model import MLP
    assert MLP()(torch.rand(8, 3, 96, 96) * 255).shape == (8, 2)
    assert MLP(hidden_units=(16,), num_classes=5)(torch.rand(3, 3, 96, 96)).shape == (3, 5)


def test_mlp_parameter_count_for_64_32():
    from model import MLP
    expected = (3 * 96 * 96 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)
    assert sum(p.numel() for p in MLP(hidden_units=(64, 32)).parameters()) == expected == 1_771_682


def test_one_sgd_step_changes_the_weights():
    from model import MLP
    torch.manual_seed(0)
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 96, 96)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_normalisation_travels_in_the_state_dict():
    from model import MLP
    model = MLP()
    model.set_normalization([10.0, 20.0, 30.0], [2.0, 4.0, 8.0])
    clone = MLP()
    clone.load_state_dict(model.state_dict())
    assert clone.channel_mean.flatten().tolist() == [10.0, 20.0, 30.0]
    images = torch.rand(2, 3, 96, 96) * 255
    model.eval()
    clone.eval()
    assert torch.equal(model(images), clone(images))


# ---- train.py ----

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synth")
    data.main(["synth", "--data-dir", str(directory), "--n-train", "1536", "--n-valid", "512", "--n-test", "256"])
    return directory


def train_args(synth_dir, out_dir, *extra):
    return ["--data-dir", str(synth_dir), "--out-dir", str(out_dir), "--batch-size", "64", "--log-every", "10",
            "--device", "cpu", *extra]


def read_csv_rows(path):
    import csv
    with open(path, newline="") as source:
        return list(csv.DictReader(source))


LOSS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr")


def loss_columns(run_dir):
    return [[row[column] for column in LOSS_COLUMNS] for row in read_csv_rows(run_dir / "metrics.csv")]


def assert_same_weights(run_dir, other_run_dir):
    weights, expected = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (run_dir, other_run_dir))
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def is_nonblank_png(path):
    import matplotlib.image
    with open(path, "rb") as image_file:
        assert image_file.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 1


@pytest.fixture(scope="module")
def straight_run(synth_dir, tmp_path_factory):
    """A 3-epoch run that the reproducibility and resume tests compare against."""
    import train
    out_dir = tmp_path_factory.mktemp("runs") / "straight"
    train.main(train_args(synth_dir, out_dir, "--epochs", "3"))
    return out_dir


def test_a_run_learns_and_leaves_a_complete_record(straight_run, capsys):
    import json
    rows = read_csv_rows(straight_run / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr",
                             "epoch_s", "images_per_s"]
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


def test_the_same_seed_gives_the_same_metrics(synth_dir, straight_run, tmp_path):
    import train
    train.main(train_args(synth_dir, tmp_path / "again", "--epochs", "3"))
    assert loss_columns(tmp_path / "again") == loss_columns(straight_run)
    train.main(train_args(synth_dir, tmp_path / "other", "--epochs", "1", "--seed", "1"))
    assert loss_columns(tmp_path / "other")[0] != loss_columns(straight_run)[0]


def test_stopping_after_epoch_1_and_resuming_equals_a_straight_run(synth_dir, straight_run, tmp_path):
    import train
    train.main(train_args(synth_dir, tmp_path / "split", "--epochs", "1"))
    train.main(["--out-dir", str(tmp_path / "split"), "--data-dir", str(synth_dir), "--resume", "--epochs", "3"])
    assert loss_columns(tmp_path / "split") == loss_columns(straight_run)
    assert_same_weights(tmp_path / "split", straight_run)


def test_sigterm_mid_epoch_then_resume_matches(synth_dir, straight_run, tmp_path):
    import signal
    args = train_args(synth_dir, tmp_path / "killed", "--epochs", "3")
    process = subprocess.Popen([sys.executable, "-u", "train.py", *args], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("epoch 2/3 step 10/"):
            process.send_signal(signal.SIGTERM)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 75, output
    assert "stopped by SIGTERM" in output and "epoch 2/3 train_loss" not in output
    assert len(read_csv_rows(tmp_path / "killed" / "metrics.csv")) == 1
    resumed = run_script("train.py", *args, "--resume", check=True)
    assert "resuming" in resumed.stdout
    assert loss_columns(tmp_path / "killed") == loss_columns(straight_run)
    assert_same_weights(tmp_path / "killed", straight_run)


def test_dry_run_takes_one_batch_each_and_writes_nothing(synth_dir, tmp_path):
    result = run_script("train.py", *train_args(synth_dir, tmp_path / "dry", "--dry-run"), check=True)
    assert "epoch 1/5 step 1/" in result.stdout and "dry run: one validation batch" in result.stdout
    assert not (tmp_path / "dry").exists()


def test_start_up_says_what_it_runs_on(synth_dir, tmp_path):
    output = run_script("train.py", *train_args(synth_dir, tmp_path / "r", "--dry-run"), check=True).stdout
    for expected in ("arguments:", "host=", "slurm_job_id=", "torch=", "device=", "1,771,682 parameters",
                     "train: 1,536 images kept", "% positive"):
        assert expected in output


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--resume"], "no checkpoint"),
])
def test_bad_arguments_end_in_one_line_before_training(synth_dir, tmp_path, flags, fragment):
    args = ["--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "run"), *flags]
    result = run_script("train.py", *args)
    assert result.returncode != 0
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_and_auto_falls_back(synth_dir, tmp_path):
    result = run_script("train.py", *train_args(synth_dir, tmp_path / "r")[:-2], "--device", "cuda")
    assert result.returncode == 1 and "CUDA is not available" in result.stderr
    auto = run_script("train.py", *train_args(synth_dir, tmp_path / "r")[:-2], "--dry-run")
    assert "CUDA not available, using CPU" in auto.stdout


def test_unwritable_out_dir_and_missing_data_are_reported(synth_dir, tmp_path):
    import train
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stop:
        train.main(["--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "a_file" / "run")])
    assert "cannot write to --out-dir" in str(stop.value.code)
    with pytest.raises(SystemExit) as stop:
        train.main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "run")])
    assert "does not exist" in str(stop.value.code) and "data.py synth" in str(stop.value.code)


def test_resume_names_a_model_shape_mismatch(synth_dir, tmp_path):
    import train
    train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1"))
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(synth_dir, tmp_path / "run", "--resume", "--epochs", "2", "--hidden-units", "128", "32"))
    assert "--hidden-units [128, 32] does not match the model shape" in str(stop.value.code)
    with pytest.raises(SystemExit) as stop:
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "2"))
    assert "already holds a run" in str(stop.value.code)


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(synth_dir, tmp_path):
    result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e30"))
    assert result.returncode == 1 and "training loss became" in result.stderr
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0


# ---- plot_loss.py ----

def test_plot_overlays_runs_and_writes_where_asked(straight_run, tmp_path):
    out = tmp_path / "assets" / "loss_plot.png"
    run_script("plot_loss.py", str(straight_run), str(straight_run / "metrics.csv"), "--out", str(out), check=True)
    assert is_nonblank_png(out)
    (straight_run / "loss.png").unlink()
    run_script("plot_loss.py", str(straight_run), check=True)
    assert is_nonblank_png(straight_run / "loss.png")


@pytest.mark.parametrize("content, fragment", [
    (None, "not found"),
    ("", "has no epoch rows"),
    ("epoch,loss\n1,0.5\n", "lacks the columns"),
    ("epoch,train_loss,val_loss,val_acc\n1,0.5,zero,0.7\n", "not numbers"),
])
def test_plot_rejects_bad_metrics_files(tmp_path, content, fragment):
    path = tmp_path / "metrics.csv"
    if content is not None:
        path.write_text(content)
    result = run_script("plot_loss.py", str(path))
    assert result.returncode == 1 and fragment in result.stderr and "Traceback" not in result.stderr


# ---- eda.py ----

@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory):
    """A float32 set with known defects: train and valid, no test split."""
    directory = tmp_path_factory.mktemp("poisoned")
    data.main(["synth", "--data-dir", str(directory), "--n-train", "600", "--n-valid", "200", "--n-test", "0",
               "--poison", "0.2", "--dtype", "float32", "--seed", "3"])
    return directory


def expected_counts(directory, split):
    """Defect counts computed here, independently, from the whole file."""
    x_path, y_path = data.split_paths(directory, split)
    with h5py.File(x_path) as h5file:
        x = h5file["x"][()]
    cleaned_means = np.clip(np.nan_to_num(x, nan=0, posinf=255, neginf=0), 0, 255).astype(np.uint8).mean(axis=(1, 2, 3))
    labels = data.read_labels(y_path)
    return [len(x), int((labels == 0).sum()), int(labels.sum()), int(np.isnan(x).any(axis=(1, 2, 3)).sum()),
            int(((x < 0) | (x > 255)).any(axis=(1, 2, 3)).sum()), int((cleaned_means <= 5).sum()),
            int((cleaned_means >= 250).sum())]


def test_eda_counts_are_exact_and_its_figures_are_drawn(poisoned_dir, tmp_path):
    result = run_script("eda.py", "--data-dir", str(poisoned_dir), "--out-dir", str(tmp_path / "assets"), check=True)
    assert "note: test split not in" in result.stdout
    for split in ("train", "valid"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(split + " "))
        assert [int(value) for value in line.split()[1:8]] == expected_counts(poisoned_dir, split)
    train_counts = expected_counts(poisoned_dir, "train")
    assert train_counts[3:] == [30, 30, 30, 30]  # the synth defects: NaN, 1e5, black, white
    for name in ("pcam.png", "class_balance.png", "sample_grid.png", "channel_histograms.png"):
        assert is_nonblank_png(tmp_path / "assets" / name)


def test_eda_memory_stays_bounded_on_a_file_larger_than_a_block(poisoned_dir, monkeypatch):
    import tracemalloc

    import eda
    monkeypatch.setattr(data, "BLOCK_BYTES", 16 * data.IMAGE_BYTES * 4)  # 16 float32 images of 600
    x_bytes = os.path.getsize(data.split_paths(poisoned_dir, "train")[0])
    tracemalloc.start()
    scan = eda.scan_split(poisoned_dir, "train", 4, data.BLACK_THRESHOLD, data.WHITE_THRESHOLD)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert x_bytes > 30 * data.BLOCK_BYTES
    assert peak < 8 * data.BLOCK_BYTES, f"peak {peak} bytes for a {x_bytes}-byte file read in {data.BLOCK_BYTES}"
    assert list(scan.summary().values())[:7] == expected_counts(poisoned_dir, "train")


def test_eda_reports_bad_input_in_one_line(tmp_path):
    result = run_script("eda.py", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    write_split(tmp_path, "train", tissue(4), np.array([0, 1, 3, 1], np.uint8))
    result = run_script("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 1 and "labels must be 0 or 1" in result.stderr


# ---- failures: nothing lost, nothing silent ----

WORKER_FLAGS = ["--num-workers", "2"]  # the loader path the signal tests run with DataLoader workers


def one_line_error(result, fragment):
    """A user's mistake: non-zero exit, one line on stderr holding fragment, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def linked_set(source_dir, target_dir, splits=("train", "valid")):
    """A data folder whose good splits are symbolic links to source_dir's (tests then add a broken one)."""
    os.makedirs(target_dir, exist_ok=True)
    for split in splits:
        for source, target in zip(data.split_paths(source_dir, split), data.split_paths(target_dir, split)):
            os.symlink(source, target)
    return target_dir


def start_run(args):
    """train.py in its own process group, as sbatch and a terminal start it; returns once step 10 is logged."""
    process = subprocess.Popen([sys.executable, "-u", "train.py", *args], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        if " step 10/" in line:
            return process
    raise AssertionError(f"train.py ended before step 10 with {process.wait()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a full disk that tests can fill. Needs root (mount)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk cases are untested")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def read_only_dir(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return small_disk


def test_synth_never_overwrites_a_data_set(small_set, tmp_path):
    x_train = data.split_paths(small_set, "train")[0]
    before = hashlib.sha256(Path(x_train).read_bytes()).hexdigest()
    for extra in ([], ["--force"]):
        one_line_error(run_script("data.py", "synth", "--data-dir", str(small_set), *extra), str(small_set))
    assert hashlib.sha256(Path(x_train).read_bytes()).hexdigest() == before
    synthetic = tmp_path / "synthetic"
    run_script("data.py", "synth", "--data-dir", str(synthetic), "--n-train", "20", "--n-valid", "8", "--n-test", "0",
               check=True)
    one_line_error(run_script("data.py", "synth", "--data-dir", str(synthetic), "--n-train", "30"), "--force")
    run_script("data.py", "synth", "--data-dir", str(synthetic), "--n-train", "30", "--n-test", "0", "--force",
               check=True)
    assert len(data.load_split(synthetic, "train")) == 30


def test_prepare_follows_its_source_not_mtimes(tmp_path):
    def synth(directory, seed):
        run_script("data.py", "synth", "--data-dir", str(directory), "--n-train", "40", "--n-valid", "16",
                   "--n-test", "0", "--seed", str(seed), "--force", check=True)

    source, other, out = tmp_path / "source", tmp_path / "other", tmp_path / "out"
    synth(source, 0)
    run_script("data.py", "prepare", "--data-dir", str(source), "--out", str(out), check=True)
    synth(source, 1)  # set B written over set A, with A's old mtimes (as cp -p or rsync -t leave them)
    for path in (p for split in ("train", "valid") for p in data.split_paths(source, split)):
        os.utime(path, (1e9, 1e9))
    again = run_script("data.py", "prepare", "--data-dir", str(source), "--out", str(out), check=True)
    assert "already a prepared copy" not in again.stdout
    assert torch.equal(data.load_split(out, "train")[list(range(40))][0],
                       data.load_split(source, "train")[list(range(40))][0])
    synth(other, 2)
    one_line_error(run_script("data.py", "prepare", "--data-dir", str(other), "--out", str(out)), str(source))


def bad_test_splits():
    """name -> (writer(data_dir), message fragment): a test split broken in one way each."""
    def truncated(d):
        x_path, _ = write_split(d, "test", tissue(64), labels_of(64, 20), chunks=(8, 96, 96, 3), compression="gzip")
        with open(x_path, "r+b") as x_file:
            x_file.truncate(os.path.getsize(x_path) * 2 // 3)

    def half(d):
        write_split(d, "test", tissue(8), labels_of(8, 4))
        os.remove(data.split_paths(d, "test")[1])

    return {
        "zero rows": (lambda d: write_split(d, "test", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0)),
                      "holds no images"),
        "truncated": (truncated, "test_x.h5"),
        "x without y": (half, "camelyonpatch_level_2_split_test_y.h5 not found"),
        "scale 0..1": (lambda d: write_split(d, "test", tissue(8, dtype=np.float32) / 255, labels_of(8, 4)), "0..1"),
    }


@pytest.mark.parametrize("name", list(bad_test_splits()))
def test_every_split_is_checked_before_the_first_step(synth_dir, tmp_path, name):
    write, fragment = bad_test_splits()[name]
    write(linked_set(synth_dir, tmp_path / "data"))
    result = run_script("train.py", *train_args(tmp_path / "data", tmp_path / "run", "--epochs", "1"))
    one_line_error(result, fragment)
    assert "epoch 1/1" not in result.stdout
    assert not (tmp_path / "run").exists()  # nothing for make plot to pick up


def test_a_zero_row_validation_split_is_one_line_before_training(synth_dir, tmp_path):
    linked_set(synth_dir, tmp_path / "data", splits=("train",))
    write_split(tmp_path / "data", "valid", np.zeros((0, 96, 96, 3), np.uint8), labels_of(0, 0))
    result = run_script("train.py", *train_args(tmp_path / "data", tmp_path / "run"))
    one_line_error(result, "valid_x.h5 holds no images")
    assert "step 1/" not in result.stdout


def test_one_run_per_folder(synth_dir, tmp_path):
    import signal
    import socket
    args = train_args(synth_dir, tmp_path / "run", "--epochs", "50")
    first = start_run(args)
    try:
        for extra in ([], ["--resume"]):
            one_line_error(run_script("train.py", *args, *extra), f"PID {first.pid} on {socket.gethostname()}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    epoch = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"]
    resumed = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", str(epoch + 1)), "--resume",
                         check=True)
    assert f"resuming {tmp_path / 'run'} after epoch {epoch}" in resumed.stdout  # the killed run left no lock


def test_temporary_files_carry_the_writers_pid(synth_dir, tmp_path):
    import train
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    others = [run_dir / f"{name}.partial" for name in ("last.pt", "best.pt", "metrics.csv", "run.json")]
    for path in others:
        path.write_text("another writer's file")
    train.main(train_args(synth_dir, run_dir, "--epochs", "1"))
    assert [path.read_text() for path in others] == ["another writer's file"] * 4
    assert len(read_csv_rows(run_dir / "metrics.csv")) == 1


@pytest.mark.parametrize("signal_name, exit_code, status", [
    ("SIGTERM", 75, "stopped"), ("SIGUSR1", 75, "stopped"), ("SIGINT", 130, "interrupted")])
def test_a_signal_to_the_process_group_with_workers_stops_cleanly(synth_dir, tmp_path, signal_name, exit_code, status):
    import json
    import signal
    process = start_run(train_args(synth_dir, tmp_path / "run", "--epochs", "50", *WORKER_FLAGS))
    os.killpg(process.pid, getattr(signal, signal_name))  # what scancel, preemption and Ctrl-C do
    output = process.stdout.read()
    assert process.wait(timeout=120) == exit_code, output
    assert "Traceback" not in output and "Error" not in output
    assert len([line for line in output.splitlines() if line.startswith(("stopped by", "interrupted by"))]) == 1
    if exit_code == 75:
        assert f"stopped by {signal_name}" in output
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == status


def test_non_finite_weights_or_validation_loss_never_reach_a_checkpoint(synth_dir, tmp_path):
    import json
    # one step per epoch: the step's own loss is finite, the weights it leaves behind are not
    result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", "--epochs", "2", "--optimizer", "sgd",
                                                "--lr", "1e30"), "--batch-size", "2048")
    one_line_error(result, "in epoch 1")
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (tmp_path / "run" / "best.pt").exists()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "in epoch 1" in record["error"]


def test_non_finite_or_negative_numbers_are_refused_up_front(synth_dir, tmp_path):
    for flags in (["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "-1"], ["--momentum", "-1"],
                  ["--weight-decay", "inf"], ["--momentum", "nan"]):
        result = run_script("train.py", *train_args(synth_dir, tmp_path / "run", *flags))
        one_line_error(result, flags[0])
        assert not (tmp_path / "run").exists()


def test_pixel_scale_is_checked_from_a_sample(tmp_path, poisoned_dir, small_set):
    write_split(tmp_path / "unit", "train", tissue(40, dtype=np.float32) / 255, labels_of(40, 10))
    write_split(tmp_path / "wide", "train", tissue(40, dtype=np.uint16) * 16, labels_of(40, 10))
    for name, fragment in (("unit", "all within 0..1"), ("wide", "uint16 pixel values up to")):
        with pytest.raises(data.PCAMError, match=fragment):
            data.load_split(tmp_path / name, "train")
        result = run_script("data.py", "prepare", "--data-dir", str(tmp_path / name), "--out", str(tmp_path / "out"))
        one_line_error(result, "expected the 0..255 scale")
    assert len(data.load_split(poisoned_dir, "train")) == 600  # float32 0..255 with NaN and 1e5 pixels
    assert len(data.load_split(small_set, "train")) == 200  # the official files' uint8


def test_a_split_with_x_but_no_y_is_an_error_everywhere(small_set, tmp_path):
    os.remove(data.split_paths(small_set, "test")[1])
    missing = "camelyonpatch_level_2_split_test_y.h5 not found"
    for command in ("info", "manifest"):
        one_line_error(run_script("data.py", command, "--data-dir", str(small_set)), missing)
    one_line_error(run_script("data.py", "prepare", "--data-dir", str(small_set), "--out", str(tmp_path / "out")),
                   missing)
    one_line_error(run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(tmp_path / "figures")), missing)


def test_train_honours_the_manifest(small_set, tmp_path):
    import json
    run_script("data.py", "manifest", "--data-dir", str(small_set), check=True)
    run_script("train.py", *train_args(small_set, tmp_path / "run", "--epochs", "1"), check=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["manifest_matched"] is True
    x_valid = data.split_paths(small_set, "valid")[0]
    os.utime(x_valid, (1e9, 1e9))
    result = run_script("train.py", *train_args(small_set, tmp_path / "again", "--epochs", "1"))
    one_line_error(result, "camelyonpatch_level_2_split_valid_x.h5 (size or mtime changed)")
    assert "data.py verify" in result.stderr and "data.py manifest" in result.stderr
    assert "step 1/" not in result.stdout


@pytest.mark.parametrize("entry", ['[]', '"a string"', '{"bytes": SIZE}', '{"bytes": SIZE, "sha256": 5}'])
def test_verify_reads_a_hand_edited_manifest_in_one_line(small_set, entry):
    name = "camelyonpatch_level_2_split_train_y.h5"
    entry = entry.replace("SIZE", str(os.path.getsize(small_set / name)))
    (small_set / data.MANIFEST_NAME).write_text(f'{{"files": {{"{name}": {entry}}}}}')
    one_line_error(run_script("data.py", "verify", "--data-dir", str(small_set)), data.MANIFEST_NAME)
    (small_set / data.MANIFEST_NAME).write_text(f'{{"files": [{entry}]}}')
    one_line_error(run_script("data.py", "verify", "--data-dir", str(small_set)), data.MANIFEST_NAME)


def no_partial_files(directory):
    return not [name for _, _, names in os.walk(directory) for name in names if ".partial" in name]


def test_a_full_disk_is_one_line_everywhere(small_disk, synth_dir, pcam_server):
    import shutil
    one_line_error(run_script("data.py", "synth", "--data-dir", str(small_disk / "synth")), "No space left on device")
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


def test_read_only_folders_and_files_in_the_way_are_one_line(read_only_dir, small_set, straight_run, tmp_path,
                                                             pcam_server):
    one_line_error(run_script("data.py", "synth", "--data-dir", str(read_only_dir / "synth")), "Read-only file system")
    one_line_error(run_script("data.py", "prepare", "--data-dir", str(small_set), "--out", str(read_only_dir)),
                   "Read-only file system")
    one_line_error(run_script("data.py", "manifest", "--data-dir", str(small_set), "--manifest",
                              str(read_only_dir / "m.json")), "Read-only file system")
    one_line_error(run_script("eda.py", "--data-dir", str(small_set), "--out-dir", str(read_only_dir)),
                   "Read-only file system")
    one_line_error(run_script("plot_loss.py", str(straight_run), "--out", str(read_only_dir / "loss.png")),
                   "Read-only file system")
    result = download(pcam_server, read_only_dir, "valid")
    one_line_error(result, "Read-only file system")
    assert "attempt" not in result.stdout  # a read-only folder is not retried
    (tmp_path / "a_file").write_text("")
    one_line_error(run_script("data.py", "synth", "--data-dir", str(tmp_path / "a_file" / "synth")), "Not a directory")
    one_line_error(run_script("data.py", "manifest", "--data-dir", str(small_set), "--manifest",
                              str(tmp_path / "no_such_folder" / "m.json")), "No such file or directory")


def test_a_corrupt_compressed_chunk_names_the_file(tmp_path):
    x_path, _ = write_split(tmp_path, "train", tissue(64), labels_of(64, 20), chunks=(8, 96, 96, 3),
                            compression="gzip")
    with open(x_path, "r+b") as x_file:  # scramble the middle of the file: compressed chunks, not the header
        x_file.seek(os.path.getsize(x_path) // 2)
        x_file.write(os.urandom(4096))
    one_line_error(run_script("eda.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "figures")),
                   "train_x.h5")


@pytest.mark.parametrize("name, x", [("bool", np.ones((4, 96, 96, 3), bool)),
                                     ("strings", np.array([b"abc"] * 4)), ("group", None)])
def test_x_of_a_kind_that_is_not_images_is_one_line(tmp_path, name, x):
    if x is None:
        write_split(tmp_path, "train", tissue(4), labels_of(4, 2))
        with h5py.File(data.split_paths(tmp_path, "train")[0], "w") as h5file:
            h5file.create_group("x")
    else:
        write_split(tmp_path, "train", x, labels_of(4, 2))
    one_line_error(run_script("data.py", "info", "--data-dir", str(tmp_path)), "'x'")


def test_other_typing_mistakes_are_one_line(synth_dir, small_set, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"weights": torch.zeros(3)}, run_dir / "last.pt")
    one_line_error(run_script("train.py", *train_args(synth_dir, run_dir, "--resume")), "not a train.py checkpoint")
    (tmp_path / "metrics.csv").write_bytes(b"\xff\xfe\x00e\x00p\x00o\x00c\x00h")
    one_line_error(run_script("plot_loss.py", str(tmp_path / "metrics.csv")), "not UTF-8 text")
    for script in (("data.py", "info"), ("train.py",), ("eda.py",)):
        one_line_error(run_script(*script, env={"PCAM_DIR": ""}), "empty")
    one_line_error(run_script("data.py", "download", "--data-dir", str(tmp_path / "d"), "--base-url", "example.org/f"),
                   "--base-url")


def test_make_plot_skips_failed_runs_and_make_eda_takes_a_folder_with_spaces(small_set, tmp_path):
    import shutil
    for name in PROJECT_FILES:
        shutil.copy2(os.path.join(HERE, name), tmp_path / name)
    os.symlink(os.path.join(HERE, ".venv"), tmp_path / ".venv")
    (tmp_path / "runs" / "failed-before-epoch-1").mkdir(parents=True)
    result = subprocess.run(["make", "-s", "plot"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "no run found" in result.stderr
    shutil.copytree(small_set, tmp_path / "a folder with spaces")
    result = subprocess.run(["make", "-s", "eda", "DATA_DIR=a folder with spaces"], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert is_nonblank_png(tmp_path / "assets" / "pcam.png")


def test_a_staged_job_names_the_users_folder_for_a_half_split(project, synth_dir, tmp_path):
    if not slurm_is_up():
        pytest.skip("no Slurm here (start one with .ci/slurm-up.sh)")
    user_dir = linked_set(synth_dir, tmp_path / "user_data")
    write_split(user_dir, "test", tissue(8), labels_of(8, 4))
    os.remove(data.split_paths(user_dir, "test")[1])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1", "STAGE": "yes", "TMPDIR": str(scratch),
                                         "DATA_DIR": str(user_dir)})
    job = submitted_job(output)[0]
    assert wait_for_job(job) == ["FAILED"]
    log = (project / "logs" / f"pcam_train_{job}.out").read_text()
    assert f"test split missing in {user_dir}" in log and "Traceback" not in log


# ---- Slurm: first_job.sh, train_job.sh and the Makefile against a real local Slurm (.ci/slurm-up.sh) ----

def slurm_is_up():
    import shutil
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, check=False).returncode == 0


needs_slurm = pytest.mark.skipif(not slurm_is_up(), reason="no Slurm here (start one with .ci/slurm-up.sh)")
PROJECT_FILES = ("data.py", "model.py", "train.py", "plot_loss.py", "eda.py", "first_job.sh", "train_job.sh",
                 "Makefile", "requirements.txt")
SMALL_JOB = {"CPUS": "1", "MEM": "1500M", "TIME": "00:10:00"}


@pytest.fixture
def project(tmp_path, synth_dir):
    """A copy of the project to submit from (jobs write logs/ and runs/ there), sharing this .venv."""
    import shutil
    for name in PROJECT_FILES:
        shutil.copy2(os.path.join(HERE, name), tmp_path / name)  # copy2 keeps mtimes: make sees .venv as current
    os.symlink(os.path.join(HERE, ".venv"), tmp_path / ".venv")
    os.symlink(synth_dir, tmp_path / "data")
    return tmp_path


def make(project, *targets, env=None):
    result = subprocess.run(["make", "-s", *targets], cwd=project, capture_output=True, text=True, check=False,
                            env={**os.environ, **(env or {})}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def submitted_job(output):
    import re
    return re.search(r"submitted (?:job|array) (\d+)|Submitted batch job (\d+)", output).group(1, 2)


def wait_for_job(job_id, timeout=300, on_poll=None):
    """Poll sacct until every record of the job (array tasks included) has ended; returns their states."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if on_poll:
            on_poll()
        lines = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                               text=True, check=False).stdout.split()
        states = [line.split("|")[1] for line in lines]
        if states and all(s.split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
                          for s in states):
            return states
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@needs_slurm
def test_both_job_scripts_are_accepted_by_sbatch(project):
    for command in (["first_job.sh"], ["--cpus-per-task=1", "--mem=1500M", "train_job.sh"]):  # a 2-CPU node here
        result = subprocess.run(["sbatch", "--test-only", *command], cwd=project, capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0 and "to start at" in result.stderr, result.stderr


@needs_slurm
def test_make_hello_writes_the_hello_world_log_and_loads_the_modules(project):
    env = {"BASH_FUNC_module%%": "() {  echo \"module $*\" >&2\n}"}  # what `export -f module` puts in the environment
    job = submitted_job(make(project, "hello", env=env))[1]
    assert wait_for_job(job) == ["COMPLETED"]
    log = (project / f"hello_world_{job}.out").read_text()
    for line in ("module load 2025", "module load Python/3.13.1-GCCcore-14.2.0", f"job id: {job}", "Hello, World!",
                 "python: Python 3"):
        assert line in log
    plain = submitted_job(make(project, "hello"))[1]
    wait_for_job(plain)
    assert "skipped loading the course modules" in (project / f"hello_world_{plain}.out").read_text()


@needs_slurm
def test_make_train_runs_on_gpu_course_and_leaves_a_complete_run(project):
    output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 2 --batch-size 128"})
    job = submitted_job(output)[0]
    assert f"logs/pcam_train_{job}.out" in output
    assert wait_for_job(job) == ["COMPLETED"]
    run_dir = project / "runs" / f"slurm-{job}"
    assert len(read_csv_rows(run_dir / "metrics.csv")) == 2
    assert (run_dir / "best.pt").exists() and is_nonblank_png(run_dir / "loss.png")
    log = (project / "logs" / f"pcam_train_{job}.out").read_text()
    assert "gpu:" in log and "commit:" in log and "CUDA not available, using CPU" in log
    partition = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "Partition"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert partition == ["gpu_course"]
    status = make(project, "status")
    assert job in status and "COMPLETED" in status


@needs_slurm
def test_make_train_passes_arguments_without_running_them(project):
    output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1 --dry-run; touch pwned $(touch pwned2)"})
    job = submitted_job(output)[0]
    wait_for_job(job)
    assert not (project / "pwned").exists() and not (project / "pwned2").exists()
    assert "unrecognized arguments" in (project / "logs" / f"pcam_train_{job}.out").read_text()


@needs_slurm
def test_a_job_near_its_time_limit_checkpoints_requeues_and_resumes_to_the_same_result(project, synth_dir, tmp_path):
    # Slurm checks time limits every 30 s, so the USR1 due 50 s before a 1-minute limit comes 0-35 s in:
    # the run is made to last longer than that. Both runs use one thread, so they share the 2 CPUs here
    # without slowing each other down, and compute the same numbers.
    args = ["--epochs", "40", "--batch-size", "16", "--log-every", "50", "--num-workers", "0"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    (project / "logs").mkdir()
    job = subprocess.run(["sbatch", "--parsable", "--partition=gpu_course", "--cpus-per-task=1", "--mem=1500M",
                          "--time=00:01:00", "--signal=B:USR1@50", "train_job.sh", *args], cwd=project,
                         capture_output=True, text=True, check=True, env={**one_thread, "PCAM_DIR": str(synth_dir)}
                         ).stdout.strip()
    straight = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(synth_dir), "--out-dir",
                                 str(tmp_path / "straight"), *args], cwd=HERE, stdout=subprocess.DEVNULL, env=one_thread)

    def extend_after_first_requeue():
        # the requeued job would be signalled again soon after it starts: give it room to finish
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
        if "Restarts=1" in show and "TimeLimit=00:01:00" in show:
            subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=00:10:00"], check=True)

    assert wait_for_job(job, timeout=480, on_poll=extend_after_first_requeue) == ["COMPLETED"]
    assert straight.wait(timeout=300) == 0
    log = (project / "logs" / f"pcam_train_{job}.out").read_text()
    assert "USR1: time limit near" in log and "requeueing job" in log and "restart 1" in log, log
    run_dir = project / "runs" / f"slurm-{job}"
    assert loss_columns(run_dir) == loss_columns(tmp_path / "straight")
    assert_same_weights(run_dir, tmp_path / "straight")


@needs_slurm
def test_make_sweep_leaves_one_run_per_seed(project):
    output = make(project, "sweep", env={**SMALL_JOB, "SEEDS": "1 2", "ARGS": "--epochs 1"})
    job = submitted_job(output)[0]
    assert wait_for_job(job) == ["COMPLETED", "COMPLETED"]
    seeds = {}
    for task in (0, 1):
        import json
        record = json.loads((project / "runs" / f"slurm-{job}_{task}" / "run.json").read_text())
        seeds[task] = record["args"]["seed"]
    assert seeds == {0: 1, 1: 2}


@needs_slurm
def test_the_job_stages_data_to_node_local_scratch_when_asked(project, synth_dir, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1", "STAGE": "yes", "TMPDIR": str(scratch)})
    job = submitted_job(output)[0]
    assert wait_for_job(job) == ["COMPLETED"]
    staged = scratch / f"pcam_{job}"
    assert sorted(os.listdir(staged)) == sorted(os.listdir(synth_dir) + [data.PREPARED_NAME])
    import json
    record = json.loads((project / "runs" / f"slurm-{job}" / "run.json").read_text())
    assert record["args"]["data_dir"] == str(staged)


def test_job_scripts_pass_shellcheck():
    import shutil
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package shellcheck)")
    result = subprocess.run(["shellcheck", "first_job.sh", "train_job.sh", ".ci/slurm-up.sh", ".ci/run"], cwd=HERE,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
