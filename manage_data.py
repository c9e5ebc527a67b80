"""PCAM data folders from the command line: download, synth, prepare, info, manifest, verify, env.

`python manage_data.py COMMAND -h` for each. Reading and checking the files is in pcam_files.py, cleaning and
the loaders in data.py; the manifest these commands write is checked by pcam_files.check_manifest."""

import errno
import gzip
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import h5py
import numpy as np
import torch

import common
import data
import pcam_files
from common import UserError, file_digest, log
from data import clean
from pcam_files import PREPARED_NAME, SPLITS, SYNTH_NAME, split_paths

LOCK_NAME = "pcam.lock"  # synth, prepare and download hold it with flock while they write the folder

ZENODO_URL = "https://zenodo.org/records/2546921/files"
ZENODO_MD5 = {  # md5 of the .h5.gz files as served by Zenodo record 2546921
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
}


def lock_folder(folder):
    """hold_lock on a data folder: one writer at a time, so two sets or two sources never mix in one folder."""
    common.check_output_folder(folder, "--data-dir")
    os.makedirs(folder, exist_ok=True)
    in_use = f"{folder} is being written by another command ({{holder}}); wait for it to end, or choose another folder"
    return common.hold_lock(os.path.join(folder, LOCK_NAME), in_use)


def is_synthetic(x_path):
    """Whether an x file was written by `manage_data.py synth` (it marks its files)."""
    if not os.path.exists(x_path):
        return False
    with pcam_files.open_h5(x_path) as h5file:  # damaged, locked or not HDF5: a line saying so
        return bool(h5file.attrs.get("synthetic", False))


def synth_images(rng, labels):
    """Learnable stand-ins for PCAM patches: pink tissue noise with a faint darker blob, in the central
    32x32 region (where PCAM's label is defined) for positives and in the periphery for negatives.
    One label in twenty is flipped, so the validation loss falls over epochs instead of hitting zero."""
    n = len(labels)
    tissue = np.array([205, 150, 190], dtype=np.int16)
    images = tissue + rng.integers(-60, 61, size=(n, 96, 96, 3), dtype=np.int16)
    shown = labels ^ (rng.random(n) < 0.05)
    centre = rng.uniform(36, 60, size=(n, 2))
    periphery = rng.uniform(6, 30, size=(n, 2)) + rng.integers(0, 2, size=(n, 2)) * 60
    blob_yx = np.where(shown[:, None] == 1, centre, periphery)
    radius = rng.uniform(6, 12, size=n)
    yy, xx = np.mgrid[0:96, 0:96]
    inside = (yy - blob_yx[:, 0, None, None]) ** 2 + (xx - blob_yx[:, 1, None, None]) ** 2 < radius[:, None, None] ** 2
    images[inside] -= np.array([45, 45, 15], dtype=np.int16)
    return np.clip(images, 0, 255)


def poison(images, rng, fraction, dtype):
    """Put the course copy's defects into a block in place; returns the count of each defect."""
    kinds = ("black", "white", "nan", "1e5") if dtype != np.uint8 else ("black", "white")
    rows = rng.choice(len(images), size=round(fraction * len(images)), replace=False)
    counts = dict.fromkeys(kinds, 0)
    for i, row in enumerate(rows):
        kind = kinds[i % len(kinds)]
        counts[kind] += 1
        if kind == "black":
            images[row] = 0
        elif kind == "white":
            images[row] = 255
        else:
            pixels = rng.integers(0, 96, size=(3, 2))
            images[row, pixels[:, 0], pixels[:, 1], rng.integers(0, 3, size=3)] = np.nan if kind == "nan" else 1e5
    return counts


def write_synth_split(data_dir, split, n, rng, fraction, dtype):
    x_path, y_path = split_paths(data_dir, split)
    labels = (rng.permutation(n) < round(0.4 * n)).astype(np.uint8)  # 40% positives, like a skewed copy
    counts = {}

    def write_x(path):
        with h5py.File(path, "w") as h5file:
            dset = h5file.create_dataset("x", shape=(n,) + pcam_files.IMAGE_SHAPE, dtype=dtype)
            step = 1024
            for start in range(0, n, step):
                block = synth_images(rng, labels[start : start + step]).astype(dtype)
                for kind, count in poison(block, rng, fraction, dtype).items():
                    counts[kind] = counts.get(kind, 0) + count
                dset[start : start + len(block)] = block
            dset.attrs.update({f"poison_{kind}": count for kind, count in counts.items()})
            h5file.attrs["synthetic"] = True  # synth --force may overwrite this file; it overwrites nothing else

    def write_y(path):
        with h5py.File(path, "w") as h5file:
            h5file.create_dataset("y", data=labels.reshape(n, 1, 1, 1))

    common.write_atomically(x_path, write_x)
    common.write_atomically(y_path, write_y)
    defects = ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "no defects"
    log(f"synth {split}: {n} images ({labels.sum()} positive), {np.dtype(dtype).name}, {defects} -> {x_path}")


def cmd_synth(args):
    check_synth_arguments(args)
    common.check_output_folder(args.data_dir, "--data-dir")  # a folder it cannot write is named before its room
    check_synth_room(args)
    with lock_folder(args.data_dir):
        existing = [p for s in SPLITS for p in split_paths(args.data_dir, s) if os.path.exists(p)]
        record_path = os.path.join(args.data_dir, SYNTH_NAME)
        interrupted = common.read_json(record_path).get("complete") is False  # its own half-written set
        if existing and not args.force and not interrupted:
            raise UserError(
                f"{args.data_dir} already holds PCAM split files ({os.path.basename(existing[0])}, ...); "
                "synth writes only into a folder without them: choose another --data-dir, or add --force "
                "to overwrite a synthetic set"
            )
        real = [p for p in existing if p.endswith("_x.h5") and not is_synthetic(p)]
        if real:
            raise UserError(
                f"{real[0]} was not written by manage_data.py synth; --force overwrites synthetic sets only: "
                "choose another --data-dir"
            )
        if existing and interrupted:
            log(f"synth: {args.data_dir} holds the half-written set of an interrupted synth; writing it anew")
        common.write_json({"complete": False}, record_path)
        rng = np.random.default_rng(args.seed)
        for split, n in (("train", args.n_train), ("valid", args.n_valid), ("test", args.n_test)):
            if n > 0:
                write_synth_split(args.data_dir, split, n, rng, args.poison, np.dtype(args.dtype))
            elif is_synthetic(split_paths(args.data_dir, split)[0]):  # it belongs to the set this one replaces
                for path in split_paths(args.data_dir, split):
                    if os.path.exists(path):
                        os.remove(path)
                log(f"synth {split}: the earlier synthetic {split} split is removed (--n-{split} 0)")
        settings = {name: getattr(args, name) for name in ("n_train", "n_valid", "n_test", "poison", "dtype", "seed")}
        common.write_json({"complete": True, **settings}, record_path)


def source_identity(paths):
    """What tells a source file apart from another, cheaply: its path, size and mtime."""
    return [
        {"path": os.path.abspath(p), "bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns} for p in paths
    ]


def prepared_copy_is_current(out_dir, split, sources):
    """True when out_dir holds split's copy of exactly these sources; False when it holds nothing of the split
    (or a copy of an earlier version of the same files, to rebuild). A copy of other files, or split files
    prepare did not write, are refused: prepare never replaces what it cannot recreate."""
    if not any(os.path.exists(p) for p in split_paths(out_dir, split)):
        return False
    recorded = common.read_json(os.path.join(out_dir, PREPARED_NAME)).get(split)
    if recorded is None:
        raise UserError(
            f"{out_dir} already holds {split} split files that prepare did not write; choose an empty --out folder"
        )
    if recorded == source_identity(sources):
        return True
    recorded_paths = [entry["path"] for entry in recorded]  # none: an earlier prepare stopped while writing
    if recorded_paths and recorded_paths != [os.path.abspath(p) for p in sources]:
        raise UserError(
            f"{out_dir} holds a prepared copy of {recorded[0]['path']}, not of "
            f"{os.path.abspath(sources[0])}; choose another --out folder"
        )
    return False


def record_prepared(out_dir, split, sources):
    record = {**common.read_json(os.path.join(out_dir, PREPARED_NAME)), split: source_identity(sources)}
    common.write_json(record, os.path.join(out_dir, PREPARED_NAME))


def prepare_split(data_dir, out_dir, split):
    x_src, y_src = pcam_files.require_split(data_dir, split)
    x_out, y_out = split_paths(out_dir, split)
    labels = pcam_files.read_split_labels(x_src, y_src)
    pcam_files.check_pixel_scale(x_src)
    if prepared_copy_is_current(out_dir, split, (x_src, y_src)):
        log(f"prepare {split}: {x_out} is already a prepared copy of {x_src}, kept")
        return

    def write_x(path):
        with h5py.File(path, "w") as h5file:
            dset = h5file.create_dataset("x", shape=(len(labels),) + pcam_files.IMAGE_SHAPE, dtype=np.uint8)
            for start, block in pcam_files.iter_raw_blocks(x_src, f"prepare {split}"):
                dset[start : start + len(block)] = clean(block, scratch=True)

    def write_y(path):
        with h5py.File(path, "w") as h5file:
            h5file.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1))

    record_prepared(out_dir, split, ())  # while the files change, the record names no source
    common.write_atomically(x_out, write_x)
    common.write_atomically(y_out, write_y)
    record_prepared(out_dir, split, (x_src, y_src))
    log(f"prepare {split}: wrote {x_out} ({os.path.getsize(x_out) / 2**20:.0f} MiB, uint8, contiguous)")


def cmd_prepare(args):
    if os.path.realpath(args.out) == os.path.realpath(args.data_dir):
        raise UserError("--out must differ from --data-dir: prepare writes a cleaned copy beside the original")
    common.check_output_folder(args.out, "--out")
    pcam_files.check_manifest(args.data_dir)  # a copy of changed files would train with no check left to fail
    splits = pcam_files.present_splits(args.data_dir)
    for split in splits:  # an empty split is refused before anything is copied
        pcam_files.split_labels(args.data_dir, split)
    with lock_folder(args.out):
        for split in splits:
            prepare_split(args.data_dir, args.out, split)


def cmd_info(args):
    row = "{:<6} {:>8} {:>8} {:>16} {:>22} {:>8} {:>8} {:>8}"
    log(row.format("split", "rows", "dtype", "shape", "layout", "MiB", "class 0", "class 1"))
    for split in pcam_files.present_splits(args.data_dir):
        x_path, y_path = split_paths(args.data_dir, split)
        labels = pcam_files.split_labels(args.data_dir, split)
        with pcam_files.open_h5(x_path) as h5file:
            dset = h5file["x"]
            layout = "contiguous" if dset.chunks is None else f"chunks {dset.chunks[0]}"
            if dset.compression:
                layout += f", {dset.compression}"
            shape, dtype = str(tuple(dset.shape[1:])), dset.dtype.name
        mib = (os.path.getsize(x_path) + os.path.getsize(y_path)) / 2**20
        log(row.format(split, len(labels), dtype, shape, layout, f"{mib:.1f}", *np.bincount(labels, minlength=2)))


def is_manifest(path):
    """Whether path holds what cmd_manifest writes: a JSON object with "files" and nothing else."""
    manifest = common.read_json(path)
    return list(manifest) == ["files"] and isinstance(manifest["files"], dict)


def cmd_manifest(args):
    manifest_path = args.manifest or os.path.join(args.data_dir, pcam_files.MANIFEST_NAME)
    common.check_output(manifest_path, is_manifest, args.force)
    folder = os.path.dirname(os.path.abspath(manifest_path))
    if not os.path.isdir(folder):
        raise UserError(f"--manifest {manifest_path}: {folder}: No such file or directory; create it or choose another")
    common.check_output_folder(folder, "--manifest")
    files = {}
    for path in sorted(p for s in pcam_files.present_splits(args.data_dir) for p in split_paths(args.data_dir, s)):
        stat, digest = os.stat(path), file_digest(path, show_progress=True)
        files[os.path.basename(path)] = {"bytes": stat.st_size, "mtime": stat.st_mtime, "sha256": digest}
    common.write_json({"files": files}, manifest_path)
    log(f"manifest: {len(files)} files -> {manifest_path}")


def cmd_verify(args):
    manifest_path = args.manifest or os.path.join(args.data_dir, pcam_files.MANIFEST_NAME)
    expected = pcam_files.read_manifest(manifest_path, args.data_dir)
    differing = []
    for name, record in sorted(expected.items()):
        path = os.path.join(args.data_dir, name)
        if not os.path.isfile(path):
            differing.append(f"{name} (missing)")
        elif os.path.getsize(path) != record["bytes"] or file_digest(path, show_progress=True) != record["sha256"]:
            differing.append(f"{name} (contents differ)")
        else:
            log(f"verify: {name} ok")
    unlisted = pcam_files.unlisted_split_files(args.data_dir, expected)
    if differing:
        listing = ", ".join(differing + unlisted)
        raise UserError(f"{len(differing)} of {len(expected)} files differ from {manifest_path}: {listing}")
    if unlisted:
        raise UserError(
            f"the {len(expected)} files {manifest_path} lists match, but it does not vouch for {', '.join(unlisted)}; "
            f"record every file as it is with `python manage_data.py manifest --data-dir {args.data_dir}`"
        )
    log(f"verify: all {len(expected)} files match {manifest_path}")


LOCAL_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def bytes_in(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def fetch(url, part_path, attempts=5):
    """Download url into part_path, resuming from what is there (HTTP Range), retrying cut connections."""
    for attempt in range(1, attempts + 1):
        have = bytes_in(part_path)
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = response.status == 206
                total = have * resumed + (response.length or 0) or None  # length: Content-Length, None if unusable
                done, next_report, started = have * resumed, 0.0, time.time()
                log(
                    f"download {url}: {'resuming at' if resumed else 'starting'} {done / 2**20:.1f} MiB"
                    + (f" of {total / 2**20:.1f} MiB" if total else "")
                )
                with open(part_path, "ab" if resumed else "wb") as target:
                    while chunk := response.read(2**20):
                        target.write(chunk)
                        done += len(chunk)
                        if total and done / total >= next_report:
                            rate = (done - have * resumed) / max(time.time() - started, 1e-9) / 2**20
                            log(f"download {os.path.basename(part_path)}: {100 * done // total}%, {rate:.1f} MiB/s")
                            next_report += 0.05
                if total and done < total:
                    raise ConnectionError(f"connection closed at {done} of {total} bytes")
                return
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # the part file is already complete
                return
            raise UserError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:  # cut or refused connections, garbled or cut replies
            if getattr(error, "errno", None) in LOCAL_WRITE_ERRORS and not isinstance(error, urllib.error.URLError):
                raise UserError(f"cannot write {part_path}: {error.strerror}; retrying cannot help") from None
            if attempt == attempts:
                then = "to resume" if bytes_in(part_path) else "once the network or --base-url is right"
                raise UserError(
                    f"download of {url} failed after {attempts} attempts ({failure(error)}); run the same command "
                    f"again {then}"
                ) from None
            next_try = f"resuming at {bytes_in(part_path) / 2**20:.1f} MiB" if bytes_in(part_path) else "retrying"
            log(f"download interrupted ({failure(error)}); {next_try} (attempt {attempt + 1} of {attempts})")
            time.sleep(min(2**attempt, 30) * float(os.environ.get("PCAM_RETRY_DELAY_SCALE", "1")))


def read_checksums(path):
    """md5sum-style file ("<md5>  <name>" per line) -> {name: md5}."""
    try:
        with open(path) as source:
            return {
                os.path.basename(name.strip().lstrip("*")): md5.lower()
                for md5, name in (line.split(None, 1) for line in source if line.strip())
            }
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read checksums file {path} ({error}); expected '<md5>  <file name>' lines") from None


def failure(error):
    """A failed attempt in one line. A reply that is not HTTP (another service on that port) raises BadStatusLine with
    its first line as the message; a connection closed before any reply is a BadStatusLine too."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, http.client.BadStatusLine) and not isinstance(error, ConnectionError):
        return f"the reply is not HTTP: {text!r}; is the port or the scheme wrong?"
    return text


def check_base_url(url):
    """One line, before any attempt, for a --base-url no request can be made to (retries would not help): the files'
    names and ?download=1 are appended to it, so it is a folder's URL, with no query, fragment or user name."""
    try:
        parts = urllib.parse.urlsplit(url)
        usable = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0
        usable = usable and not (parts.username or parts.query or parts.fragment or "%" in parts.hostname)
    except ValueError:  # a port that is not a number, an unclosed [IPv6 address
        usable = False
    if not usable or re.search(r"[^\x21-\x7e]", url):  # http.client sends only printable ASCII, no spaces
        raise UserError(
            f"--base-url {url!r} is not an http:// or https:// URL of a folder (a host, a port if any as a number; "
            "no user name, query or fragment; only printable ASCII, no spaces): give the full URL"
        )


def cmd_download(args):
    check_base_url(args.base_url)
    checksums = read_checksums(args.checksums) if args.checksums else ZENODO_MD5
    missing = [path for split in args.splits for path in split_paths(args.data_dir, split) if not os.path.isfile(path)]
    unlisted = [os.path.basename(path) + ".gz" for path in missing if os.path.basename(path) + ".gz" not in checksums]
    if unlisted:
        raise UserError(
            f"no checksum for {', '.join(unlisted)} in {args.checksums}: add them, or leave --checksums (and "
            "$PCAM_CHECKSUMS) out"
        )
    with lock_folder(args.data_dir):
        for split in args.splits:
            for h5_path in split_paths(args.data_dir, split):
                if os.path.isfile(h5_path):
                    log(f"download: {h5_path} already present, skipped")
                    continue
                download_file(args, checksums, h5_path)


def download_file(args, checksums, h5_path):
    """Fetch one .h5.gz (unless it is there), check its md5, unpack it. A fetched archive keeps its .part name until
    it is unpacked, then goes (a run stopped while unpacking leaves a .part the next run finds complete); so it goes
    when it turns out corrupt. An archive that was there already is checked and kept."""
    gz_name = os.path.basename(h5_path) + ".gz"
    gz_path = h5_path + ".gz"
    fetched = not os.path.isfile(gz_path)
    archive = h5_path + ".gz.part" if fetched else gz_path
    complete = fetched and os.path.isfile(archive) and file_digest(archive, "md5") == checksums[gz_name]
    if fetched and not complete:  # complete: fetched whole by a run stopped while unpacking
        fetch(f"{args.base_url.rstrip('/')}/{gz_name}?download=1", archive)
        if file_digest(archive, "md5") != checksums[gz_name]:
            os.remove(archive)
            raise UserError(
                f"{gz_name}: md5 does not match {checksums[gz_name]}; the corrupt download "
                "was deleted, run the same command again to fetch it anew"
            )
    elif not fetched and file_digest(gz_path, "md5") != checksums[gz_name]:
        raise UserError(
            f"{gz_path} was already there and its md5 does not match {checksums[gz_name]}; it is kept: "
            "move it away and run the same command again to fetch it anew"
        )
    log(f"download: {gz_name} md5 ok, unpacking")

    def unpack(path):
        try:
            with gzip.open(archive, "rb") as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target, 16 * 2**20)
        except (EOFError, gzip.BadGzipFile, zlib.error):  # cut short, not gzip at all, or damaged inside
            if not fetched:
                raise UserError(f"corrupt archive {gz_path} (it was already there, kept): move it away") from None
            os.remove(archive)
            raise UserError(f"corrupt archive {gz_name}, deleted: it is downloaded again next time") from None

    common.write_atomically(h5_path, unpack)
    if fetched:
        os.remove(archive)
    log(f"download: {h5_path} ready ({os.path.getsize(h5_path) / 2**20:.0f} MiB)")


def cmd_env(args):
    """The course's verification step: the software stack, the accelerator, and the data files."""
    log(f"python {sys.version.split()[0]} ({sys.executable})")
    log(f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        log(f"CUDA available: yes, {torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}")
    else:
        log(f"CUDA available: no: {common.cuda_diagnosis()}")
    log(f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), numpy {np.__version__}")
    for split in SPLITS:
        paths = split_paths(args.data_dir, split)
        missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
        if missing:
            log(f"data {split}: missing {', '.join(missing)}")
        else:
            sizes = ", ".join(f"{os.path.basename(p)} {os.path.getsize(p) / 2**20:,.0f} MiB" for p in paths)
            log(f"data {split}: {sizes}")
    for split in ("train", "valid"):
        pcam_files.require_split(args.data_dir, split)
    log(f"ok: {args.data_dir} holds the train and valid splits")


def parse_args(argv=None):
    parser = common.ArgumentParser(description="PCAM data: fetch, make, clean, inspect and version the HDF5 files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=run)
        common.add_data_dir_argument(sub)
        return sub

    download = command("download", cmd_download, "fetch the official PCAM files (about 7 GB), verify their md5, unpack")
    add_download_arguments(download)
    synth = command("synth", cmd_synth, "write a small synthetic PCAM-format set whose classes are learnable")
    add_synth_arguments(synth)
    prepare = command("prepare", cmd_prepare, "write a cleaned, contiguous uint8 copy of every split present")
    prepare.add_argument(
        "--out",
        type=common.output_folder,
        required=True,
        metavar="DIR",
        help="folder for the prepared copy (e.g. node-local scratch)",
    )
    command("info", cmd_info, "print rows, dtype, layout, size and class balance per split")
    command("env", cmd_env, "check python, torch, CUDA and its device, h5py, and the PCAM files in the data dir")
    manifest = command("manifest", cmd_manifest, "write each PCAM file's size and sha256 to a manifest")
    verify = command("verify", cmd_verify, "check the PCAM files against a manifest and name each one that differs")
    for sub in (manifest, verify):
        sub.add_argument("--manifest", metavar="FILE", help=f"manifest path (default: DIR/{pcam_files.MANIFEST_NAME})")
    manifest.add_argument(
        "--force", action="store_true", help="replace a --manifest file that manifest did not write (never a data file)"
    )
    return parser.parse_args(argv)


def check_synth_arguments(args):
    for flag, count in (("--n-train", args.n_train), ("--n-valid", args.n_valid)):
        if count < 1:
            raise UserError(f"{flag} {count}: a split needs at least one image")
    if args.n_test < 0:
        raise UserError(f"--n-test {args.n_test}: give 0 (no test split) or more images")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: give 0 or more")
    if not 0 <= args.poison <= 1:
        raise UserError(f"--poison {args.poison:g}: give a fraction between 0 and 1")


def check_synth_room(args):
    """Refuse, before anything is written, a set the disk cannot hold or a split whose labels and draw order
    (9 bytes an image, the largest split at once) the memory cannot."""
    images = args.n_train + args.n_valid + args.n_test
    disk_bytes = images * (pcam_files.IMAGE_BYTES * np.dtype(args.dtype).itemsize + 1)
    nearest = common.nearest_folder(args.data_dir)
    free_disk = shutil.disk_usage(nearest).free
    memory_bytes, (free_memory, which) = 9 * max(args.n_train, args.n_valid, args.n_test), data.free_memory()
    for needed, free, where in (
        (disk_bytes, free_disk, f"on {nearest}"),
        (memory_bytes, free_memory, f"under {which}"),
    ):
        if needed > free:
            raise UserError(
                f"synth of {images:,} images needs {needed / 2**30:,.1f} GiB but {free / 2**30:,.1f} GiB is free "
                f"{where}; ask for fewer images (--n-train, --n-valid, --n-test)"
            )


def add_download_arguments(download):
    download.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), metavar="SPLIT", help="which splits to fetch"
    )
    download.add_argument(
        "--base-url",
        default=os.environ.get("PCAM_BASE_URL", ZENODO_URL),
        metavar="URL",
        help="where the .h5.gz files live ($PCAM_BASE_URL if set)",
    )
    download.add_argument(
        "--checksums",
        default=os.environ.get("PCAM_CHECKSUMS"),
        metavar="FILE",
        help="md5sum-style file of expected .gz checksums (default: $PCAM_CHECKSUMS or the published ones)",
    )


def add_synth_arguments(synth):
    synth.add_argument("--n-train", type=int, default=4096, metavar="N", help="train images")
    synth.add_argument("--n-valid", type=int, default=1024, metavar="N", help="valid images")
    synth.add_argument("--n-test", type=int, default=1024, metavar="N", help="test images; 0 for none")
    synth.add_argument(
        "--poison",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of images given the course copy's defects: black and white tiles, and "
        "with float storage NaN pixels and 1e5 pixels",
    )
    synth.add_argument(
        "--dtype",
        choices=("uint8", "float32"),
        default="uint8",
        help="stored pixel type: uint8 like the official files, float32 like the course copy",
    )
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    synth.add_argument(
        "--force",
        action="store_true",
        help="overwrite the synthetic set already in the folder (never files synth did not write)",
    )


def main(argv=None):
    args = parse_args(argv)
    common.run_command(f"manage_data.py {args.command}", args.run, args, folder=args.data_dir)


if __name__ == "__main__":
    main()
