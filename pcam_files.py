"""The PCAM HDF5 files: where a split's files are, what is checked before they are read, and how their rows are
read: whole batches in one array operation (numpy.memmap for uncompressed contiguous files, one h5py selection
otherwise) and whole files in large blocks."""

import contextlib
import ctypes
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from common import UserError, log, read_json

SPLITS = ("train", "valid", "test")
IMAGE_SHAPE = (96, 96, 3)
IMAGE_BYTES = 96 * 96 * 3
BLOCK_BYTES = 64 * 2**20  # streaming passes read about this many raw bytes at a time
CHUNK_CACHE_BYTES = 256 * 2**20  # HDF5 chunk cache per open chunked file (per worker)
MAPPED_BYTES_BEFORE_RELEASE = 2**30  # unmap a memory map's pages after this much reading (see MappedRows)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 4 * 2**20  # buffers this large are mapped for themselves (see keep_large_buffers_off_the_heap)
HEAP_MMAP_THRESHOLD_BYTES, HEAP_TRIM_BYTES = 32 * 2**20, 256 * 2**20  # see keep_step_buffers_on_the_heap
MADV_NOHUGEPAGE, MADV_POPULATE_WRITE = 15, 23  # Linux's madvise advice (asm-generic/mman-common.h)
PROGRESS_EVERY_S = 10  # a whole-file pass prints a line this often (a batch log wants 5 to 30 s), and when done
SCALE_SAMPLE_ROWS = 32  # evenly spaced rows whose pixels decide whether a file is on the 0..255 scale
MANIFEST_NAME = "pcam_manifest.json"  # manage_data.py manifest: each file's size, mtime and sha256
PREPARED_NAME = "pcam_prepared.json"  # manage_data.py prepare's record of the source files its copy was made from
SYNTH_NAME = "pcam_synth.json"  # manage_data.py synth's record of its set: {"complete": false} while it writes


class MissingDataError(UserError, FileNotFoundError):
    """The data directory or a split's files are not there."""


def split_paths(data_dir, split):
    name = os.path.join(str(data_dir), f"camelyonpatch_level_2_split_{split}_{{}}.h5")
    return name.format("x"), name.format("y")


def require_split(data_dir, split):
    """The split's (x, y) paths, or a MissingDataError naming what is missing and how to get it."""
    if str(data_dir) == "":
        raise MissingDataError(
            "the data folder is an empty string (is $PCAM_DIR set but empty?); "
            "pass --data-dir DIR or set PCAM_DIR to the PCAM folder"
        )
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise MissingDataError(f"data directory {data_dir} is a file, not a folder: pass --data-dir (or set PCAM_DIR)")
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


@contextlib.contextmanager
def open_h5(path, **kwargs):
    """path opened read-only by h5py for a with block; whatever h5py raises in the block, opening or reading (a
    byte flipped in a header surfaces as a KeyError, RuntimeError or TypeError as often as an OSError), is one
    UserError naming the file (file_problem)."""
    with reading(path):
        with h5py.File(path, "r", **kwargs) as h5file:
            yield h5file


@contextlib.contextmanager
def reading(path):
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
        raise file_problem(path, error) from None


def file_problem(path, error):
    """What is wrong with path, from h5py's error: locked by a process writing it (the file itself may be whole),
    truncated, not HDF5, or damaged inside; only the last three are reasons to replace it."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)  # a KeyError's str quotes
    what = (text.strip() or type(error).__name__).splitlines()[0]
    if "unable to lock file" in what and "errno = 11," not in what:  # ENOLCK, ENOSYS: NFS without lockd, say
        return UserError(
            f"{path} cannot be locked for reading on this file system ({what}); set HDF5_USE_FILE_LOCKING=FALSE and "
            "run again (nothing shows the file is damaged)"
        )
    if "filter" in what and ("not registered" in what or "can't open directory" in what or "plugin" in what):
        return UserError(
            f"{path} is compressed with an HDF5 filter this h5py does not have ({what}); copy it without that "
            "filter (h5repack -f NONE, or gzip), or prepare it where the filter is installed (nothing shows damage)"
        )
    if isinstance(error, BlockingIOError) or "unable to lock file" in what:
        return UserError(
            f"{path} is locked by another process that has it open for writing (HDF5 file locking: a notebook's "
            "h5py.File(path, 'a'), say); close it there and run again (nothing shows the file is damaged)"
        )
    replace = "remove it, then download or copy it again"
    if "truncated file" in what:
        return UserError(f"{path} is truncated ({what}); {replace}")
    if "file signature not found" in what:
        return UserError(f"{path} is not a readable HDF5 file ({what}); {replace}")
    return UserError(f"{path} is damaged: h5py cannot read it ({type(error).__name__}: {what}); {replace}")


def dataset_in(h5file, key, path):
    if key not in h5file:
        raise UserError(
            f"{path} has no dataset '{key}' (found: {', '.join(h5file.keys()) or 'nothing'}); "
            f"PCAM files store images as 'x' and labels as 'y'"
        )
    dset = h5file[key]
    if not isinstance(dset, h5py.Dataset):
        raise UserError(
            f"{path}: '{key}' is a {type(dset).__name__.lower()}, not a dataset; "
            "PCAM files store images as 'x' and labels as 'y', each one array"
        )
    if not (np.issubdtype(dset.dtype, np.integer) or np.issubdtype(dset.dtype, np.floating)):  # bool is neither
        raise UserError(f"{path}: '{key}' holds {dset.dtype} values; expected integers or floats")
    if key == "x" and dset.shape[1:] != IMAGE_SHAPE:  # a scalar too, which h5py reads by other rules
        raise UserError(f"{path}: 'x' has shape {dset.shape}; expected (images, 96, 96, 3): (N, H, W, C)")
    return dset


def block_rows(dset):
    rows = max(1, BLOCK_BYTES // (IMAGE_BYTES * dset.dtype.itemsize))  # one raw block is about BLOCK_BYTES
    if dset.chunks:  # whole chunks per block, so no chunk is decompressed twice
        rows = max(dset.chunks[0], rows // dset.chunks[0] * dset.chunks[0])
    return rows


def contiguous_offset(x_path, dset):
    """Byte offset of an uncompressed, contiguous, native-order dataset (None for any other layout)."""
    offset = dset.id.get_offset()
    if dset.chunks is not None or offset is None or not dset.dtype.isnative:  # HDF5 compresses chunked data only
        return None
    if os.path.getsize(x_path) < offset + dset.nbytes:
        raise UserError(f"{x_path} is truncated; download or copy it again")
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
    """Yield (start_row, read-only raw_block) over a PCAM x file in large blocks, with bounded memory.

    A contiguous file is read through a memory map: blocks are views, no copy, and each block's pages leave RSS
    once the caller is done with it. Other files are read by h5py, the next block in a background thread while the
    caller works on the current one (h5py releases the GIL while reading)."""
    with open_h5(x_path, rdcc_nbytes=CHUNK_CACHE_BYTES) as h5file:
        dset = dataset_in(h5file, "x", x_path)
        step, offset, shape, dtype = block_rows(dset), contiguous_offset(x_path, dset), dset.shape, dset.dtype
        if offset is None:
            with ThreadPoolExecutor(max_workers=1) as reader:
                pending = reader.submit(dset.__getitem__, slice(0, step))
                for start in range(0, len(dset), step):
                    block = pending.result()
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
        check_still_whole(mapping, offset + images.nbytes, x_path)
        yield start, images[start : start + step]
        mapping.madvise(mmap.MADV_DONTNEED)  # only this block was touched; the page cache keeps the data


def read_labels(y_path):
    with open_h5(y_path) as h5file:
        dset = dataset_in(h5file, "y", y_path)
        if dset.ndim not in (1, 2, 4) or any(size != 1 for size in dset.shape[1:]):
            raise UserError(f"{y_path}: labels have shape {dset.shape}; expected (N,), (N, 1) or (N, 1, 1, 1)")
        raw = dset[()].reshape(-1)
    bad = np.unique(raw[(raw != 0) & (raw != 1)])[:5]
    if bad.size:
        raise UserError(f"{y_path}: labels must be 0 or 1, found {', '.join(map(str, bad))}")
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
        sample = dset[rows]
    floating = np.issubdtype(sample.dtype, np.floating)
    finite = sample[np.isfinite(sample)] if floating else sample
    if not finite.size:
        raise UserError(f"{x_path}: no finite pixel value in {len(rows)} sampled images; the images are all NaN or inf")
    if floating and finite.min() >= 0 and finite.max() <= 1:
        raise UserError(
            f"{x_path}: pixel values are all within 0..1 in {len(rows)} sampled images; expected "
            "the 0..255 scale: write the images multiplied by 255"
        )
    median = np.median(finite)
    if sample.dtype.itemsize > 1 and not 0 <= median <= 255:  # stray values outside 0..255 are clipped, not refused
        raise UserError(
            f"{x_path}: {sample.dtype} pixel values up to {finite.max()} (median {median:g}) "
            f"in {len(rows)} sampled images; expected the 0..255 scale of 8-bit images: convert them to 0..255 first"
        )


def read_split_labels(x_path, y_path):
    """The labels of a split, (N,) int64, after checking that its x file holds N > 0 images of 96x96x3."""
    labels = read_labels(y_path)
    with open_h5(x_path) as h5file:
        dset = dataset_in(h5file, "x", x_path)
        if dset.dtype == np.int8:  # a byte with a sign: 128..255 would read as negative
            raise UserError(f"{x_path}: int8 pixels cannot hold the 0..255 scale; store the images as uint8")
        if len(dset) != len(labels):
            raise UserError(
                f"{x_path} has {len(dset)} images but {y_path} has {len(labels)} labels; "
                "the two files of a split must match row for row"
            )
    if not len(labels):
        raise UserError(f"{x_path} holds no images; a PCAM split needs at least one row: write or fetch it again")
    return labels


def is_consecutive(rows):
    return len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1))


class MappedRows:
    """uint8 rows of a contiguous dataset through a memory map: a batch is one fancy-indexing copy."""

    def __init__(self, x_path, offset, shape):
        with open(x_path, "rb") as raw_file:
            self.mapping = mmap.mmap(raw_file.fileno(), 0, access=mmap.ACCESS_READ)
        self.images = np.frombuffer(self.mapping, np.uint8, int(np.prod(shape)), offset).reshape(shape)
        self.x_path, self.end, self.bytes_since_release = x_path, offset + self.images.nbytes, 0

    def read(self, rows):
        check_still_whole(self.mapping, self.end, self.x_path)
        batch = self.images[rows]
        self.bytes_since_release += batch.nbytes
        # mapped page-cache pages count in RSS (though the kernel reclaims them freely); dropping them now and then
        # keeps RSS under MAPPED_BYTES_BEFORE_RELEASE; every drop costs page faults, hence not per batch, and not
        # for a file that size or smaller (PCAM's valid and test splits), whose map holds no more than that
        if self.bytes_since_release > MAPPED_BYTES_BEFORE_RELEASE and len(self.mapping) > MAPPED_BYTES_BEFORE_RELEASE:
            self.mapping.madvise(mmap.MADV_DONTNEED)  # the data stays in the page cache
            self.bytes_since_release = 0
        return batch


def stamp(path):
    """What changes when a file is replaced, rewritten or cut short: its inode, size and modification time."""
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def check_stamp(path, opened):
    """Refuse to read on from a file that is no longer the one opened (its labels were read then)."""
    try:
        now = stamp(path)
    except OSError:  # removed
        now = None
    if now != opened:
        raise UserError(
            f"{path} changed while being read (replaced, rewritten or truncated by another process); its images "
            "no longer match the labels read at the start: check the folder with manage_data.py verify, then run again"
        )


def check_still_whole(mapping, end, x_path):
    """A mapped file cut short under its reader would end the process (a loader worker, say) with SIGBUS at the
    first page past its new end; one fstat before each read finds it first."""
    if mapping.size() < end:
        raise UserError(
            f"{x_path} shrank to {mapping.size():,} bytes while being read (its images end at byte {end:,}): "
            "another process truncated it; check it with manage_data.py verify, or download or copy it again"
        )


class PositionalRows:
    """Rows of a contiguous float (or other wide) dataset by pread straight into the batch array. Memory-mapping a
    file four times the size of its uint8 content would map large page-cache folios around every random row and
    inflate RSS; pread touches only the bytes asked for."""

    def __init__(self, x_path, offset, dtype):
        self.fd, self.offset, self.dtype = os.open(x_path, os.O_RDONLY), offset, dtype
        self.x_path, self.row_bytes = x_path, IMAGE_BYTES * dtype.itemsize

    def read(self, rows):
        batch, size = np.empty((len(rows),) + IMAGE_SHAPE, self.dtype), self.row_bytes
        buffer = memoryview(batch).cast("B")
        if is_consecutive(rows):  # validation and streaming passes: one read for the whole batch
            self.read_exactly(buffer, self.offset + int(rows[0]) * size)
            return batch
        for i, row in enumerate(rows.tolist()):  # one system call per row, no per-row numpy work
            self.read_exactly(buffer[i * size : (i + 1) * size], self.offset + row * size)
        return batch

    def read_exactly(self, buffer, offset):
        if os.preadv(self.fd, [buffer], offset) != len(buffer):  # a file cut short under its reader
            raise UserError(
                f"{self.x_path} ends before byte {offset + len(buffer):,} while being read: another process "
                "truncated it; check it with manage_data.py verify, or download or copy it again"
            )

    def __del__(self):
        os.close(self.fd)


class ChunkedRows:
    """Rows of a chunked or compressed dataset through h5py, a chunk's worth of rows per read. Reading whole
    row-chunks decompresses each touched chunk once per batch, and the chunk cache keeps recent ones for the next
    batches; h5py's own point selection is slower than per-image reads here."""

    def __init__(self, x_path):
        self.x_path = x_path
        with reading(x_path):
            self.h5file = h5py.File(x_path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=100003, rdcc_w0=1.0)
            self.dset = self.h5file["x"]
        self.chunk_rows = self.dset.chunks[0] if self.dset.chunks else 1

    def read(self, rows):
        with reading(self.x_path):
            if is_consecutive(rows):
                return self.dset[rows[0] : rows[-1] + 1]
            batch = np.empty((len(rows),) + self.dset.shape[1:], self.dset.dtype)
            order = np.argsort(rows, kind="stable")
            chunk_starts = rows[order] // self.chunk_rows * self.chunk_rows
            boundaries = np.flatnonzero(np.diff(chunk_starts)) + 1  # where the sorted rows enter another chunk
            for group, start in zip(np.split(order, boundaries), chunk_starts[np.r_[0, boundaries]], strict=True):
                block = self.dset[start : start + self.chunk_rows]
                batch[group] = block[rows[group] - start]
            return batch


def keep_large_buffers_off_the_heap():
    """Have glibc serve every buffer of MMAP_THRESHOLD_BYTES or more by mmap, returned to the system on free. By
    default glibc raises that threshold (up to 32 MiB) whenever such a buffer is freed; batch buffers (28 MiB of
    float32 for 256 images) then come from the heap, which fragments, and RSS grows with the files' size. Every such
    buffer then costs a page fault per 4 KiB it touches, the float copy a training step makes of its batch included,
    so open_rows sets this only where batches are read as floats."""
    with contextlib.suppress(AttributeError, OSError):  # not glibc (macOS): no such threshold to fix
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def keep_step_buffers_on_the_heap():
    """Have glibc serve buffers under 32 MiB (its most) from the heap, and keep up to HEAP_TRIM_BYTES of it free. A
    training step frees some 60 MiB (its batch as fp32, the folded weight, gradients); past twice the largest buffer
    freed so far (56 MiB), glibc hands the heap's free top back, and the next step faults every page in again: 2,000
    to 3,500 page faults a step on the CPU, 15% of train.py's epoch. Reading a float file lowers the mmap threshold
    again (keep_large_buffers_off_the_heap)."""
    with contextlib.suppress(AttributeError, OSError):  # not glibc (macOS): no such thresholds
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES)


def advise(array, advice):
    """madvise the whole pages of array's memory; nothing off Linux, or where the kernel lacks that advice."""
    start = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    length = (array.ctypes.data + array.nbytes - start) // mmap.PAGESIZE * mmap.PAGESIZE
    if sys.platform.startswith("linux") and length > 0:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice)
    return array


def open_rows(x_path):
    with open_h5(x_path) as h5file:
        dset = h5file["x"]
        offset, shape, dtype = contiguous_offset(x_path, dset), dset.shape, dset.dtype
    if dtype != np.uint8:  # float batches fragment the heap; uint8 ones, and a trainer's float copies, reuse it
        keep_large_buffers_off_the_heap()  # in the process that reads: the main one, or a loader worker
    # the file is closed again first: HDF5 shares one open file, so ChunkedRows's cache size would be ignored
    if offset is not None and dtype == np.uint8:
        return MappedRows(x_path, offset, shape)
    if offset is not None:
        return PositionalRows(x_path, offset, dtype)
    return ChunkedRows(x_path)


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
    return read_split_labels(*require_split(data_dir, split))


def read_manifest(manifest_path, data_dir):
    """{file name: {"bytes", "sha256", and "mtime" when recorded}} from a manifest, checked for its shape."""
    fix = f"write it anew with `python manage_data.py manifest --data-dir {data_dir}`"
    try:
        with open(manifest_path) as source:
            files = json.load(source)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read manifest {manifest_path} ({type(error).__name__}: {error}); {fix}") from None
    well_formed = isinstance(files, dict) and all(
        isinstance(record, dict)
        and type(record.get("bytes")) is int
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("mtime", 0.0), (int, float))
        and os.path.basename(name) == name
        for name, record in files.items()
    )
    if not well_formed:
        raise UserError(
            f"manifest {manifest_path} is malformed (each file needs integer 'bytes' and a 'sha256' string); {fix}"
        )
    if not files:
        raise UserError(f"manifest {manifest_path} lists no files, so it vouches for none; {fix}")
    return {name: {**record, "sha256": record["sha256"].lower()} for name, record in files.items()}  # as sha256sum


def check_not_half_written(data_dir):
    if read_json(os.path.join(data_dir, SYNTH_NAME)).get("complete") is False:
        raise UserError(
            f"{data_dir} holds a synthetic set that an interrupted synth left half written; run that synth "
            "command again to finish it"
        )


def unlisted_split_files(data_dir, listed):
    """Split files in data_dir that a manifest listing listed does not name: it cannot vouch for them."""
    present = (os.path.basename(p) for s in SPLITS for p in split_paths(data_dir, s) if os.path.isfile(p))
    return [f"{name} (present, not in the manifest)" for name in present if name not in listed]


def check_manifest(data_dir):
    """Compare each file's size and mtime with the data folder's manifest, if it has one: None without a
    manifest, True when all match, a UserError naming the files that differ otherwise."""
    manifest_path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        return None
    differing, listed = [], read_manifest(manifest_path, data_dir)
    for name, record in sorted(listed.items()):
        path = os.path.join(data_dir, name)
        stat = os.stat(path) if os.path.isfile(path) else None
        if stat is None:
            differing.append(f"{name} (missing)")
        elif stat.st_size != record["bytes"] or record.get("mtime", stat.st_mtime) != stat.st_mtime:
            differing.append(f"{name} (size or mtime changed)")
    differing += unlisted_split_files(data_dir, listed)
    if differing:
        raise UserError(
            f"{', '.join(differing)} differ from {manifest_path}; check the contents with "
            f"`python manage_data.py verify --data-dir {data_dir}`, and when they match (a copy has new mtimes) "
            f"record the files as they are now with `python manage_data.py manifest --data-dir {data_dir}`"
        )
    return True
