"""pytest fixtures and hooks for the test_*.py files: data sets, training runs to compare against, a PCAM server on
127.0.0.1 and a copy of the project to submit to Slurm. The helpers the tests import are in test_helpers.py."""

import gzip
import hashlib
import http.server
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import manage_data
import train
from test_helpers import (
    PCAMServer,
    add_defects,
    copy_project,
    labels_of,
    slurm_is_up,
    tissue,
    train_args,
    write_split,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the local Slurm (start one with .ci/slurm-up.sh); make test-all")
    config.addinivalue_line("markers", "download: manage_data.py download against a server on 127.0.0.1; make test-all")
    config.addinivalue_line(
        "markers", "slow: takes minutes of real time (the CPU form of make gpu-check); make test-all"
    )
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest -n: each worker its share of the cores
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def pytest_runtest_setup(item):
    if item.get_closest_marker("slurm") and not slurm_is_up():
        pytest.skip("no Slurm here (start one with .ci/slurm-up.sh)")


@pytest.fixture
def small_set(tmp_path):
    """A uint8 set: 200 train (40% positive), 64 valid, 64 test."""
    for split, n, seed in (("train", 200, 0), ("valid", 64, 1), ("test", 64, 2)):
        write_split(tmp_path, split, tissue(n, seed), labels_of(n, int(0.4 * n)))
    return tmp_path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A synthetic set of 1,536 train, 512 valid and 256 test images, shared by the suite."""
    directory = tmp_path_factory.mktemp("synth")
    manage_data.main(
        ["synth", "--data-dir", str(directory), "--n-train", "1536", "--n-valid", "512", "--n-test", "256"]
    )
    return directory


@pytest.fixture(scope="session")
def poisoned_dir(tmp_path_factory):
    """A float32 set with known defects: train and valid, no test split."""
    directory = tmp_path_factory.mktemp("poisoned")
    options = "--n-train 600 --n-valid 200 --n-test 0 --poison 0.2 --dtype float32 --seed 3".split()
    manage_data.main(["synth", "--data-dir", str(directory), *options])
    # synth poisons equal numbers of each kind: more of some, so that no two columns of the table are equal
    add_defects(directory, "train", {"nan": 1, "out_of_range": 2, "black": 3, "white": 4})
    add_defects(directory, "valid", {"nan": 4, "out_of_range": 3, "black": 2, "white": 1})
    return directory


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a full disk that tests can fill. Needs root (mount)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk cases are untested")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def read_only_dir(small_disk):
    """The small tmpfs, remounted read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return small_disk


@pytest.fixture(scope="session")
def straight_run(synth_dir, tmp_path_factory):
    """A 3-epoch run that the reproducibility and resume tests compare against."""
    out_dir = tmp_path_factory.mktemp("runs") / "straight"
    train.main(train_args(synth_dir, out_dir, "--epochs", "3"))
    return out_dir


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
    server.files, server.cut_once, server.garble_once, server.requests = files, set(), set(), []
    server.ignore_range, server.bad_length = False, set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/records/2546921/files"
    server.checksums, server.source = str(checksums), source
    yield server
    server.shutdown()


@pytest.fixture
def project(tmp_path, synth_dir):
    """A copy of the project to submit from (jobs write logs/ and runs/ there), with the synthetic set as data/."""
    copy_project(tmp_path)
    os.symlink(synth_dir, tmp_path / "data")
    return tmp_path
