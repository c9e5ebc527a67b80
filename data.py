"""PCAM data for training: the Dataset, cleaning to uint8, the outlier filter, the class-balanced sampler, the
loaders, and where batches come from (resident in device memory, resident in host memory for a GPU smaller than
the data, or streamed from the files). Images stay uint8 until they reach the training device. How rows come out
of the files is in pcam_files.py; the data commands (download, synth, prepare, ...) are in manage_data.py."""

import atexit
import functools
import hashlib
import multiprocessing
import os
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

import pcam_files
from common import UserError, error_line, log
from pcam_files import IMAGE_BYTES, iter_raw_blocks

BLACK_THRESHOLD = 5.0  # a tile whose mean intensity is at or below this is a blackout
WHITE_THRESHOLD = 250.0  # at or above this, a washout; real tissue stays well below
RESIDENT_SHARE = 0.7  # the splits go resident when they take at most this share of free memory
NORMALIZATION_SAMPLE = 2048  # training images the per-channel mean and std are measured on
TINY_CLASS_SHARE, TINY_CLASS_IMAGES = 0.01, 10  # a training split's minority class below either is warned about
IDENTITY_IMAGES = 64  # evenly spaced images whose cleaned pixels, with every label, tell one data set from another


class FilteredOutError(UserError):
    """The outlier filter removed every image of a split."""


def clean(images, scratch=False):
    """Raw stored pixels of any dtype -> uint8: NaN -> 0, +inf -> 255, -inf -> 0, clip to [0, 255]. scratch=True
    lets a float input be overwritten, sparing a second full-size float array."""
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

    Integer blocks are summed exactly in uint32 (at most 27,648 * 255), as fast as a memory copy. Float blocks are
    summed as they are, which is exact for rows already within 0..255 (all but suspect_rows, passed in when the
    caller has them) up to clean's truncation of each pixel: that mean is at most 1 above the cleaned one. The
    suspect rows and the rows that close to a threshold are cleaned and measured exactly, so filtering a float file
    or its prepared uint8 copy agree."""
    if not np.issubdtype(raw.dtype, np.floating):
        return clean(raw).reshape(len(raw), -1).sum(axis=1, dtype=np.uint32) / IMAGE_BYTES
    total = raw.reshape(len(raw), -1).sum(axis=1, dtype=np.promote_types(raw.dtype, np.float32))  # float16 overflows
    means = total.astype(np.float64) / IMAGE_BYTES  # pairwise: error << 0.01
    exact = suspect_rows(raw) if suspect is None else suspect.copy()
    for threshold in (black_threshold, white_threshold):
        exact |= (means > threshold - 0.01) & (means < threshold + 1.01)  # 0.01: room for summation error
    if exact.any():
        means[exact] = tile_means(clean(raw[exact], scratch=True))
    return means


def outlier_rows(block, black_threshold=BLACK_THRESHOLD, white_threshold=WHITE_THRESHOLD):
    means = tile_means(block, black_threshold, white_threshold)
    return (means <= black_threshold) | (means >= white_threshold)


def outlier_mask(x_path, black_threshold=BLACK_THRESHOLD, white_threshold=WHITE_THRESHOLD):
    masks = [outlier_rows(block, black_threshold, white_threshold) for _, block in iter_raw_blocks(x_path)]
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


class PCAMDataset(Dataset):
    """One PCAM split. ds[i] -> (image uint8 (3, 96, 96), label long); ds[list_of_i] -> a whole batch. Files are
    opened lazily in the process that reads them, so the dataset can go to DataLoader workers (see open_rows).
    preload (True: the CPU, or a torch.device) holds the kept images there as one uint8 tensor, self.memory."""

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
                raise pcam_files.MissingDataError(f"{path} not found")
        self.x_stamp = pcam_files.stamp(self.x_path)  # the file the labels and the filter's rows belong to
        all_labels = pcam_files.read_split_labels(self.x_path, self.y_path)
        pcam_files.check_pixel_scale(self.x_path)
        self.indices, self.memory = np.arange(len(all_labels)), None
        if filter_data or preload:
            thresholds = (black_threshold, white_threshold) if filter_data else None
            store = torch.device("cpu") if preload is True else preload or None
            self.indices, self.memory = self._read_whole_file(thresholds, store)
            pcam_files.check_stamp(self.x_path, self.x_stamp)  # not replaced during that pass
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
        if self.memory is not None:
            images = self.memory[torch.from_numpy(positions).to(self.memory.device)]
        else:
            images = torch.from_numpy(clean(self._read_rows(self.indices[positions]), scratch=True))
        labels = torch.from_numpy(self.labels[positions])
        if self.transform is not None:
            return torch.stack([torch.as_tensor(self.transform(image)) for image in images.cpu().numpy()]), labels
        return images.permute(0, 3, 1, 2), labels

    def _read_rows(self, rows):
        pcam_files.check_stamp(self.x_path, self.x_stamp)  # a stat a batch: every reader reads the file it opened
        if self._reader_pid != os.getpid():  # first read in this process (a fresh worker, say): open here
            self._reader, self._reader_pid = pcam_files.open_rows(self.x_path), os.getpid()
        return self._reader.read(rows)

    def _read_whole_file(self, thresholds, store):
        """(kept rows, their cleaned images on the store device or None) in one pass over the x file: the rows the
        filter keeps (every row without thresholds) and, with a store, their images copied there block by block, so
        the host holds a few blocks at a time, not the split. The store is sized for every row, the kept count
        being known only at the end; in RAM its tail is never written, so never takes memory. Two threads store
        blocks (fresh memory's first writes: most of a load) while the next one is filtered."""
        memory = self._reserve_memory(store) if store else None
        kept_parts, filled, stored = [], 0, []
        task = " and ".join(["filter"] * bool(thresholds) + ["load"] * bool(store))
        with ThreadPoolExecutor(max_workers=2) as storing:
            for start, block in iter_raw_blocks(self.x_path, f"{task} {os.path.basename(self.x_path)}"):
                kept = np.flatnonzero(~outlier_rows(block, *thresholds)) if thresholds else np.arange(len(block))
                kept_parts.append(start + kept)
                if store:
                    if len(stored) == 2:
                        stored.pop(0).result()  # two blocks in flight at most
                    stored.append(storing.submit(store_rows, memory[filled : filled + len(kept)], block, kept))
                    filled += len(kept)
            for block_stored in stored:
                block_stored.result()
        return np.concatenate(kept_parts), memory[:filled] if store else None

    def _reserve_memory(self, store):
        shape = (len(self.indices),) + pcam_files.IMAGE_SHAPE
        if store.type != "cpu":  # choose_data_path has measured the device's room
            return torch.empty(shape, dtype=torch.uint8, device=store)
        needed = len(self.indices) * IMAGE_BYTES
        available, which = free_memory()
        if needed > 0.8 * available:
            raise UserError(
                f"holding {self.x_path} in RAM (--data-on-device) needs {needed / 2**20:,.0f} MiB but only "
                f"{available / 2**20:,.0f} MiB is free under {which}; stream it (--data-on-device no) or ask for more "
                "memory"
            )
        # pages are taken as rows are written, small ones: the first touch of the huge pages numpy asks for doubled
        # the pass that filters and loads 0.84 GiB on a VM (1.2-3.7 s against 0.7-0.9 s)
        return torch.from_numpy(pcam_files.advise(np.empty(shape, dtype=np.uint8), pcam_files.MADV_NOHUGEPAGE))

    def __getstate__(self):
        return {**self.__dict__, "_reader": None, "_reader_pid": None}


def store_rows(rows, block, kept):
    """Clean block's kept rows into rows of a split's store (block: perhaps a read-only view of the mapped file)."""
    images = clean(block if len(kept) == len(block) else block[kept], scratch=True)  # every row kept: no copy
    if rows.device.type == "cpu":  # its pages mapped in one call first, not at a fault each
        pcam_files.advise(rows.numpy(), pcam_files.MADV_POPULATE_WRITE)[:] = images
    else:
        rows.copy_(torch.from_numpy(np.require(images, requirements="W")))


def data_identity(data_dir):
    """{split: split_identity} of the splits in data_dir: what a run records of the data it starts on."""
    present = (s for s in pcam_files.SPLITS if all(os.path.isfile(p) for p in pcam_files.split_paths(data_dir, s)))
    return {split: split_identity(data_dir, split) for split in present}


def split_identity(data_dir, split):
    """What tells a split's data from other data, read in a moment and the same for a cleaned copy (prepare,
    staging): its row count and the sha256 of its labels and of IDENTITY_IMAGES evenly spaced cleaned images."""
    x_path, y_path = pcam_files.require_split(data_dir, split)
    labels = pcam_files.read_split_labels(x_path, y_path)  # x checked against them first
    rows = np.unique(np.linspace(0, len(labels) - 1, min(len(labels), IDENTITY_IMAGES)).astype(np.int64))
    with pcam_files.open_h5(x_path) as h5file:
        images = clean(pcam_files.dataset_in(h5file, "x", x_path)[rows]) if len(rows) else np.empty(0, np.uint8)
    return {
        "rows": len(labels),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "images_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
    }


def split_unchanged(data_dir, split, identity):
    """None when a split is still the one identity describes, else why not (changed, gone, locked, damaged)."""
    try:
        same = split_identity(data_dir, split) == identity
    except UserError as error:
        return error_line(error)
    return None if same else f"the {split} split in {data_dir} changed while the run trained"


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
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def load_split(data_dir, split, filter_data=False, preload=False, **thresholds):
    x_path, y_path = pcam_files.require_split(data_dir, split)
    return PCAMDataset(x_path, y_path, filter_data=filter_data, preload=preload, **thresholds)


class BalancedSampler(Sampler):
    """len(labels) positions drawn with replacement from a seeded generator, each class equally likely: for each
    draw a class, then one of its rows, uniformly. A pass is one vectorised draw() (a few ms for the full train
    split, where WeightedRandomSampler's multinomial takes 50-140 ms), which the loader and the resident batches
    both take, so every data path trains on the same batches."""

    def __init__(self, labels, seed):
        class_counts = np.bincount(labels, minlength=2)
        if (class_counts == 0).any():
            raise UserError(
                f"the training split holds a single class (counts {class_counts.tolist()}); "
                "a class-balanced sampler needs both"
            )
        self.rows_by_class = torch.from_numpy(np.argsort(labels, kind="stable"))  # class 0's positions, then 1's
        self.class_counts = torch.from_numpy(class_counts)
        self.class_starts = torch.tensor([0, class_counts[0]])
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.rows_by_class)

    def __iter__(self):
        return iter(self.draw().tolist())

    def draw(self):
        classes = torch.randint(2, (len(self),), generator=self.generator)
        uniform = torch.rand(len(self), generator=self.generator, dtype=torch.float64)
        within_class = (uniform * self.class_counts[classes]).long()  # uniform < 1: always a row of that class
        return self.rows_by_class[self.class_starts[classes] + within_class]


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


class BatchLoader(DataLoader):
    """A DataLoader whose worker processes, when they cannot start (a process limit: fork's EAGAIN), end the pass
    in one line naming --num-workers."""

    def __iter__(self):
        try:
            return super().__iter__()
        except BlockingIOError as error:
            why, hook = error.strerror, sys.unraisablehook
            sys.unraisablehook = lambda unraisable: None  # the half-made iterator's __del__ fails on what it lacks
            try:
                traceback.clear_frames(error.__traceback__)  # its last reference: it goes now, quietly
            finally:
                sys.unraisablehook = hook
        raise UserError(
            f"cannot start {self.num_workers} loader worker processes ({why}: the job's process limit, ulimit -u, "
            "is reached); pass a smaller --num-workers (0 reads in the main process)"
        )


def batch_loader(dataset, sampler, batch_size, num_workers=0, pin_memory=False, seed=0):
    """A loader that fetches whole batches with one dataset[list_of_positions] call. Its workers end with
    each pass (not persistent): none outlives the pass that needs it, whatever ends that pass."""
    return BatchLoader(
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
        raise UserError(f"batch size must be positive, got {batch_size}")
    train_set = load_split(data_dir, "train", filter_data, preload, **thresholds)
    val_set = load_split(data_dir, "valid", filter_data, preload, **thresholds)
    train_sampler = BalancedSampler(train_set.labels, seed)
    train_loader = batch_loader(train_set, train_sampler, batch_size, num_workers, pin_memory, seed)
    return train_loader, in_order(val_set, batch_size, num_workers, pin_memory, seed)


def get_test_loader(data_dir, batch_size=256, num_workers=0, filter_data=False, pin_memory=False, **thresholds):
    """Every test row once, in order; a MissingDataError when the test files are absent."""
    test_set = load_split(data_dir, "test", filter_data, **thresholds)
    return in_order(test_set, batch_size, num_workers, pin_memory)


def in_order(dataset, batch_size, num_workers, pin_memory, seed=0):
    """A loader of every kept row of dataset once, in order: validation, test and evaluate.py's passes."""
    return batch_loader(dataset, SequentialSampler(dataset), batch_size, num_workers, pin_memory, seed)


def generators(train_loader):
    """The torch.Generators behind the train loader's draws, by name (their states go into checkpoints)."""
    return {"sampler": train_loader.sampler.sampler.generator, "loader": train_loader.generator}


class ResidentBatches:
    """A loader's batches gathered from its preloaded split (dataset.memory: on the training device, or in host RAM
    when the device is too small); pinned=True gathers into page-locked memory, for copies ahead to a GPU.

    The positions are the loader's own (the sampler's draw(), or every row in order), and each pass takes one
    number from its generator as a DataLoader pass does, so every path gives the same batches and a checkpoint
    resumes on any of them. Rows are gathered as 8-byte words: a uint8 gather moves one byte per thread on a GPU."""

    def __init__(self, loader, pinned=False):
        self.dataset, self.sampler, self.generator = loader.dataset, loader.sampler, loader.generator
        self.pinned = pinned
        memory = self.dataset.memory  # (N, H, W, C) uint8
        self.words = memory.view(len(memory), -1).view(torch.int64)  # (N, IMAGE_BYTES / 8)
        self.labels = torch.from_numpy(self.dataset.labels).to(memory.device)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        sampler, store = self.sampler.sampler, self.words.device
        order = sampler.draw() if isinstance(sampler, BalancedSampler) else torch.arange(len(sampler))
        if store.type == "cuda":
            order = order.pin_memory().to(store, non_blocking=True)  # no wait for the copy: no sync per pass
        for positions in order.split(self.sampler.batch_size):
            images = self.gather(self.words, positions).view(torch.uint8).view(-1, *pcam_files.IMAGE_SHAPE)
            yield images.permute(0, 3, 1, 2), self.gather(self.labels, positions)

    def gather(self, source, positions):
        """source's rows at positions, into page-locked memory when pinned (its copy to a GPU waits for nothing)."""
        rows = torch.empty(
            (len(positions), *source.shape[1:]), dtype=source.dtype, device=source.device, pin_memory=self.pinned
        )
        return torch.index_select(source, 0, positions, out=rows)


class PrefetchBatches:
    """Pinned host batches (a loader's, or ResidentBatches' from host memory) copied to a CUDA device on a side
    stream: the next one while this one trains."""

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


def channel_stats(dataset):
    """Per-channel mean and std (0..255 scale) over up to NORMALIZATION_SAMPLE evenly spaced training images."""
    positions = np.linspace(0, len(dataset) - 1, min(len(dataset), NORMALIZATION_SAMPLE)).astype(np.int64)
    total, total_sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    lowest, highest = torch.full((3,), 255, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)
    floats = None  # one float32 buffer (56 MiB) for every 512 images: each fresh one is paged in anew
    for start in range(0, len(positions), 512):
        images = dataset[positions[start : start + 512]][0]  # on the device that holds the split
        floats = torch.empty_like(images, dtype=torch.float32) if floats is None else floats
        chunk = floats[: len(images)].copy_(images)  # the layout images.float() would have
        total += chunk.sum(dim=(0, 2, 3)).double().cpu()
        total_sq += chunk.square_().sum(dim=(0, 2, 3)).double().cpu()
        lowest = torch.minimum(lowest, images.amin(dim=(0, 2, 3)).cpu())
        highest = torch.maximum(highest, images.amax(dim=(0, 2, 3)).cpu())
    count = len(positions) * 96 * 96
    mean = total / count
    if (lowest == highest).any():  # a blank split (a file of zeros, say): a std of 0 would blow other pixels up
        raise UserError(
            f"the training split is blank: a channel has one value in every pixel of {len(positions):,} sampled images "
            f"(R, G, B from {lowest.tolist()} to {highest.tolist()}); check it with `python eda.py`, then download or "
            "copy it again"
        )
    return mean.float(), (total_sq / count - mean**2).clamp_min(1e-6).sqrt().float()


def device_room(device):
    """(free bytes, which limit) for the splits held on device: on the CPU this process's memory (free_memory), on
    CUDA the device's, with this process's cached blocks released first. Loading streams block by block, so the
    host needs room for a block, not for the splits."""
    if device.type != "cuda":
        return free_memory()
    torch.cuda.empty_cache()  # cached blocks count as used in mem_get_info, yet are ours to reuse
    return torch.cuda.mem_get_info(device)[0], f"{device} memory"


def choose_data_path(data_dir, data_on_device, dry_run, device):
    """(path, why) for --data-on-device: "device" when the uint8 train and valid splits fit the training device's
    memory, else "host" when they fit this process's RAM (a GPU smaller than the data; auto only), else "files"."""
    if data_on_device == "no":
        return "files", "--data-on-device no"
    if dry_run and data_on_device == "auto":
        return "files", "--dry-run reads one batch of each split"
    label_paths = (pcam_files.require_split(data_dir, split)[1] for split in ("train", "valid"))
    needed = sum(len(pcam_files.read_labels(path)) for path in label_paths) * IMAGE_BYTES
    rooms, host = [("device", *device_room(device))], free_memory()
    if data_on_device == "auto" and host[1] != rooms[0][2]:  # on the CPU the device's memory is the host's
        rooms.append(("host", *host))
    verdicts = []
    for path, free, which in rooms:
        fits = needed <= RESIDENT_SHARE * free
        verdicts.append(
            f"{'within' if fits else 'over'} {RESIDENT_SHARE:.0%} of {free / 2**30:.2f} GiB free under {which}"
        )
        reason = f"uint8 train+valid {needed / 2**30:.2f} GiB {'; '.join(verdicts)}, {device.type}"
        if fits:
            return path, reason
    if data_on_device == "yes":
        raise UserError(f"--data-on-device yes: {reason}; use --data-on-device auto (host memory) or no (the files)")
    return "files", reason


def training_batches(args, device):
    """(train, valid) batches for train.py's settings on device, by choose_data_path: gathered from splits held on
    the device, or held in host memory and copied ahead to the GPU, or streamed by the loaders (on CUDA also copied
    ahead, on a side stream)."""
    path, reason = choose_data_path(args.data_dir, args.data_on_device, args.dry_run, device)
    log(f"data path: {path} ({reason})")  # before the passes that load or filter the splits
    store = {"device": device, "host": torch.device("cpu"), "files": None}[path]
    pinned = device.type == "cuda" and path != "device"
    loaders = get_dataloaders(
        args.data_dir, args.batch_size, args.num_workers, args.filter_data, args.seed, store, pinned
    )
    describe_splits(*(loader.dataset for loader in loaders))
    batches = [ResidentBatches(loader, pinned) for loader in loaders] if store else loaders
    if pinned:
        return tuple(PrefetchBatches(source, device) for source in batches)
    return tuple(batches)


def describe_splits(train_set, val_set):
    for name, dataset in (("train", train_set), ("valid", val_set)):
        counts = np.bincount(dataset.labels, minlength=2)
        log(
            f"{name}: {len(dataset):,} images kept, class 0 {counts[0]:,} / class 1 {counts[1]:,} "
            f"({100 * counts[1] / counts.sum():.1f}% positive)"
        )
    counts = np.bincount(train_set.labels, minlength=2)
    if counts.min() < max(TINY_CLASS_IMAGES, TINY_CLASS_SHARE * counts.sum()):
        log(
            f"train.py: warning: the training split's minority class is tiny (class {counts.argmin()}: "
            f"{counts.min():,} of {counts.sum():,} kept images); the balanced sampler repeats those few images, "
            "expect a model that does not generalise",
            sys.stderr,
        )
