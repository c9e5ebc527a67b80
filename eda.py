"""Look at a PCAM folder before training on it: `python eda.py --data-dir DIR [--out-dir runs/eda]`.

One streaming pass over each split's x file (pcam_files.iter_raw_blocks, the filter's block reader) counts
the stored defects exactly: NaN-bearing images, values outside 0..255, black and white tiles by the
filter's thresholds. It also measures per-image mean intensity, per-channel mean and std and the
class counts as stored in y (not as the balanced sampler draws them); per-channel statistics come
from up to HISTOGRAM_IMAGES evenly spread images per class. Then it draws four PNGs:
pcam.png (the intensity outliers figure), class_balance.png, sample_grid.png, channel_histograms.png.
"""

import math
import os
import sys

import matplotlib
import numpy as np
import torch

import common
import data
import pcam_files
from common import log

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SUB_BLOCK_BYTES = 8 * 2**20  # the checks run over sub-blocks this size, so their passes hit the CPU cache
HISTOGRAM_IMAGES = 256  # per class, evenly spread over the file: channel histograms, mean and std
OUTLIER_KINDS = ("black", "white", "nan", "out_of_range")
FIGURES = ("pcam.png", "class_balance.png", "sample_grid.png", "channel_histograms.png")
SOFTWARE = "pcam-mlp eda.py"  # the PNG text that marks a figure as this script's to redraw


class SplitScan:
    """Exact counts of one split, gathered block by block, and the sampled images' histograms."""

    def __init__(self, split, labels, sample_grid, black_threshold, white_threshold):
        self.split, self.labels = split, labels
        self.black_threshold, self.white_threshold = black_threshold, white_threshold
        self.means = np.empty(len(labels), dtype=np.float32)
        self.flags = {kind: np.zeros(len(labels), dtype=bool) for kind in OUTLIER_KINDS}
        self.histograms = np.zeros((2, 3, 256), dtype=np.int64)  # class, channel, value
        rng = np.random.default_rng(0)
        self.grid_rows = np.zeros(len(labels), dtype=bool)
        self.histogram_rows = np.zeros(len(labels), dtype=bool)
        for label in (0, 1):
            rows = np.flatnonzero(labels == label)
            self.grid_rows[rng.permutation(rows)[:sample_grid]] = True
            spread = np.linspace(0, len(rows) - 1, min(len(rows), HISTOGRAM_IMAGES)).round().astype(int)
            self.histogram_rows[rows[spread]] = True
        self.samples = {0: [], 1: []}
        self.outlier_examples = dict.fromkeys(OUTLIER_KINDS)

    def add(self, start, raw):
        """Measure one raw block (read-only)."""
        step = max(1, SUB_BLOCK_BYTES // (pcam_files.IMAGE_BYTES * raw.dtype.itemsize))
        for offset in range(0, len(raw), step):
            self.add_sub_block(start + offset, raw[offset : offset + step])

    def add_sub_block(self, start, raw):
        stop = start + len(raw)
        suspect = None
        if raw.dtype != np.uint8:
            suspect = data.suspect_rows(raw)  # NaN or out-of-range pixels can only be in these rows
            if suspect.any():
                pixels = torch.from_numpy(raw[suspect].astype(np.float32, copy=False)).view(int(suspect.sum()), -1)
                rows = start + np.flatnonzero(suspect)
                self.flags["nan"][rows] = pixels.isnan().any(dim=1).numpy()
                finite = pixels.nan_to_num(nan=128.0)  # an in-range stand-in: only real pixels count
                out_of_range = (finite.amax(dim=1) > 255) | (finite.amin(dim=1) < 0)
                self.flags["out_of_range"][rows] = out_of_range.numpy()
        self.means[start:stop] = data.tile_means(raw, self.black_threshold, self.white_threshold, suspect)
        self.flags["black"][start:stop] = self.means[start:stop] <= self.black_threshold
        self.flags["white"][start:stop] = self.means[start:stop] >= self.white_threshold
        self.keep_examples(start, raw)

    def keep_examples(self, start, raw):
        """Histogram images, grid samples and the first outlier of each kind, cleaned, as they pass by."""
        stop = start + len(raw)
        rows = np.flatnonzero(self.histogram_rows[start:stop])
        if len(rows):
            cleaned = data.clean(raw[rows], scratch=True)
            for label in (0, 1):
                of_class = cleaned[self.labels[start + rows] == label]
                for channel in range(3):
                    self.histograms[label, channel] += np.bincount(of_class[..., channel].ravel(), minlength=256)
        for row in np.flatnonzero(self.grid_rows[start:stop]):
            self.samples[self.labels[start + row]].append(data.clean(raw[row]).copy())
        for kind, flags in self.flags.items():
            flagged = np.flatnonzero(flags[start:stop])
            if self.outlier_examples[kind] is None and len(flagged):
                self.outlier_examples[kind] = data.clean(raw[flagged[0]]).copy()

    def summary(self):
        """Exact counts; per-channel mean and std over the histogram images (up to HISTOGRAM_IMAGES a class)."""
        pixels = self.histograms.sum(axis=0)  # channel, value
        values = np.arange(256)
        mean = (pixels * values).sum(axis=1) / pixels.sum(axis=1)
        std = np.sqrt(np.maximum((pixels * values**2).sum(axis=1) / pixels.sum(axis=1) - mean**2, 0))
        return {
            "rows": len(self.labels),
            "class_0": int((self.labels == 0).sum()),
            "class_1": int(self.labels.sum()),
            **{kind: int(self.flags[kind].sum()) for kind in ("nan", "out_of_range", "black", "white")},  # table order
            "mean": mean.tolist(),
            "std": std.tolist(),
        }


def scan_split(data_dir, split, sample_grid, black_threshold, white_threshold):
    x_path, y_path = pcam_files.require_split(data_dir, split)
    labels = pcam_files.read_split_labels(x_path, y_path)
    pcam_files.check_pixel_scale(x_path)  # a file on another scale would read as all white, or all black
    scan = SplitScan(split, labels, sample_grid, black_threshold, white_threshold)
    for start, block in pcam_files.iter_raw_blocks(x_path, f"scan {split}"):
        if start == 0 and np.issubdtype(block.dtype, np.integer) and block.dtype != np.uint8:
            log(
                f"note: {x_path} holds {block.dtype} pixels, taken on the 0..255 scale as train.py takes them "
                "(values outside it count as 0 or 255)"
            )
        scan.add(start, block)
    return scan


def print_table(scans):
    print(
        f"{'split':<6} {'rows':>8} {'class 0':>8} {'class 1':>8} {'NaN':>6} {'<0|>255':>8} {'black':>6} {'white':>6}"
        f"   channel mean (R, G, B)   channel std (R, G, B) of <= {2 * HISTOGRAM_IMAGES:,} images"
    )
    for scan in scans:
        s = scan.summary()
        print(
            f"{scan.split:<6} {s['rows']:>8} {s['class_0']:>8} {s['class_1']:>8} {s['nan']:>6} {s['out_of_range']:>8} "
            f"{s['black']:>6} {s['white']:>6}   {' '.join(f'{v:6.1f}' for v in s['mean'])}"
            f"       {' '.join(f'{v:5.1f}' for v in s['std'])}"
        )


def plot_intensity_outliers(scans, path):
    figure, axes = plt.subplots(figsize=(8, 4.5))
    bins = np.linspace(0, 255, 103)
    for index, scan in enumerate(scans):
        s = scan.summary()
        label = f"{scan.split}: {s['rows']:,} tiles, {s['black']:,} black, {s['white']:,} white"
        axes.hist(scan.means, bins=bins, histtype="step", linewidth=1.5, color=f"C{index}", label=label)
    axes.set_yscale("log")
    black, white = scans[0].black_threshold, scans[0].white_threshold
    for threshold, kind, sign, align, shift in ((black, "black", "≤", "left", 4), (white, "white", "≥", "right", -4)):
        axes.axvline(threshold, color="k", linestyle="--", linewidth=1)
        total = sum(scan.summary()[kind] for scan in scans)
        axes.annotate(
            f"{kind} {sign} {threshold:g}: {total:,}",
            xy=(threshold, 0.92),
            xycoords=("data", "axes fraction"),
            ha=align,
            xytext=(shift, 0),
            textcoords="offset points",
            fontsize=9,
        )
    axes.set(
        title="PCAM intensity outliers: mean intensity per tile",
        xlabel="mean intensity of the cleaned tile (0-255)",
        ylabel="tiles (log scale)",
        xlim=(0, 255),
    )
    axes.legend(fontsize="small", loc="upper center")
    save(figure, path)


def plot_class_balance(scans, path):
    figure, axes = plt.subplots(figsize=(6, 4))
    positions = np.arange(len(scans))
    for offset, label, key in ((-0.2, "class 0 (no tumour)", "class_0"), (0.2, "class 1 (tumour)", "class_1")):
        counts = [scan.summary()[key] for scan in scans]
        bars = axes.bar(positions + offset, counts, width=0.4, label=label)
        axes.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=8)
    axes.set_xticks(positions, [scan.split for scan in scans])
    axes.set(title="Class balance as stored", ylabel="images")
    axes.legend(fontsize="small")
    save(figure, path)


def plot_sample_grid(scan, path):
    outliers = [(kind, image) for kind, image in scan.outlier_examples.items() if image is not None]
    columns = max(len(scan.samples[0]), len(scan.samples[1]), len(outliers), 1)
    rows = [(f"class {label}", [(None, image) for image in scan.samples[label]]) for label in (0, 1)]
    if outliers:
        rows.append(("outliers", outliers))
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.8 * len(rows)), squeeze=False)
    for row_index, (name, images) in enumerate(rows):
        for column in range(columns):
            ax = axes[row_index, column]
            ax.set(xticks=[], yticks=[])
            if column >= len(images):
                ax.axis("off")
            else:
                kind, image = images[column]
                ax.imshow(image)
                ax.set_title(kind.replace("_", " ") if kind else (name if column == 0 else ""), fontsize=8)
    figure.suptitle(f"{scan.split}: sample patches per class, and flagged outliers")
    save(figure, path)


def plot_channel_histograms(scan, path):
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    for channel, (ax, name) in enumerate(zip(axes, ("red", "green", "blue"), strict=True)):
        for label, style in ((0, "-"), (1, "--")):
            counts = scan.histograms[label, channel]
            ax.plot(np.arange(256), counts / max(counts.sum(), 1), style, color=name, label=f"class {label}")
        ax.set(title=f"{name} channel", xlabel="intensity")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("fraction of pixels")
    figure.suptitle(f"{scan.split}: per-channel intensity by class ({HISTOGRAM_IMAGES:,} images per class at most)")
    save(figure, path)


def save(figure, path):
    common.save_figure(figure, path, SOFTWARE, dpi=110)
    log(f"wrote {path}")


def parse_args(argv=None):
    parser = common.ArgumentParser(description="Exploratory analysis of PCAM files: exact defect counts and figures.")
    common.add_data_dir_argument(parser)
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=pcam_files.SPLITS,
        default=list(pcam_files.SPLITS),
        metavar="SPLIT",
        help="splits to scan; a missing one is skipped with a note while others are present",
    )
    common.add_out_dir_argument(parser, "where the PNGs go", default=os.path.join("runs", "eda"))
    parser.add_argument(
        "--force", action="store_true", help="replace PNGs in --out-dir that eda.py did not write (never a data file)"
    )
    parser.add_argument(
        "--sample-grid", type=int, default=8, metavar="N", help="sample patches per class in the grid, 1 to 64"
    )
    for colour, default, side in (("black", data.BLACK_THRESHOLD, "below"), ("white", data.WHITE_THRESHOLD, "above")):
        parser.add_argument(
            f"--{colour}-threshold",
            type=float,
            default=default,
            metavar="T",
            help=f"tiles with a mean at or {side} this are {colour} (as the filter)",
        )
    args = parser.parse_args(argv)
    if not 1 <= args.sample_grid <= 64:
        sys.exit(f"eda.py: error: --sample-grid {args.sample_grid}: give 1 to 64 patches per class (one figure row)")
    for name, value in (("--black-threshold", args.black_threshold), ("--white-threshold", args.white_threshold)):
        if not (math.isfinite(value) and 0 <= value <= 255):
            sys.exit(f"eda.py: error: {name} {value:g} is not a mean intensity: give a number from 0 to 255")
    if args.black_threshold >= args.white_threshold:
        sys.exit("eda.py: error: --black-threshold must be below --white-threshold: black tiles are the dark ones")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.run_command("eda.py", run, args, folder=args.out_dir)


def run(args):
    present = [s for s in dict.fromkeys(args.splits) if s in pcam_files.present_splits(args.data_dir)]
    for split in dict.fromkeys(args.splits):  # each split once, as given
        if split not in present:
            log(f"note: {split} split not in {args.data_dir}, skipped")
    if not present:
        pcam_files.require_split(args.data_dir, args.splits[0])  # raises the missing-files message
    for split in present:  # every split and output is checked before the first scan
        pcam_files.split_labels(args.data_dir, split)
    common.check_output_folder(args.out_dir, "--out-dir")
    for name in FIGURES:
        common.check_output(os.path.join(args.out_dir, name), common.written_by(SOFTWARE), args.force)
    scans = []
    for split in present:
        log(f"scanning {split} ...")
        scans.append(scan_split(args.data_dir, split, args.sample_grid, args.black_threshold, args.white_threshold))
    os.makedirs(args.out_dir, exist_ok=True)
    print_table(scans)
    outliers, balance, grid, histograms = (os.path.join(args.out_dir, name) for name in FIGURES)
    plot_intensity_outliers(scans, outliers)
    plot_class_balance(scans, balance)
    plot_sample_grid(scans[0], grid)
    plot_channel_histograms(scans[0], histograms)


if __name__ == "__main__":
    main()
