"""train.py on a device: which device and which data path it takes, what it says when CUDA is missing or fails,
and what it reads back from the device while it trains."""

import io
import json
import os
import sys

import pytest
import torch

import common
import data
import gpu_check
import pcam_files
import run_folder
import train
from model import MLP
from test_helpers import assert_same_weights, loss_columns, one_line_error, run_main, train_args


class TestDataPaths:
    """data.choose_data_path and the three paths it chooses: device, host and files give the same run."""

    def test_an_epoch_reads_from_the_device_a_fixed_number_of_times_not_once_per_step(
        self, synth_dir, tmp_path, monkeypatch
    ):
        reads, counting = [], []

        def counting_reads(name, original):
            def counted(tensor, *args, **kwargs):
                caller = os.path.basename(sys._getframe(1).f_code.co_filename)
                if counting and caller in ("train.py", "data.py", "model.py"):  # the loop's own, not torch's
                    reads.append(f"{caller}:{sys._getframe(1).f_lineno} {name}")
                return original(tensor, *args, **kwargs)

            return counted

        for name in ("item", "cpu", "tolist", "__bool__", "__float__", "__int__"):  # each waits for a GPU
            monkeypatch.setattr(torch.Tensor, name, counting_reads(name, getattr(torch.Tensor, name)))
        epoch = train.train_one_epoch

        def counted_epoch(session, number):
            counting.append(True)
            try:
                return epoch(session, number)
            finally:
                counting.clear()

        monkeypatch.setattr(train, "train_one_epoch", counted_epoch)
        per_epoch = {}
        for batch_size in (512, 64):  # 3 and 24 steps an epoch
            reads.clear()
            flags = ("--epochs", "1", "--batch-size", str(batch_size), "--log-every", "1000")
            train.main(train_args(synth_dir, tmp_path / str(batch_size), *flags))
            per_epoch[batch_size] = list(reads)
        assert per_epoch[64] == per_epoch[512] and 0 < len(per_epoch[64]) <= 3, per_epoch  # the epoch's last step

    def test_the_device_host_and_files_paths_train_identically(
        self, synth_dir, straight_run, tmp_path, monkeypatch, capsys
    ):
        train.main(train_args(synth_dir, tmp_path / "streamed", "--epochs", "3", "--data-on-device", "no"))
        assert "data path: files (--data-on-device no)" in capsys.readouterr().out
        monkeypatch.setattr(data, "device_room", lambda device: (0, "a full device"))  # a GPU smaller than the data
        train.main(train_args(synth_dir, tmp_path / "host", "--epochs", "3"))
        assert "data path: host (uint8 train+valid 0.05 GiB over 70% of 0.00 GiB free under a full device; within" in (
            capsys.readouterr().out
        )
        for other in ("streamed", "host"):
            assert loss_columns(tmp_path / other) == loss_columns(straight_run)
            assert_same_weights(tmp_path / other, straight_run)

    def test_the_data_path_follows_the_flag_then_free_memory(self, small_set, monkeypatch):
        def path(free, *flags, host=None):
            monkeypatch.setattr(data, "free_memory", lambda: (free if host is None else host, "MemAvailable"))
            if host is not None:  # a GPU: its memory is not the host's
                monkeypatch.setattr(data, "device_room", lambda device: (free, "cuda memory"))
            args = train.parse_args(["--data-dir", str(small_set), *flags])
            return data.choose_data_path(args.data_dir, args.data_on_device, args.dry_run, torch.device("cpu"))[0]

        plenty, short = 2**30, 2**20  # train+valid take 264 images, 7.3 MB
        assert [path(plenty, "--data-on-device", flag) for flag in ("auto", "yes", "no")] == [
            "device",
            "device",
            "files",
        ]
        assert path(short) == "files" and path(plenty, "--dry-run") == "files"
        assert path(plenty, "--dry-run", "--data-on-device", "yes") == "device"
        assert path(short, host=plenty) == "host" and path(short, host=short) == "files"
        assert path(plenty, host=short) == "device"  # loading streams block by block: the host needs no room for it
        assert path(short, "--data-on-device", "no", host=plenty) == "files"
        with pytest.raises(common.UserError, match="--data-on-device yes: .* over 70% of 0.00 GiB free under cuda mem"):
            path(short, "--data-on-device", "yes", host=plenty)

    def test_the_data_path_follows_free_memory(self, synth_dir, tmp_path, monkeypatch, capsys):
        needed = (1536 + 512) * pcam_files.IMAGE_BYTES
        for free, path in (
            (needed / data.RESIDENT_SHARE * 1.01, "device"),
            (needed / data.RESIDENT_SHARE * 0.99, "files"),
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
            "data path: files (uint8 train+valid 0.05 GiB over 70% of 0.00 GiB free under SLURM_MEM_PER_NODE, cpu)"
            in capsys.readouterr().out
        )

    @pytest.mark.parametrize(
        "meminfo, room", [("MemTotal: 9 kB\nMemAvailable: 2 kB\n", 2048), ("MemTotal: 9 kB\n", 4096 * 3)]
    )
    def test_host_room_is_memavailable_or_else_the_free_pages(self, monkeypatch, meminfo, room):
        real_open = open
        monkeypatch.setattr(
            data,
            "open",
            lambda path, *a: io.StringIO(meminfo) if path == "/proc/meminfo" else real_open(path, *a),
            raising=False,
        )
        monkeypatch.setattr(data.os, "sysconf", {"SC_PAGE_SIZE": 4096, "SC_AVPHYS_PAGES": 3}.get)
        assert data.mem_available() == room


class TestDevice:
    """common.pick_device and cuda_diagnosis: the device asked for, what keeps CUDA away, and CUDA's failures."""

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_cuda_without_cuda_is_refused_and_auto_falls_back(self, synth_dir, tmp_path):
        result = run_main("train.py", *train_args(synth_dir, tmp_path / "r")[:-2], "--device", "cuda")
        one_line_error(result, "CUDA is not available")
        auto = run_main("train.py", *train_args(synth_dir, tmp_path / "r")[:-2], "--dry-run")
        assert "CUDA not available, using CPU" in auto.stdout

    @pytest.mark.parametrize("available", [True, False])
    def test_the_device_asked_for_is_the_one_used_and_auto_follows_cuda(self, monkeypatch, capsys, available):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        started, zeros = [], torch.zeros  # the first real CUDA call, which creates the context
        monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: started.append(device) or zeros(*a, **k))
        assert common.pick_device("cpu").type == "cpu" and started == []
        if available:
            assert common.pick_device("cuda").type == "cuda" and started == [torch.device("cuda")]
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
        result = run_main("train.py", *args, env=job)
        one_line_error(result, "CUDA is not available")
        assert result.returncode not in (0, train.REQUEUE_EXIT_CODE)
        for found in ("CPU build", "driver 550.54 for CUDA 12.4", "CUDA_VISIBLE_DEVICES=0", "--device cpu"):
            assert found in result.stderr
        assert not (tmp_path / "run" / "metrics.csv").exists()
        env_check = run_main("manage_data.py", "env", "--data-dir", str(synth_dir), env=job)
        assert result.stderr[result.stderr.index("CUDA is not available") :].strip() in env_check.stdout
        run_main("train.py", *args, "--device", "cpu", env=job, check=True)  # make demo on a GPU node

    @pytest.mark.parametrize(
        "env, given",
        [
            ({"SLURM_GPUS": "1"}, True),
            ({"SLURM_GPUS_PER_NODE": "a100:2"}, True),
            ({"SLURM_JOB_GPUS": "0"}, True),
            ({"SLURM_GPUS": "0"}, False),  # make train GPUS=0
            ({}, False),
            ({"CUDA_VISIBLE_DEVICES": "0"}, True),
            ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, False),  # Slurm's value for a GPU-less job on a GPU node
            ({"CUDA_VISIBLE_DEVICES": ""}, False),
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

    def test_a_job_shown_no_gpu_trains_on_the_cpu_and_says_so_once(self, synth_dir, tmp_path, monkeypatch, capsys):
        for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        monkeypatch.setenv("SLURM_GPUS", "1")  # what the node offers; the job itself was shown no device
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "NoDevFiles")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        train.main(train_args(synth_dir, tmp_path / "run", "--epochs", "1", "--device", "auto"))
        out = capsys.readouterr().out
        assert out.count("using CPU") == 1 and "CUDA_VISIBLE_DEVICES=NoDevFiles: no GPU here" in out
        assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"

    @pytest.mark.parametrize(
        "failing, error, doing, fix",
        [
            (
                "start",
                torch.AcceleratorError("CUDA error: CUDA-capable device(s) is/are busy or unavailable\nCUDA kernel..."),
                "starting CUDA: CUDA error: CUDA-capable device(s) is/are busy or unavailable",
                "another process holds this GPU (exclusive-process mode)",
            ),
            (
                "room",
                torch.AcceleratorError("CUDA error: initialization error\nCompile with TORCH_USE_CUDA_DSA"),
                "loading the train and valid splits: CUDA error: initialization error",
                "nvidia-smi on this node shows the GPU's state",
            ),
            (
                "model",
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.75 MiB. GPU 0 has 0 B free. Of ..."),
                "moving the model to it: CUDA out of memory. Tried to allocate 6.75 MiB. GPU 0 has 0 B free;",
                "nvidia-smi shows what holds its memory",
            ),
        ],
    )
    def test_a_cuda_failure_before_the_first_step_is_one_line_naming_the_device(
        self, synth_dir, tmp_path, monkeypatch, failing, error, doing, fix
    ):
        def fail(*args, **kwargs):
            raise error

        zeros = torch.zeros
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch, "zeros", fail if failing == "start" else lambda *a, device=None, **k: zeros(*a, **k))
        monkeypatch.setattr(torch.cuda, "mem_get_info", fail if failing == "room" else lambda device: (2**40, 2**40))
        monkeypatch.setattr(MLP, "to", fail)  # the model is the last to move
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        flags = ["--epochs", "1", "--device", "cuda"] + ["--data-on-device", "no"] * (failing == "model")
        with pytest.raises(SystemExit) as stop:
            train.main(train_args(synth_dir, tmp_path / "run", *flags))
        message = str(stop.value.code)
        assert message.startswith("train.py: error: CUDA device cuda (CUDA_VISIBLE_DEVICES=3) failed while ")
        assert doing in message and fix in message and "\n" not in message and "widths" not in message
        assert not (tmp_path / "run" / "metrics.csv").exists()

    def test_the_environment_names_the_device_as_torch_sees_it(self, monkeypatch):
        slice_memory = int(4.75 * 2**30)  # a MIG 1g.5gb slice: nvidia-smi's memory.total says 40 GB
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": slice_memory})
        )
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-40GB MIG 1g.5gb")
        monkeypatch.setattr(run_folder, "nvidia_driver", lambda: ("550.54.15", "12.4"))
        environment = run_folder.describe_environment(torch.device("cuda"))
        assert environment["device"] == "NVIDIA A100-SXM4-40GB MIG 1g.5gb" and environment["device_memory_gib"] == 4.75
        assert environment["driver"] == "550.54.15" and environment["driver_cuda"] == "12.4"
        assert environment["cuda"] == torch.version.cuda
        assert "device_memory_gib" not in run_folder.describe_environment(torch.device("cpu"))

    @pytest.mark.parametrize(
        "driver, build, visible, fix",
        [
            (None, "13.0", "0", "run on a GPU node"),
            (("unknown", "unknown"), "13.0", "0", "nvidia-smi shows no GPU"),
            (("580.65", "13.0"), "13.0", "0", "no GPU is visible to this process"),
            (("590.10", "13.2"), "12.8", "0", "no GPU is visible to this process"),  # a newer family runs older builds
            (("550.54", "12.4"), "12.8", "0", "no GPU is visible to this process"),  # minor-version compatibility
            (("550.54", "12.4"), "12.8", "NoDevFiles", "CUDA_VISIBLE_DEVICES=NoDevFiles hides every GPU"),
            (("550.54", "12.4"), "12.8", "", "CUDA_VISIBLE_DEVICES=(empty) hides every GPU"),
            (("550.54", "12.4"), "13.0", "0", "this torch needs a driver for CUDA 13.x (version 580 or newer)"),
            (("550.54", "12.4"), "13.0", "0", "install a torch built for CUDA 12.x, or load a newer driver"),
            (("520.61", "12.0"), "12.8", "0", "needs a driver for CUDA 12.x (version 525 or newer): load a newer"),
            (("575.10", "13.0"), "13.0", "0", "needs a driver for CUDA 13.x (version 580 or newer): load a newer"),
            (("unknown", "12.4"), "12.8", "0", "no GPU is visible to this process"),  # judged by the family
            (("550.54", "12.4"), None, "0", "install a torch built for CUDA 12.x"),
        ],
    )
    def test_no_cuda_is_explained_by_what_was_found(self, monkeypatch, driver, build, visible, fix):
        monkeypatch.setattr(common, "nvidia_driver", lambda: driver)
        monkeypatch.setattr(torch.version, "cuda", build)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        assert fix in common.cuda_diagnosis()

    def test_a_slurm_job_given_no_gpu_is_told_to_ask_for_one(self, monkeypatch):
        monkeypatch.setattr(common, "nvidia_driver", lambda: ("550.54", "12.4"))
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        monkeypatch.setenv("SLURM_GPUS", "0")
        assert "this Slurm job was given no GPU: ask for one (--gpus=1" in common.cuda_diagnosis()

    def test_nvidia_smis_banner_gives_the_driver_and_its_cuda_version(self, tmp_path, monkeypatch):
        banner = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |"
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho '{banner}'\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        assert common.nvidia_driver() == ("550.54.15", "12.4")
        (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver'\n")
        assert common.nvidia_driver() == ("unknown", "unknown")
        (tmp_path / "nvidia-smi").write_text(
            "#!/bin/sh\nprintf '\\377\\376 Driver Version: 575.10 CUDA Version: .\\n'\n"
        )
        assert common.nvidia_driver() == ("575.10", "unknown")  # bytes outside UTF-8, a version without digits
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        assert common.nvidia_driver() is None

    def test_a_diagnosis_never_asks_for_the_torch_already_installed(self, monkeypatch):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        for build in ("11.8", "12.1", "12.8", "13.0", "13.2"):
            for driver in (("470.82", "11.4"), ("535.10", "12.2"), ("575.10", "13.0"), ("580.65", "13.0")):
                monkeypatch.setattr(common, "nvidia_driver", lambda driver=driver: driver)
                monkeypatch.setattr(torch.version, "cuda", build)
                assert f"install a torch built for CUDA {build.split('.')[0]}.x" not in common.cuda_diagnosis()

    def test_a_checkpoint_resumes_with_the_optimiser_kernel_of_this_runs_device(self):
        model = MLP(hidden_units=(4,))
        optimizer = torch.optim.Adam(model.parameters())
        torch.nn.functional.cross_entropy(model(torch.rand(2, 3, 96, 96)), torch.tensor([0, 1])).backward()
        optimizer.step()
        state = run_folder.on_cpu(optimizer.state_dict())  # as a CPU run's checkpoint holds it
        elsewhere = MLP(hidden_units=(4,)).to("meta")  # meta: a device that is not the CPU, as CUDA is
        resumed = torch.optim.Adam(elsewhere.parameters())
        run_folder.load_optimizer(resumed, state, torch.device("cuda"))
        assert resumed.param_groups[0]["fused"] is True
        # a fused Adam steps with its step counts on the parameters' device; left on the CPU, the first step fails
        assert {value["step"].device.type for value in resumed.state.values()} == {"meta"}
        cpu_again = torch.optim.Adam(MLP(hidden_units=(4,)).parameters())
        run_folder.load_optimizer(cpu_again, state, torch.device("cpu"))
        assert cpu_again.param_groups[0]["fused"] is False

    def test_gpu_check_holds_a_gpu_kind_to_its_own_targets(self):
        names = {
            "NVIDIA H100 80GB HBM3": gpu_check.TARGETS["H100"],
            "NVIDIA H100 80GB HBM3 MIG 1g.10gb": {},  # a slice of an H100 is not an H100
            "NVIDIA A100-SXM4-40GB MIG 1g.5gb": gpu_check.TARGETS["MIG 1g.5gb"],
            "NVIDIA A100-SXM4-80GB": {},
        }
        for name, targets in names.items():
            assert gpu_check.targets_for(name) == targets, name
