"""The contracts that code outside this repo relies on (data.PCAMDataset and data.get_dataloaders, model.MLP:
their batches and shapes), and the repo's shape: flat modules whose imports point one way, files read in one
sitting. The rest of the suite is test_<area>.py beside it; fixtures are in conftest.py, helpers in
test_helpers.py. `make test-all` runs them all; `make test` leaves out the Slurm, download and slow tests."""

import ast
import multiprocessing
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import data
import pcam_files
from model import MLP
from test_helpers import (
    HERE,
    labels_of,
    tissue,
    write_split,
)


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

    def test_the_loaders_read_the_files_as_they_go_unless_asked_to_preload(self, small_set):
        file_bytes = os.path.getsize(pcam_files.split_paths(small_set, "train")[0])  # 5.5 MB of images
        for asked in ({}, {"preload": True}):  # the default, then preload
            tracemalloc.start()
            data.get_dataloaders(small_set, batch_size=32, **asked)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert (peak > file_bytes) == bool(asked), peak

    def test_the_loaders_defaults_are_batches_of_256_streamed_from_the_files(self, tmp_path):
        for split in ("train", "valid", "test"):
            write_split(tmp_path, split, tissue(257), labels_of(257, 100))
        loaders = (*data.get_dataloaders(tmp_path), data.get_test_loader(tmp_path))
        assert [[len(labels) for _, labels in loader] for loader in loaders] == [[256, 1]] * 3
        assert all(loader.dataset.memory is None for loader in loaders)
        assert data.load_split(tmp_path, "train").memory is None

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

    def test_resident_batches_draw_the_same_indices_as_the_loader(self, tmp_path):
        images = tissue(300, seed=3)
        images[[5, 77, 140]] = 0  # blackouts: the filter drops them, so positions and file rows differ
        write_split(tmp_path, "train", images, labels_of(300, 90))
        write_split(tmp_path, "valid", tissue(70, seed=4), labels_of(70, 30))
        loaders = data.get_dataloaders(tmp_path, batch_size=32, filter_data=True, seed=5, preload=True)
        streamed = data.get_dataloaders(tmp_path, batch_size=32, filter_data=True, seed=5)
        resident = [data.ResidentBatches(loader) for loader in loaders]
        for _ in range(2):  # two epochs: the sampler's generator carries on from one to the next
            for loader, gathered in zip(streamed, resident, strict=True):
                pairs = list(zip(loader, gathered, strict=True))
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
        assert torch.equal(
            data.generators(streamed[0])["sampler"].get_state(), data.generators(resident[0])["sampler"].get_state()
        )
        assert torch.equal(streamed[0].generator.get_state(), resident[0].generator.get_state())

    def test_a_split_loaded_onto_a_device_passes_through_host_memory_a_block_at_a_time(self, small_set, monkeypatch):
        file_bytes = os.path.getsize(pcam_files.split_paths(small_set, "train")[0])  # 200 images, 5.5 MB
        monkeypatch.setattr(pcam_files, "BLOCK_BYTES", 16 * pcam_files.IMAGE_BYTES)
        for store, whole_split_in_ram in ((torch.device("meta"), False), (True, True)):  # meta: not the CPU
            tracemalloc.start()
            dataset = data.load_split(small_set, "train", preload=store)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert dataset.memory.device.type == ("cpu" if store is True else "meta")
            assert dataset.memory.shape == (200, 96, 96, 3) and dataset.memory.dtype == torch.uint8
            assert (peak > file_bytes) == whole_split_in_ram, peak

    def test_the_balanced_draw_takes_each_class_half_the_time_and_its_rows_uniformly(self):
        labels = np.array([0] * 900 + [1] * 100)
        sampler = data.BalancedSampler(labels, seed=4)
        drawn = torch.cat([sampler.draw() for _ in range(40)]).numpy()  # 40,000 draws
        assert abs(labels[drawn].mean() - 0.5) < 0.015  # 3 sigma: 0.0075
        per_row = np.bincount(drawn, minlength=1000)  # about 200 each for the 100 positives, 22 for the negatives
        assert 140 < per_row[900:].min() and per_row[900:].max() < 260 and 0 < per_row[:900].min()
        assert per_row[:900].max() < 50
        assert torch.equal(data.BalancedSampler(labels, seed=4).draw(), data.BalancedSampler(labels, seed=4).draw())
        assert list(data.BalancedSampler(labels, seed=4)) == data.BalancedSampler(labels, seed=4).draw().tolist()

    def test_resident_batches_draw_a_pass_without_iterating_the_sampler(self, small_set, monkeypatch):
        loaders = data.get_dataloaders(small_set, batch_size=32, seed=2, preload=True)
        expected = [list(loader) for loader in data.get_dataloaders(small_set, batch_size=32, seed=2, preload=True)]
        resident = [data.ResidentBatches(loader) for loader in loaders]

        def listed(sampler):
            raise AssertionError(f"{type(sampler).__name__} iterated in Python, an int at a time")

        for sampler_class in (data.BalancedSampler, torch.utils.data.SequentialSampler):
            monkeypatch.setattr(sampler_class, "__iter__", listed)
        for gathered, batches in zip(resident, expected, strict=True):
            assert all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(gathered, batches, strict=True)
            )

    def test_resident_batches_gather_whole_words_not_bytes(self, small_set, monkeypatch):
        gathered, index_select = [], torch.index_select

        def recorded(source, *args, **kwargs):
            gathered.append((source.dtype, tuple(source.shape[1:])))
            return index_select(source, *args, **kwargs)

        monkeypatch.setattr(torch, "index_select", recorded)
        train_loader, _ = data.get_dataloaders(small_set, batch_size=64, seed=2, preload=True)
        images, labels = next(iter(data.ResidentBatches(train_loader)))
        assert gathered == [(torch.int64, (96 * 96 * 3 // 8,)), (torch.int64, ())]  # the images, then the labels
        assert images.dtype == torch.uint8 and images.shape == (64, 3, 96, 96) and labels.shape == (64,)


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

    def test_bf16_keeps_the_first_layers_bias_and_normalisation_in_fp32(self):
        torch.manual_seed(0)
        model = MLP(dropout_rate=0.0).eval()
        mean = [178.0, 137.5, 190.2]  # PCAM's channel statistics, roughly: a bias far from 0 once folded
        model.set_normalization(mean, [59.0, 70.3, 52.1])
        stored = torch.tensor(mean) + 55 * torch.randn(64, 96, 96, 3, generator=torch.Generator().manual_seed(1))
        images = stored.clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2)
        first_layer = {}
        model.layers[1].register_forward_pre_hook(
            lambda layer, inputs: first_layer.setdefault(torch.is_autocast_enabled("cpu"), inputs[0])
        )
        with torch.no_grad():
            fp32 = model(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(images)
        assert first_layer[True].dtype == torch.float32  # the bias is added in fp32
        error = (first_layer[True] - first_layer[False]).square().mean().sqrt()
        # the matmul's own rounding: 0.0012 here; raw pixels and the bias in bfloat16 gave 0.004
        assert error < 0.002 * first_layer[False].std() / 0.5, error
        assert (bf16.float() - fp32).abs().max() < 0.002

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

    def test_the_written_out_first_layer_gives_autograds_gradients_bit_for_bit(self):
        torch.manual_seed(0)
        model = MLP(dropout_rate=0.0)
        model.set_normalization([150.0, 120.0, 170.0], [40.0, 50.0, 30.0])
        images, labels = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8), torch.tensor([0, 1, 1, 0, 1])

        def by_autograd():  # the fold and the matmul as autograd differentiates them
            weight, bias = model.normalised_first_layer()
            return model.layers[1:](F.linear(images.flatten(1).float(), weight.reshape(len(weight), -1), bias))

        gradients = []
        for logits in (lambda: model(images.permute(0, 3, 1, 2)), by_autograd):
            model.zero_grad()
            torch.nn.functional.cross_entropy(logits(), labels).backward()
            gradients.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*gradients, strict=True))

    def test_a_channels_last_input_gets_the_gradient_a_contiguous_one_does(self):
        torch.manual_seed(0)
        model = MLP().eval()
        model.set_normalization([150.0, 120.0, 170.0], [40.0, 50.0, 30.0])
        stored = torch.rand(3, 96, 96, 3) * 255  # (B, H, W, C): a saliency map's input, as data.py lays it out
        contiguous = stored.permute(0, 3, 1, 2).contiguous().requires_grad_()
        channels_last = stored.clone().requires_grad_()
        for images in (contiguous, channels_last.permute(0, 3, 1, 2)):
            model(images)[:, 1].sum().backward()
        assert channels_last.grad is not None
        assert torch.equal(channels_last.grad.permute(0, 3, 1, 2), contiguous.grad)


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

    def test_every_python_file_reads_in_one_sitting(self):
        files = [path for path in os.listdir(HERE) if path.endswith(".py")]
        lines = {path: len(Path(HERE, path).read_text().splitlines()) for path in files}
        assert lines["train.py"] < 450 and max(lines.values()) <= 600, lines
        functions = [(path, node) for path in files for node in ast.walk(ast.parse(Path(HERE, path).read_text()))]
        too_long = [
            f"{path}:{node.name}"
            for path, node in functions
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 50
        ]
        assert too_long == []
