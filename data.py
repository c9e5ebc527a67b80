"""PCAM data for training: HDF5 reading, cleaning, the outlier filter, class-balanced loaders.

The hot path reads a whole batch of rows in one array operation (numpy.memmap for uncompressed
contiguous files, one h5py selection otherwise) and keeps images uint8 until they reach the
training device. The data commands (download, synth, prepare, ...) are in manage_data.py.
"""

import argparse
import atexit
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import mmap
import multiprocessing
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    WeightedRandomSampler,
)

SPLITS = ("train", "valid", "test")
IMAGE_SHAPE = (96, 96, 3)
IMAGE_BYTES = 96 * 96 * 3
BLACK_THRESHOLD = 5.0  # a tile whose mean intensity is at or below this is a blackout
WHITE_THRESHOLD = 250.0  # at or above this, a washout; real tissue stays well below
BLOCK_BYTES = 64 * 2**20  # streaming passes read about this many raw bytes at a time
CHUNK_CACHE_BYTES = 256 * 2**20  # HDF5 chunk cache per open chunked file (per worker)
MAPPED_BYTES_BEFORE_RELEASE = 2**30  # unmap a memory map's pages after this much reading (see MappedRows)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 4 * 2**20  # buffers this large are mapped for themselves (see keep_large_buffers_off_the_heap)
MANIFEST_NAME = "pcam_manifest.json"
PREPARED_NAME = "pcam_prepared.json"  # prepare's record of the source files its copy was made from
RUN_LOCK_NAME = "train.lock"  # a live train.py holds it with flock; the kernel releases it when the run dies
PROGRESS_EVERY_S = 10  # a whole-file pass prints a line this often (a batch log wants 5 to 30 s), and when done
SCALE_SAMPLE_ROWS = 32  # evenly spaced rows whose pixels decide whether a file is on the 0..255 scale


class PCAMError(ValueError):
    """A problem with PCAM files that the user can fix; the message says what and how."""


class MissingDataError(PCAMError, FileNotFoundError):
    """The data directory or a split's files are not there."""


class FilteredOutError(PCAMError):
    """The outlier filter removed every image of a split."""


def log(message):
    print(message, flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, lists as words, but not None or a switch's False: their help says what happens
    without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        help_text = super()._get_help_string(action)
        if isinstance(action.default, list):
            return help_text.replace("%(default)s", " ".join(map(str, action.default)))
        return help_text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported in one line (usage stays behind --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_num_workers_argument(parser):
    """--num-workers, the same in every script: $SLURM_CPUS_PER_TASK in a Slurm job, else 0."""
    parser.add_argument(
        "--num-workers",
        type=int,
        default=int(os.environ.get("SLURM_CPUS_PER_TASK", "0")),
        metavar="W",
        help="DataLoader worker processes ($SLURM_CPUS_PER_TASK if set)",
    )


def add_data_dir_argument(parser):
    """--data-dir, the same in every script: $PCAM_DIR when set, else data/."""
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("PCAM_DIR", "data"),
        metavar="DIR",
        help="folder of the camelyonpatch_level_2_split_*.h5 files (default: $PCAM_DIR if set, else data; "
        "now %(default)s)",
    )


def split_paths(data_dir, split):
    """The (x, y) file paths of one split in PCAM's naming."""
    name = os.path.join(str(data_dir), f"camelyonpatch_level_2_split_{split}_{{}}.h5")
    return name.format("x"), name.format("y")


def require_split(data_dir, split):
    """The split's (x, y) paths, or a MissingDataError naming what is missing and how to get it."""
    if str(data_dir) == "":
        raise MissingDataError(
            "the data folder is an empty string (is $PCAM_DIR set but empty?); "
            "pass --data-dir DIR or set PCAM_DIR to the PCAM folder"
        )
    if not os.path.isdir(data_dir):
        raise MissingDataError(
            f"data directory {data_dir} does not exist: pass --data-dir (or set PCAM_DIR), or create it "
            f"with `python manage_data.py download --data-dir {data_dir}` or "
            f"`python manage_data.py synth --data-dir {data_dir}`"
        )
    paths = split_paths(data_dir, split)
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingDataError(
            f"{split} split missing in {data_dir}: {', '.join(missing)} not found; get them with "
            f"`python manage_data.py download --data-dir {data_dir}` or make a synthetic set with "
            f"`python manage_data.py synth --data-dir {data_dir}`"
        )
    return paths


def open_h5(path, **kwargs):
    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as error:
        raise PCAMError(
            f"{path} is not a readable HDF5 file ({error}); it may be truncated: download or copy it again"
        ) from None


def unreadable(x_path, error):
    """The error for rows h5py cannot read: a corrupt compressed chunk, or a truncated file."""
    return PCAMError(
        f"cannot read images of {x_path} ({str(error).splitlines()[0]}): a chunk is corrupt or the "
        "file is truncated; download or copy it again"
    )


def dataset_in(h5file, key, path):
    if key not in h5file:
        raise PCAMError(
            f"{path} has no dataset '{key}' (found: {', '.join(h5file.keys()) or 'nothing'}); "
            f"PCAM files store images as 'x' and labels as 'y'"
        )
    dset = h5file[key]
    if not isinstance(dset, h5py.Dataset):
        raise PCAMError(
            f"{path}: '{key}' is a {type(dset).__name__.lower()}, not a dataset; "
            "PCAM files store images as 'x' and labels as 'y', each one array"
        )
    if dset.dtype == np.bool_ or not (np.issubdtype(dset.dtype, np.integer) or np.issubdtype(dset.dtype, np.floating)):
        raise PCAMError(f"{path}: '{key}' holds {dset.dtype} values; expected integers or floats")
    return dset


def clean(images, scratch=False):
    """Raw stored pixels of any dtype -> uint8: NaN -> 0, +inf -> 255, -inf -> 0, clip to [0, 255].

    scratch=True lets a float input be overwritten, sparing a second full-size float array.
    """
    if images.dtype == np.uint8:
        return images
    if not images.dtype.isnative:
        images, scratch = images.astype(images.dtype.newbyteorder("=")), True
    if np.issubdtype(images.dtype, np.integer):
        return np.clip(images, 0, 255).astype(np.uint8)
    writable = scratch and images.flags.writeable  # blocks of a memory-mapped file are read-only
    pixels = torch.from_numpy(images if writable else images.copy())  # torch's in-place ops: 2x numpy's here
    torch.nan_to_num_(pixels, nan=0.0, posinf=255.0, neginf=0.0).clamp_(0, 255)
    return pixels.numpy().astype(np.uint8)


def suspect_rows(raw):
    """Rows of a float block that may hold NaN or a value outside 0..255, in one read-only pass: read as
    unsigned ints, a float's bits exceed those of 255.0 exactly when it is above 255, infinite, NaN or
    has its sign bit set (negative, or -0.0)."""
    bits = np.dtype(f"u{raw.itemsize}")
    return raw.view(bits).reshape(len(raw), -1).max(axis=1) > np.array(255, raw.dtype).view(bits)


def tile_means(raw, black_threshold=BLACK_THRESHOLD, white_threshold=WHITE_THRESHOLD, suspect=None):
    """Mean intensity of each cleaned image of a raw block (N, 96, 96, 3) -> (N,) float64. Reads only.

    uint8 blocks are summed exactly in uint32 (at most 27,648 * 255), as fast as a memory copy. Float
    blocks are summed as they are, which is exact for rows already within 0..255 (all but suspect_rows,
    passed in when the caller has them) up to clean's truncation of each pixel: that mean is at most 1
    above the cleaned one. The suspect rows and the rows that close to a threshold are cleaned and
    measured exactly, so filtering a float file or its prepared uint8 copy agree.
    """
    if raw.dtype == np.uint8 or not np.issubdtype(raw.dtype, np.floating):
        return clean(raw).reshape(len(raw), -1).sum(axis=1, dtype=np.uint32) / IMAGE_BYTES
    suspect = suspect_rows(raw) if suspect is None else suspect
    means = raw.reshape(len(raw), -1).sum(axis=1).astype(np.float64) / IMAGE_BYTES  # pairwise: error << 0.01
    exact = suspect.copy()
    for threshold in (black_threshold, white_threshold):
        exact |= (means > threshold - 0.01) & (means < threshold + 1.01)  # 0.01: room for summation error
    if exact.any():
        means[exact] = tile_means(clean(raw[exact], scratch=True))
    return means


def block_rows(dset):
    """Rows per block so that one raw block is about BLOCK_BYTES."""
    row_bytes = IMAGE_BYTES * dset.dtype.itemsize
    rows = max(1, BLOCK_BYTES // row_bytes)
    if dset.chunks:  # whole chunks per block, so no chunk is decompressed twice
        rows = max(dset.chunks[0], rows // dset.chunks[0] * dset.chunks[0])
    return rows


def contiguous_offset(x_path, dset):
    """Byte offset of an uncompressed, contiguous, native-order dataset (None for any other layout)."""
    offset = dset.id.get_offset()
    if dset.chunks is not None or dset.compression is not None or offset is None or not dset.dtype.isnative:
        return None
    if os.path.getsize(x_path) < offset + dset.nbytes:
        raise PCAMError(f"{x_path} is truncated; download or copy it again")
    return offset


class Progress:
    """Progress of a whole-file pass, one line at a time: "filter train: 12.30 of 27.00 GB, 0.41 GB/s, eta 36s",
    at most every every_s seconds and once more when done. Blocks take seconds, so lines come every_s apart."""

    def __init__(self, task, total_bytes, clock=time.monotonic, every_s=PROGRESS_EVERY_S):
        self.task, self.total_bytes, self.clock, self.every_s = task, total_bytes, clock, every_s
        self.started = self.last_line = clock()

    def update(self, done_bytes):
        now = self.clock()
        finished = done_bytes >= self.total_bytes
        if now - self.last_line < self.every_s and not finished:
            return
        self.last_line, elapsed = now, max(now - self.started, 1e-9)
        rate = done_bytes / elapsed
        tail = f"done in {elapsed:.0f}s" if finished else f"eta {(self.total_bytes - done_bytes) / max(rate, 1):.0f}s"
        log(f"{self.task}: {done_bytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB, {rate / 1e9:.2f} GB/s, {tail}")


def iter_raw_blocks(x_path, task=None):
    """raw_blocks(x_path), with Progress lines named task (say "filter train") when one is given."""
    if task is None:
        yield from raw_blocks(x_path)
        return
    with open_h5(x_path) as h5file:
        progress = Progress(task, dataset_in(h5file, "x", x_path).nbytes)
    for start, block in raw_blocks(x_path):
        yield start, block
        progress.update((start + len(block)) * block[0].nbytes)


def raw_blocks(x_path):
    """Yield (start_row, raw_block) over a PCAM x file in large blocks, with bounded memory. Blocks are
    read-only.

    A contiguous file is read through a memory map: blocks are views, no copy, and each block's pages
    leave RSS once the caller is done with it. Other files are read by h5py, the next block in a
    background thread while the caller works on the current one (h5py releases the GIL while reading).
    """
    with open_h5(x_path, rdcc_nbytes=CHUNK_CACHE_BYTES) as h5file:
        dset = dataset_in(h5file, "x", x_path)
        step, offset, shape, dtype = block_rows(dset), contiguous_offset(x_path, dset), dset.shape, dset.dtype
        if offset is None:
            with ThreadPoolExecutor(max_workers=1) as reader:
                pending = reader.submit(dset.__getitem__, slice(0, step))
                for start in range(0, len(dset), step):
                    try:
                        block = pending.result()
                    except OSError as error:
                        raise unreadable(x_path, error) from None
                    if not block.dtype.isnative:  # a big-endian file: torch and bit-level checks want native
                        block = block.astype(block.dtype.newbyteorder("="))
                    if start + step < len(dset):
                        pending = reader.submit(dset.__getitem__, slice(start + step, start + 2 * step))
                    block.flags.writeable = False
                    yield start, block
            return
    with open(x_path, "rb") as raw_file:
        mapping = mmap.mmap(raw_file.fileno(), 0, access=mmap.ACCESS_READ)
    images = np.frombuffer(mapping, dtype, int(np.prod(shape)), offset).reshape(shape)
    for start in range(0, len(images), step):
        yield start, images[start : start + step]
        mapping.madvise(mmap.MADV_DONTNEED)  # only this block was touched; the page cache keeps the data


def outlier_rows(block, black_threshold=BLACK_THRESHOLD, white_threshold=WHITE_THRESHOLD):
    """Boolean mask of a block's rows whose cleaned mean is at or below black_threshold or at or above white."""
    means = tile_means(block, black_threshold, white_threshold)
    return (means <= black_threshold) | (means >= white_threshold)


def outlier_mask(x_path, black_threshold=BLACK_THRESHOLD, white_threshold=WHITE_THRESHOLD):
    """outlier_rows of a whole x file."""
    masks = [outlier_rows(block, black_threshold, white_threshold) for _, block in iter_raw_blocks(x_path)]
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def read_labels(y_path):
    """All labels of a y file as int64 (N,), checking shape and values."""
    with open_h5(y_path) as h5file:
        dset = dataset_in(h5file, "y", y_path)
        if dset.ndim not in (1, 2, 4) or any(size != 1 for size in dset.shape[1:]):
            raise PCAMError(f"{y_path}: labels have shape {dset.shape}; expected (N,), (N, 1) or (N, 1, 1, 1)")
        raw = dset[()].reshape(-1)
    if not np.all((raw == 0) | (raw == 1)):
        bad = np.unique(raw[~((raw == 0) | (raw == 1))])[:5]
        raise PCAMError(f"{y_path}: labels must be 0 or 1, found {', '.join(map(str, bad))}")
    return raw.astype(np.int64)


def check_pixel_scale(x_path):
    """Refuse an x file plainly on another scale than 0..255, judged from SCALE_SAMPLE_ROWS evenly spaced rows:
    floats all within 0..1, no finite value at all, or values wider than a byte mostly outside 0..255. (The
    course copy's float32 NaN and 1e5 pixels are defects of single pixels on the 0..255 scale; cleaning
    handles them.) Reading the first and last rows also finds a truncated or corrupt file before training."""
    with open_h5(x_path) as h5file:
        dset = dataset_in(h5file, "x", x_path)
        if len(dset) == 0 or contiguous_offset(x_path, dset) is not None and dset.dtype == np.uint8:
            return  # a contiguous file's size was checked; a byte holds 0..255 only
        rows = np.unique(np.linspace(0, len(dset) - 1, min(len(dset), SCALE_SAMPLE_ROWS)).astype(np.int64))
        try:
            sample = dset[rows]
        except OSError as error:
            raise unreadable(x_path, error) from None
    floating = np.issubdtype(sample.dtype, np.floating)
    finite = sample[np.isfinite(sample)] if floating else sample
    if not finite.size:
        raise PCAMError(f"{x_path}: no finite pixel value in {len(rows)} sampled images; the images are all NaN or inf")
    if floating and finite.min() >= 0 and finite.max() <= 1:
        raise PCAMError(
            f"{x_path}: pixel values are all within 0..1 in {len(rows)} sampled images; expected "
            "the 0..255 scale: write the images multiplied by 255"
        )
    median = np.median(finite)
    if sample.dtype.itemsize > 1 and not 0 <= median <= 255:  # stray values outside 0..255 are clipped, not refused
        raise PCAMError(
            f"{x_path}: {sample.dtype} pixel values up to {finite.max()} (median {median:g}) "
            f"in {len(rows)} sampled images; expected the 0..255 scale of 8-bit images: convert them to 0..255 first"
        )


def read_split_labels(x_path, y_path):
    """The labels of a split, (N,) int64, after checking that its x file holds N images of 96x96x3."""
    labels = read_labels(y_path)
    with open_h5(x_path) as h5file:
        dset = dataset_in(h5file, "x", x_path)
        if dset.shape[1:] != IMAGE_SHAPE:
            raise PCAMError(f"{x_path}: images have shape {dset.shape[1:]}; expected {IMAGE_SHAPE} (H, W, C)")
        if len(dset) != len(labels):
            raise PCAMError(
                f"{x_path} has {len(dset)} images but {y_path} has {len(labels)} labels; "
                "the two files of a split must match row for row"
            )
    return labels


def is_consecutive(rows):
    return len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1))


class MappedRows:
    """uint8 rows of a contiguous dataset through a memory map: a batch is one fancy-indexing copy."""

    def __init__(self, x_path, offset, shape):
        with open(x_path, "rb") as raw_file:
            self.mapping = mmap.mmap(raw_file.fileno(), 0, access=mmap.ACCESS_READ)
        self.images = np.frombuffer(self.mapping, np.uint8, int(np.prod(shape)), offset).reshape(shape)
        self.bytes_since_release = 0

    def read(self, rows):
        batch = self.images[rows]
        self.bytes_since_release += batch.nbytes
        # mapped page-cache pages count in RSS (though the kernel reclaims them freely); dropping them now
        # and then keeps RSS near the file size at most; every drop costs page faults, hence not per batch
        if self.bytes_since_release > MAPPED_BYTES_BEFORE_RELEASE:
            self.mapping.madvise(mmap.MADV_DONTNEED)  # the data stays in the page cache
            self.bytes_since_release = 0
        return batch


class PositionalRows:
    """Rows of a contiguous float (or other wide) dataset by pread straight into the batch array.

    Memory-mapping a file four times the size of its uint8 content would map large page-cache folios
    around every random row and inflate RSS; pread touches only the bytes asked for.
    """

    def __init__(self, x_path, offset, dtype):
        self.fd, self.offset, self.dtype = os.open(x_path, os.O_RDONLY), offset, dtype
        self.row_bytes = IMAGE_BYTES * dtype.itemsize

    def read(self, rows):
        batch = np.empty((len(rows),) + IMAGE_SHAPE, self.dtype)
        buffer = memoryview(batch).cast("B")
        if is_consecutive(rows):  # validation and streaming passes: one read for the whole batch
            os.preadv(self.fd, [buffer], self.offset + int(rows[0]) * self.row_bytes)
            return batch
        for i, row in enumerate(rows.tolist()):  # one system call per row, no per-row numpy work
            os.preadv(
                self.fd, [buffer[i * self.row_bytes : (i + 1) * self.row_bytes]], self.offset + row * self.row_bytes
            )
        return batch

    def __del__(self):
        os.close(self.fd)


class ChunkedRows:
    """Rows of a chunked or compressed dataset through h5py, a chunk's worth of rows per read.

    Reading whole row-chunks decompresses each touched chunk once per batch, and the chunk cache keeps
    recent ones for the next batches; h5py's own point selection is slower than per-image reads here.
    """

    def __init__(self, x_path):
        self.x_path = x_path
        self.h5file = open_h5(x_path, rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=100003, rdcc_w0=1.0)
        self.dset = self.h5file["x"]
        self.chunk_rows = self.dset.chunks[0] if self.dset.chunks else 1

    def read(self, rows):
        try:
            return self._read(rows)
        except OSError as error:
            raise unreadable(self.x_path, error) from None

    def _read(self, rows):
        if is_consecutive(rows):
            return self.dset[rows[0] : rows[-1] + 1]
        batch = np.empty((len(rows),) + self.dset.shape[1:], self.dset.dtype)
        order = np.argsort(rows, kind="stable")
        chunk_starts = rows[order] // self.chunk_rows * self.chunk_rows
        groups = np.split(order, np.flatnonzero(np.diff(chunk_starts)) + 1)
        for group, start in zip(groups, chunk_starts[np.r_[0, np.cumsum([len(g) for g in groups])[:-1]]], strict=True):
            block = self.dset[start : start + self.chunk_rows]
            batch[group] = block[rows[group] - start]
        return batch


def keep_large_buffers_off_the_heap():
    """Have glibc serve every buffer of MMAP_THRESHOLD_BYTES or more by mmap, returned to the system on free. By
    default glibc raises that threshold (up to 32 MiB) whenever such a buffer is freed; batch buffers (28 MiB of
    float32 for 256 images) then come from the heap, which fragments, and RSS grows with the files' size."""
    with contextlib.suppress(AttributeError, OSError):  # not glibc (macOS): no such threshold to fix
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def open_rows(x_path):
    """A row reader for the x file, chosen by its layout (dset.chunks, compression, byte offset)."""
    keep_large_buffers_off_the_heap()  # in the process that reads: the main one, or a loader worker
    with open_h5(x_path) as h5file:
        dset = h5file["x"]
        offset, shape, dtype = contiguous_offset(x_path, dset), dset.shape, dset.dtype
    # the file is closed again first: HDF5 shares one open file, so ChunkedRows's cache size would be ignored
    if offset is not None and dtype == np.uint8:
        return MappedRows(x_path, offset, shape)
    if offset is not None:
        return PositionalRows(x_path, offset, dtype)
    return ChunkedRows(x_path)


class PCAMDataset(Dataset):
    """One PCAM split. ds[i] -> (image uint8 (3, 96, 96), label long); ds[list_of_i] -> a whole batch.

    Files are opened lazily in the process that reads them, so the dataset can go to DataLoader
    workers. See open_rows for how rows are read.
    """

    def __init__(
        self,
        x_path,
        y_path,
        transform=None,
        filter_data=False,
        black_threshold=BLACK_THRESHOLD,
        white_threshold=WHITE_THRESHOLD,
        preload=False,
    ):
        self.x_path, self.y_path, self.transform = str(x_path), str(y_path), transform
        for path in (self.x_path, self.y_path):
            if not os.path.isfile(path):
                raise MissingDataError(f"{path} not found")
        all_labels = read_split_labels(self.x_path, self.y_path)
        if len(all_labels) == 0:
            raise PCAMError(
                f"{self.x_path} holds no images; a PCAM split needs at least one row: write or fetch it again"
            )
        check_pixel_scale(self.x_path)
        self.indices, self._memory = np.arange(len(all_labels)), None
        if filter_data or preload:
            thresholds = (black_threshold, white_threshold) if filter_data else None
            self.indices, self._memory = self._read_whole_file(thresholds, preload)
        if len(self.indices) == 0:
            raise FilteredOutError(
                f"{self.x_path}: the outlier filter removed every image (thresholds "
                f"{black_threshold}, {white_threshold}); the file holds only black or white tiles"
            )
        self.labels = all_labels[self.indices]
        self._reader, self._reader_pid = None, None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            images, labels = self._batch(np.array([index]))
            return images[0], labels[0]
        return self._batch(np.asarray(index))

    def _batch(self, positions):
        rows = self.indices[positions]
        images = self._memory[positions] if self._memory is not None else clean(self._read_rows(rows), scratch=True)
        if self.transform is not None:
            return torch.stack([torch.as_tensor(self.transform(image)) for image in images]), torch.from_numpy(
                self.labels[positions]
            )
        return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(self.labels[positions])

    def _read_rows(self, rows):
        if self._reader_pid != os.getpid():  # first read in this process (a fresh worker, say): open here
            self._reader, self._reader_pid = open_rows(self.x_path), os.getpid()
        return self._reader.read(rows)

    def _read_whole_file(self, thresholds, load):
        """(kept rows, their cleaned images or None) in one pass over the x file: the rows the filter keeps (every
        row without thresholds) and, with load, their images in RAM. The array is sized for every row, the kept
        count being known only at the end; its tail is never written, so never takes memory."""
        memory = self._reserve_memory() if load else None
        kept_parts, filled = [], 0
        task = " and ".join(["filter"] * bool(thresholds) + ["load"] * load) + " " + os.path.basename(self.x_path)
        for start, block in iter_raw_blocks(self.x_path, task):
            keep = ~outlier_rows(block, *thresholds) if thresholds else np.ones(len(block), bool)
            kept_parts.append(start + np.flatnonzero(keep))
            if load:
                memory[filled : filled + len(kept_parts[-1])] = clean(block[keep], scratch=True)
                filled += len(kept_parts[-1])
        return np.concatenate(kept_parts), memory[:filled] if load else None

    def _reserve_memory(self):
        needed = len(self.indices) * IMAGE_BYTES
        available, which = free_memory()
        if needed > 0.8 * available:
            raise PCAMError(
                f"holding {self.x_path} in RAM (--data-on-device) needs {needed / 2**20:,.0f} MiB but only "
                f"{available / 2**20:,.0f} MiB is free under {which}; stream it (--data-on-device no) or ask for more "
                "memory"
            )
        return np.empty((len(self.indices),) + IMAGE_SHAPE, dtype=np.uint8)

    def __getstate__(self):
        return {**self.__dict__, "_reader": None, "_reader_pid": None}


def free_memory():
    """(bytes, which limit) this process can still fill: the smallest of the kernel's MemAvailable, the room left
    in its memory cgroup and its Slurm allocation. A job is killed at its cgroup's limit, long before MemAvailable
    (the whole node's) runs out."""
    limits = {"MemAvailable": mem_available(), **cgroup_room(), **slurm_allocation()}
    which = min(limits, key=limits.get)
    return limits[which], which


def mem_available():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cgroup_room():
    """{limit file: limit less usage} of this process's memory cgroup and those above it (v2, or v1's memory
    controller); unlimited ones ("max", or v1's 2**63 rounded to a page) are left out."""
    try:
        with open("/proc/self/cgroup") as entries:
            memberships = [line.rstrip("\n").split(":", 2) for line in entries]
    except OSError:
        return {}
    rooms = {}
    for _, controllers, path in memberships:
        if controllers == "":
            base, limit_name, usage_name = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_name, usage_name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        while True:
            room = cgroup_folder_room(base + path.rstrip("/"), limit_name, usage_name)
            if room is not None:
                rooms[f"cgroup {limit_name}"] = min(room, rooms.get(f"cgroup {limit_name}", room))
            if path in ("", "/"):
                break
            path = os.path.dirname(path.rstrip("/"))
    return rooms


def cgroup_folder_room(folder, limit_name, usage_name):
    """A cgroup's limit less its usage, the page cache it may drop (inactive files: what was read once) left out:
    the kernel reclaims that before it kills anything."""
    try:
        with open(os.path.join(folder, limit_name)) as limit_file, open(os.path.join(folder, usage_name)) as usage:
            limit, used = limit_file.read().strip(), int(usage.read())
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - used + reclaimable_cache(folder))
    except (OSError, ValueError):
        return None


def reclaimable_cache(folder):
    """Bytes of inactive file cache in a cgroup's memory.stat (v1 total_inactive_file, v2 inactive_file), else 0."""
    try:
        with open(os.path.join(folder, "memory.stat")) as stat:
            fields = dict(line.split() for line in stat if len(line.split()) == 2)
    except OSError:
        return 0
    return int(fields.get("total_inactive_file", fields.get("inactive_file", 0)))


def slurm_allocation():
    """{variable: bytes} of the job's Slurm memory less what this process holds already (0, Slurm's "all of the
    node's", counts as no limit)."""
    env = os.environ
    try:
        if int(env.get("SLURM_MEM_PER_NODE", "0")) > 0:
            return {"SLURM_MEM_PER_NODE": max(0, int(env["SLURM_MEM_PER_NODE"]) * 2**20 - resident_bytes())}
        if int(env.get("SLURM_MEM_PER_CPU", "0")) > 0:
            cpus = int(env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE") or "1")
            allocated = int(env["SLURM_MEM_PER_CPU"]) * 2**20 * cpus
            return {"SLURM_MEM_PER_CPU x CPUs": max(0, allocated - resident_bytes())}
    except ValueError:  # not a number of MiB: no allocation this process can go by
        pass
    return {}


def resident_bytes():
    """This process's resident memory (VmRSS), 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def load_split(data_dir, split, filter_data=False, preload=False, **thresholds):
    x_path, y_path = require_split(data_dir, split)
    return PCAMDataset(x_path, y_path, filter_data=filter_data, preload=preload, **thresholds)


def balanced_sampler(labels, seed):
    """Draws len(labels) kept rows with replacement, each class equally likely, from a seeded generator."""
    class_counts = np.bincount(labels, minlength=2)
    if (class_counts == 0).any():
        raise PCAMError(
            f"the training split holds a single class (counts {class_counts.tolist()}); "
            "a class-balanced sampler needs both"
        )
    class_weights = 1.0 / class_counts
    return WeightedRandomSampler(
        torch.from_numpy(class_weights[labels]),
        num_samples=len(labels),
        replacement=True,
        generator=torch.Generator().manual_seed(seed),
    )


@functools.cache
def main_exiting():
    """An event set as this process exits, for its loader workers (see seed_worker). Its exit handler is
    registered after multiprocessing's, so it runs first: before multiprocessing ends leftover workers."""
    event = multiprocessing.Event()
    atexit.register(event.set)
    return event


def seed_worker(worker_id, main_exiting):
    """Seed a DataLoader worker; it leaves stop signals to the main process, so a signal sent to the whole
    process group (scancel, preemption, Ctrl-C) stops the run cleanly instead of killing the workers under it.
    Once the main process is exiting, SIGTERM (how multiprocessing ends a worker still alive then) ends it."""
    for signum in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)

    def end_once_main_exits(signum, frame):
        if main_exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, end_once_main_exits)
    np.random.seed(torch.initial_seed() % 2**32)


def batch_loader(dataset, sampler, batch_size, num_workers=0, pin_memory=False, seed=0):
    """A DataLoader that fetches whole batches with one dataset[list_of_positions] call. Its workers end with
    each pass (not persistent): none outlives the pass that needs it, whatever ends that pass."""
    return DataLoader(
        dataset,
        sampler=BatchSampler(sampler, batch_size, drop_last=False),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(seed_worker, main_exiting=main_exiting()),
        generator=torch.Generator().manual_seed(seed + 1),
    )


def get_dataloaders(
    data_dir, batch_size=256, num_workers=0, filter_data=False, seed=0, preload=False, pin_memory=False, **thresholds
):
    """(train_loader, val_loader): class-balanced seeded draws from train, every valid row once in order."""
    if batch_size < 1:
        raise PCAMError(f"batch size must be positive, got {batch_size}")
    train_set = load_split(data_dir, "train", filter_data, preload, **thresholds)
    val_set = load_split(data_dir, "valid", filter_data, preload, **thresholds)
    train_loader = batch_loader(
        train_set, balanced_sampler(train_set.labels, seed), batch_size, num_workers, pin_memory, seed
    )
    val_loader = in_order(val_set, batch_size, num_workers, pin_memory, seed)
    return train_loader, val_loader


def get_test_loader(data_dir, batch_size=256, num_workers=0, filter_data=False, pin_memory=False, **thresholds):
    """Every test row once, in order; a MissingDataError when the test files are absent."""
    test_set = load_split(data_dir, "test", filter_data, **thresholds)
    return in_order(test_set, batch_size, num_workers, pin_memory)


def in_order(dataset, batch_size, num_workers=0, pin_memory=False, seed=0):
    """A loader of every kept row of dataset once, in order: validation, test and evaluate.py's passes."""
    return batch_loader(dataset, SequentialSampler(dataset), batch_size, num_workers, pin_memory, seed)


def sampler_generator(train_loader):
    """The torch.Generator behind the train loader's draws (its state goes into checkpoints)."""
    return train_loader.sampler.sampler.generator


class DeviceBatches:
    """A loader's batches served from its preloaded split, copied once to a device: each batch an index gather.

    The indices are the loader's own (its batch sampler: the seeded class-balanced draw, or every row in
    order), and each pass takes one number from its generator as a DataLoader pass does, so both paths
    give the same batches and a checkpoint resumes on either. On the CPU the split stays where it is.
    """

    def __init__(self, loader, device):
        self.dataset, self.sampler, self.generator = loader.dataset, loader.sampler, loader.generator
        self.images = torch.from_numpy(self.dataset._memory).to(device)  # (N, H, W, C) uint8
        self.labels = torch.from_numpy(self.dataset.labels).to(device)
        if self.images.device.type != "cpu":
            self.dataset._memory = None  # the device holds the split now; anything else reads the file

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = self.order().to(self.images.device)
        for start in range(0, len(order), self.sampler.batch_size):
            positions = order[start : start + self.sampler.batch_size]
            # index_select copies whole rows; images[positions] goes byte by byte on the CPU (30x slower)
            yield self.images.index_select(0, positions).permute(0, 3, 1, 2), self.labels.index_select(0, positions)

    def order(self):
        """This pass's positions as one tensor: WeightedRandomSampler's own multinomial call on its generator, or
        every row in order."""
        sampler = self.sampler.sampler
        if isinstance(sampler, WeightedRandomSampler):
            return torch.multinomial(
                sampler.weights, sampler.num_samples, sampler.replacement, generator=sampler.generator
            )
        return torch.arange(len(sampler))


class PrefetchBatches:
    """A loader's pinned batches copied to a CUDA device on a side stream: the next one while this one trains."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.dataset, self.sampler, self.generator = loader.dataset, loader.sampler, loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        copy_stream, current = torch.cuda.Stream(self.device), None
        for batch in self.loader:
            with torch.cuda.stream(copy_stream):
                upcoming = [tensor.to(self.device, non_blocking=True) for tensor in batch]
            if current is not None:
                yield current
            compute_stream = torch.cuda.current_stream(self.device)
            compute_stream.wait_stream(copy_stream)
            for tensor in upcoming:
                tensor.record_stream(compute_stream)  # made on the copy stream, used on this one
            current = upcoming
        if current is not None:
            yield current


# ---- shared by the scripts: atomic writes, the splits present, the manifest ----


def write_atomically(path, write):
    """Call write(temp_path), then move the finished file into place; a failure leaves no file at path, and no
    temporary file. The temporary name carries the PID, so two writers never share one."""
    temp_path = f"{path}.{os.getpid()}.partial"
    try:
        write(temp_path)
        os.replace(temp_path, path)
    except OSError as error:
        raise PCAMError(f"cannot write {path}: {os_reason(error)}") from None
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


# what a run, evaluate.py and the data commands keep in their folders: no other command's output takes these names
RECORD_NAMES = ("run.json", "metrics.csv", "predictions.csv", "metrics.json", RUN_LOCK_NAME, "pcam.lock", PREPARED_NAME)


def is_data_file(path):
    """A split file, what download makes of one, a checkpoint or a record a run or data folder keeps: no
    command's output may take such a name, whatever the flags."""
    name = os.path.basename(str(path))
    return name.startswith("camelyonpatch_") or name.endswith((".h5", ".h5.gz", ".hdf5", ".pt")) or name in RECORD_NAMES


def check_output(path, written_here, force=False):
    """Refuse an output path that would replace what this command did not write: a data file or a run's record
    whatever the flags, any other existing file unless force. written_here(path) tells the command's own earlier
    output. A folder where the file belongs is refused before any work."""
    if os.path.isdir(path):
        raise PCAMError(f"{path} is a folder: name the output file itself")
    if is_data_file(path) and not (os.path.isfile(path) and written_here(path)):
        raise PCAMError(f"{path} is a data file or a run's record, never this output: choose another output path")
    if os.path.isfile(path) and not force and not written_here(path):
        raise PCAMError(f"{path} exists and this command did not write it: choose another path, or add --force")


def png_software(path):
    """The Software text of a PNG file (what wrote it), or None for anything else. PNG: an 8-byte signature,
    then chunks of (length, type, data, crc); savefig's metadata comes as tEXt chunks before the pixels."""
    try:
        with open(path, "rb") as source:
            if source.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while len(header := source.read(8)) == 8:
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind in (b"IDAT", b"IEND"):
                    return None
                body = source.read(length + 4)[:length]
                keyword, _, text = body.partition(b"\0")
                if kind == b"tEXt" and keyword == b"Software":
                    return text.decode("latin-1")
    except OSError:
        return None
    return None


def check_output_folder(path, flag):
    """A folder a command will write into: refused before any work when a file stands in its place."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise PCAMError(f"{flag} {path} is a file, not a folder: name a folder (it is created when missing)")


def hold_lock(path, in_use):
    """An open file holding an exclusive flock on path, with this process's PID and host in it (closing it, or the
    process ending however it ends, lets go), or a PCAMError: in_use with {holder} filled in."""
    lock = open(path, "a+")  # noqa: SIM115 (held open while its holder writes)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not written its PID yet"
        lock.close()
        raise PCAMError(in_use.format(holder=holder)) from None
    lock.truncate(0)
    lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def run_is_live(folder):
    """Whether a live train.py holds the run folder's lock."""
    try:
        with open(os.path.join(folder, RUN_LOCK_NAME)) as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def os_reason(error):
    """The OS's words for an OSError, also when h5py wraps it (h5py's messages carry errno = N)."""
    text = str(error)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):  # what a user's disk or folder can cause
        if f"errno = {code}," in text:
            return os.strerror(code)
    return (error.strerror or text).strip().splitlines()[0]


def present_splits(data_dir):
    """The splits whose x and y files are both there; a split with only one of them is an error."""
    if not os.path.isdir(data_dir):
        require_split(data_dir, "train")  # raises the data-dir message
    for split in SPLITS:
        if sum(os.path.isfile(p) for p in split_paths(data_dir, split)) == 1:
            require_split(data_dir, split)  # raises the message naming the missing file
    splits = [s for s in SPLITS if all(os.path.isfile(p) for p in split_paths(data_dir, s))]
    if not splits:
        require_split(data_dir, "train")  # raises the missing-files message
    return splits


def split_labels(data_dir, split):
    """The labels of a split that is there, checked, and holds at least one image."""
    x_path, y_path = require_split(data_dir, split)
    labels = read_split_labels(x_path, y_path)
    if not len(labels):
        raise PCAMError(f"{x_path} holds no images; a PCAM split needs at least one row: write or fetch it again")
    return labels


def file_digest(path, algorithm="sha256", show_progress=False):
    digest, size, done, next_report = hashlib.new(algorithm), os.path.getsize(path), 0, 0.0
    with open(path, "rb") as source:
        while chunk := source.read(16 * 2**20):
            digest.update(chunk)
            done += len(chunk)
            if show_progress and done / size >= next_report:
                log(f"{algorithm} {os.path.basename(path)}: {100 * done // size}% of {size / 2**20:.0f} MiB")
                next_report += 0.25
    return digest.hexdigest()


def read_manifest(manifest_path, data_dir):
    """{file name: {"bytes", "sha256", and "mtime" when recorded}} from a manifest, checked for its shape."""
    fix = f"write it anew with `python manage_data.py manifest --data-dir {data_dir}`"
    try:
        with open(manifest_path) as source:
            files = json.load(source)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PCAMError(f"cannot read manifest {manifest_path} ({type(error).__name__}: {error}); {fix}") from None
    well_formed = isinstance(files, dict) and all(
        isinstance(record, dict)
        and type(record.get("bytes")) is int
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("mtime", 0.0), (int, float))
        and os.path.basename(name) == name
        for name, record in files.items()
    )
    if not well_formed:
        raise PCAMError(
            f"manifest {manifest_path} is malformed (each file needs integer 'bytes' and a 'sha256' string); {fix}"
        )
    return files


def check_manifest(data_dir):
    """Compare each file's size and mtime with the data folder's manifest, if it has one: None without a
    manifest, True when all match, a PCAMError naming the files that differ otherwise."""
    manifest_path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return None
    differing = []
    for name, record in sorted(read_manifest(manifest_path, data_dir).items()):
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            differing.append(f"{name} (missing)")
        elif os.path.getsize(path) != record["bytes"] or record.get(
            "mtime", os.path.getmtime(path)
        ) != os.path.getmtime(path):
            differing.append(f"{name} (size or mtime changed)")
    if differing:
        raise PCAMError(
            f"{', '.join(differing)} differ from {manifest_path}; check the contents with "
            f"`python manage_data.py verify --data-dir {data_dir}`, or record the files as they are now with "
            f"`python manage_data.py manifest --data-dir {data_dir}`"
        )
    return True
