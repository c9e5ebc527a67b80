"""The tools around the code: gpu_check.py, the Slurm job scripts and the Makefile's Slurm targets against a
real local Slurm (marker slurm), the Makefile and shell scripts, and mutate.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
import manage_data
import pcam_files
import train
from test_helpers import (
    HERE,
    SMALL_JOB,
    assert_same_weights,
    copy_project,
    is_nonblank_png,
    is_running,
    labels_of,
    linked_set,
    loss_columns,
    make,
    make_env,
    one_line_error,
    read_csv_rows,
    run_script,
    settled_job,
    submitted_job,
    throwaway_repo,
    tissue,
    train_args,
    wait_for_job,
    wait_until,
    write_split,
)


class TestGpuCheck:
    """gpu_check.py, the end-to-end check of a GPU node, run here on the CPU."""

    @pytest.mark.slow
    def test_gpu_check_runs_every_check_on_a_tiny_set_on_the_cpu_and_fails_on_a_missed_target(
        self, tmp_path, monkeypatch, capsys
    ):
        # every device name holds "": the device path's target is met, the host path's cannot be
        monkeypatch.setattr(gpu_check, "TARGETS", {"": {"device": 1, "host": 10**12}})
        assert gpu_check.main(["--device", "cpu", "--images", "256", "--dir", str(tmp_path)]) == 1
        table = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
        rows = {cells[1].strip(): (cells[2].strip(), cells[3].strip()) for cells in table}
        for precision in ("fp32", "bf16"):
            for path in ("device", "files"):
                assert rows[f"resume equals straight run, {precision}, {path}"] == ("yes", "pass")
        assert rows["same last.pt on the device, host, files paths"] == ("yes", "pass")
        assert rows["best.pt loads with weights_only, no GPU visible"][0].startswith("yes")
        assert rows["cpu and cpu scores of best.pt within 0.0001"] == ("largest 0.0e+00", "pass")
        assert rows["cpu and cpu confusion matrices equal"][1] == "pass"
        assert rows["a --device cpu run never starts CUDA"] == ("yes", "pass")
        assert rows["no host-device sync in 20 steps, device path, batch 1024"][1] == "-"  # no verdict on the CPU
        assert rows["training, batch 1024, fp32, device"][1] == "pass"
        assert rows["training, batch 1024, fp32, host"][0].endswith("(target 1,000,000,000,000)")
        assert [what for what, (_, verdict) in rows.items() if verdict == "FAIL"] == [
            "training, batch 1024, fp32, host"
        ]
        assert rows["training, batch 256, bf16, device"] == (rows["training, batch 256, bf16, device"][0], "-")
        assert os.listdir(tmp_path) == ["gpu_check_256"]  # the runs went with their temporary folder
        if not torch.cuda.is_available():
            one_line_error(run_script("gpu_check.py", "--dir", str(tmp_path)), "CUDA is not available here")

    def test_gpu_check_targets_are_the_ones_docs_benchmark_states(self):
        page = Path(HERE, "docs", "benchmark.md").read_text()
        for kind, targets in gpu_check.TARGETS.items():
            for path, images_per_s in targets.items():
                assert f"| {kind} | {path} | {images_per_s:,} |" in page

    def test_a_resumed_run_that_differs_is_a_mismatch(self, straight_run, synth_dir, tmp_path):
        other = tmp_path / "other"
        train.main(train_args(synth_dir, other, "--seed", "7"))
        assert gpu_check.same_run(straight_run, straight_run)
        assert not gpu_check.same_run(straight_run, other)

    def test_evaluate_py_scores_in_batches_of_the_runs_size(self, synth_dir, tmp_path, monkeypatch):
        run = tmp_path / "run"
        train.main(train_args(synth_dir, run, "--epochs", "1", "--batch-size", "96"))
        calls, real_script = [], gpu_check.script
        monkeypatch.setattr(
            gpu_check, "script", lambda *args, **kwargs: calls.append(args) or real_script(*args, **kwargs)
        )
        assert all(ok for *_, ok in gpu_check.evaluation_rows(str(synth_dir), str(tmp_path), str(run), "cpu"))
        evaluated = [args for args in calls if args[0] == "evaluate.py"]
        assert len(evaluated) == 2  # on the device, then on the CPU
        assert all(args[args.index("--batch-size") + 1] == "96" for args in evaluated)


@pytest.mark.slurm
class TestSlurmJobs:
    """first_job.sh, train_job.sh and the Makefile's Slurm targets against a real local Slurm."""

    def test_both_job_scripts_are_accepted_by_sbatch(self, project):
        for command in (["first_job.sh"], ["--cpus-per-task=1", "--mem=1500M", "train_job.sh"]):  # a 2-CPU node here
            result = subprocess.run(
                ["sbatch", "--test-only", *command], cwd=project, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0 and "to start at" in result.stderr, result.stderr

    def test_make_hello_writes_the_hello_world_log_and_loads_the_modules(self, project):
        # what `export -f module` puts in the environment
        env = {"BASH_FUNC_module%%": '() {  echo "module $*" >&2\n}'}
        job = submitted_job(make(project, "hello", env=env))[1]
        assert wait_for_job(job) == ["COMPLETED"]
        log = (project / f"hello_world_{job}.out").read_text()
        for line in (
            "module load 2025",
            "module load Python/3.13.1-GCCcore-14.2.0",
            f"job id: {job}",
            "Hello, World!",
            "python: Python 3",
        ):
            assert line in log
        plain = submitted_job(make(project, "hello"))[1]
        wait_for_job(plain)
        assert "skipped loading the course modules" in (project / f"hello_world_{plain}.out").read_text()

    def test_make_train_gpus_0_trains_on_the_cpu_partition_and_leaves_a_complete_run(self, project):
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 2 --batch-size 128"})
        job = submitted_job(output)[0]
        assert f"logs/pcam_train_{job}.out, run runs/slurm-{job}" in output
        assert wait_for_job(job) == ["COMPLETED"]
        run_dir = project / "runs" / f"slurm-{job}"
        assert len(read_csv_rows(run_dir / "metrics.csv")) == 2
        assert (run_dir / "best.pt").exists() and is_nonblank_png(run_dir / "loss.png")
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert "gpu:" in log and "commit:" in log and "CUDA not available, using CPU" in log
        accounted = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job, "-o", "Partition,AllocTRES"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("|")
        assert accounted[0] == "thin_course" and "gpu" not in accounted[1], accounted
        status = make(project, "status")
        assert job in status and "COMPLETED" in status

    def test_a_gpu_job_without_a_usable_gpu_fails_in_one_line_and_is_not_requeued(self, project):
        output = make(project, "train", env={**SMALL_JOB, "GPUS": "1", "ARGS": "--epochs 1"})
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["FAILED"]
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        errors = [line for line in log.splitlines() if line.startswith("train.py: error:")]
        assert len(errors) == 1 and "CUDA" in errors[0] and "Traceback" not in log, log
        assert "epoch 1/1" not in log and "requeueing" not in log
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
        assert "Restarts=0" in show and "Partition=gpu_course" in show, show

    def test_a_job_continues_the_run_in_the_out_dir_its_args_name_on_its_own_data(self, project, small_set):
        run_dir = project / "mine" / "first"
        train.main(train_args(small_set, run_dir, "--epochs", "1"))  # not data/: the job passes no --data-dir
        output = make(project, "train", env={**SMALL_JOB, "ARGS": f"--out-dir {run_dir} --epochs 2 --batch-size 64"})
        job = submitted_job(output)[0]
        assert f"logs/pcam_train_{job}.out, run the --out-dir in ARGS" in output  # not runs/slurm-<job id>
        log = project / "logs" / f"pcam_train_{job}.out"
        assert wait_for_job(job) == ["COMPLETED"], log.read_text()
        assert "--resume auto --out-dir" in log.read_text() and f"resuming {run_dir} after epoch 1" in log.read_text()
        assert [row["epoch"] for row in read_csv_rows(run_dir / "metrics.csv")] == ["1", "2"]
        assert not (project / "runs" / f"slurm-{job}").exists()

    @pytest.mark.parametrize("args", ["--epochs 1 --data-dir", "--data-dir= --epochs 1"])
    def test_a_job_whose_args_name_no_data_folder_ends_before_staging(self, project, args):
        job = submitted_job(make(project, "train", env={**SMALL_JOB, "ARGS": args, "STAGE": "yes"}))[0]
        assert wait_for_job(job) == ["FAILED"]
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert "error: --data-dir in ARGS names no folder" in log and "staging" not in log

    def test_a_job_at_its_requeue_limit_names_the_make_train_that_continues_its_run(self, project):
        env = {**SMALL_JOB, "MAX_REQUEUES": "0", "ARGS": "--epochs 50 --batch-size 16 --log-every 1"}
        job = submitted_job(make(project, "train", env=env))[0]
        log = project / "logs" / f"pcam_train_{job}.out"
        wait_until(lambda: log.exists() and "epoch 1/50 step" in log.read_text(), 300, "training in the job")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # as --signal=B:USR1@120 sends it
        assert wait_for_job(job) == ["FAILED"], log.read_text()
        continuation = re.search(r'continue with: make train ARGS="(.*)"$', log.read_text(), re.MULTILINE)
        assert continuation and continuation.group(1) == f"--resume --out-dir runs/slurm-{job}", log.read_text()
        done = torch.load(project / "runs" / f"slurm-{job}" / "last.pt", weights_only=True)["epoch"]
        again = submitted_job(
            make(project, "train", env={**SMALL_JOB, "ARGS": f"{continuation.group(1)} --epochs {done + 1}"})
        )[0]
        assert wait_for_job(again) == ["COMPLETED"], (project / "logs" / f"pcam_train_{again}.out").read_text()
        assert len(read_csv_rows(project / "runs" / f"slurm-{job}" / "metrics.csv")) == done + 1
        assert not (project / "runs" / f"slurm-{again}").exists()

    def test_make_train_passes_arguments_without_running_them(self, project):
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1 --dry-run; touch pwned $(touch pwned2)"})
        job = submitted_job(output)[0]
        wait_for_job(job)
        assert not (project / "pwned").exists() and not (project / "pwned2").exists()
        assert "unrecognized arguments" in (project / "logs" / f"pcam_train_{job}.out").read_text()

    def test_scancel_stops_a_job_for_good(self, project):
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 50 --batch-size 16 --log-every 1"})
        job = submitted_job(output)[0]
        log = project / "logs" / f"pcam_train_{job}.out"
        wait_until(lambda: log.exists() and "epoch 1/50 step" in log.read_text(), 300, "training in the job")
        subprocess.run(["scancel", job], check=True)
        wait_for_job(job)
        show = settled_job(job)
        assert "Restarts=0" in show and "JobState=CANCELLED" in show, show
        assert "requeueing" not in log.read_text() and "stopped by SIGTERM" in log.read_text()

    def test_a_job_near_its_time_limit_checkpoints_requeues_and_resumes_to_the_same_result(
        self, project, synth_dir, tmp_path
    ):
        # Submitted as make train submits it, so train_job.sh's own --signal=B:USR1@120 line is what stops it.
        # Slurm checks time limits every 30 s and signals a job once it is within --signal's time + 30 s of its
        # limit, so USR1@120 of a 3-minute limit comes 30-60 s in: after train.py is up (an earlier USR1 finds it
        # still importing torch) and before its 90 epochs (a second or more each) end. Both runs use one thread,
        # so they share the 2 CPUs here without slowing each other down, and compute the same numbers.
        args = ["--epochs", "90", "--batch-size", "16", "--log-every", "50", "--num-workers", "0"]
        one_thread = {"OMP_NUM_THREADS": "1"}
        output = make(project, "train", env={**SMALL_JOB, **one_thread, "TIME": "00:03:00", "ARGS": " ".join(args)})
        job = submitted_job(output)[0]
        straight = subprocess.Popen(
            [sys.executable, "train.py", "--data-dir", str(synth_dir), "--out-dir", str(tmp_path / "straight"), *args],
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **one_thread},
        )

        def extend_after_first_requeue():
            # the requeued job would be signalled again soon after it starts: give it room to finish
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
            if "Restarts=1" in show and "TimeLimit=00:03:00" in show:
                subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=00:10:00"], check=True)

        assert wait_for_job(job, timeout=480, on_poll=extend_after_first_requeue) == ["COMPLETED"]
        assert straight.wait(timeout=300) == 0
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert "USR1: time limit near" in log and "requeueing job" in log and "restart 1" in log, log
        assert "stopped by SIGUSR1" in log and "resuming" in log, log  # train.py itself checkpointed, then resumed
        run_dir = project / "runs" / f"slurm-{job}"
        assert loss_columns(run_dir) == loss_columns(tmp_path / "straight")
        assert_same_weights(run_dir, tmp_path / "straight")

    def test_make_sweep_leaves_one_run_per_seed(self, project):
        output = make(project, "sweep", env={**SMALL_JOB, "SEEDS": "1 2", "ARGS": "--epochs 1"})
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["COMPLETED", "COMPLETED"]
        logs = re.search(r"logs (\S+\.out)", output).group(1)
        seeds = {}
        for task in (0, 1):
            record = json.loads((project / "runs" / f"slurm-{job}_{task}" / "run.json").read_text())
            seeds[task] = record["args"]["seed"]
            log = (project / logs.replace("*", str(task))).read_text()
            assert log.startswith(f"job {job}_{task} (array {job}, task {task}) on "), log
            assert f"--seed {seeds[task]}" in log and "done: " in log
        assert seeds == {0: 1, 1: 2}
        assert len(os.listdir(project / "logs")) == 2

    def test_the_job_stages_data_to_node_local_scratch_when_asked(self, project, synth_dir, tmp_path):
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        output = make(project, "train", env={**SMALL_JOB, "ARGS": "--epochs 1", "STAGE": "yes", "TMPDIR": str(scratch)})
        job = submitted_job(output)[0]
        assert wait_for_job(job) == ["COMPLETED"]
        staged = scratch / f"pcam_{job}"
        copied = set(os.listdir(synth_dir)) - {manage_data.SYNTH_NAME}  # prepare's record in place of synth's
        assert sorted(os.listdir(staged)) == sorted(copied | {manage_data.PREPARED_NAME})
        record = json.loads((project / "runs" / f"slurm-{job}" / "run.json").read_text())
        assert record["args"]["data_dir"] == str(staged)

    @pytest.mark.parametrize("given_by", ["DATA_DIR", "ARGS"])
    def test_a_staged_job_stages_the_users_folder_and_names_it_for_a_half_split(
        self, project, synth_dir, tmp_path, given_by
    ):
        user_dir = linked_set(synth_dir, tmp_path / "user_data")
        write_split(user_dir, "test", tissue(8), labels_of(8, 4))
        os.remove(pcam_files.split_paths(user_dir, "test")[1])
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        env = {**SMALL_JOB, "ARGS": "--epochs 1", "STAGE": "yes", "TMPDIR": str(scratch)}
        env = (
            {**env, "DATA_DIR": str(user_dir)}
            if given_by == "DATA_DIR"
            else {**env, "ARGS": f"--epochs 1 --data-dir {user_dir}"}
        )
        job = submitted_job(make(project, "train", env=env))[0]
        assert wait_for_job(job) == ["FAILED"]
        log = (project / "logs" / f"pcam_train_{job}.out").read_text()
        assert f"staging {user_dir} to " in log
        assert f"test split missing in {user_dir}" in log and "Traceback" not in log


class TestMakeAndShellScripts:
    """The Makefile's local targets, and shellcheck on the shell scripts."""

    def test_make_demo_again_leaves_the_finished_demo_alone(self, project, synth_dir):
        env = {"SYNTH_DIR": str(synth_dir)}
        make(project, "demo", env=env)
        run_dir = project / "runs" / "demo"
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
        before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
        output = make(project, "demo", env=env)
        assert "runs/demo: complete, 5 of 5 epochs done; nothing to do" in output
        assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()} == before

    def test_args_are_split_as_a_shell_splits_words_and_never_run(self, project, small_set, tmp_path):
        shutil.copytree(small_set, tmp_path / "my data")
        args = f"--data-dir '{tmp_path}/my data' --out-dir \"{tmp_path}/run one\" --dry-run --device cpu"
        result = subprocess.run(
            ["make", "-s", "train-local", f"ARGS={args} `touch pwned` $(shell touch pwned)"],
            cwd=project,
            capture_output=True,
            text=True,
            env=make_env(),
        )  # the quoted paths were taken whole; neither make nor a shell ran anything
        assert "unrecognized arguments: `touch pwned` $(shell touch pwned)" in result.stderr, result.stderr
        output = make(project, "train-local", env={"ARGS": args})
        assert "dry run: one validation batch" in output and not (project / "pwned").exists()
        unclosed = subprocess.run(
            ["make", "-s", "train-local", "ARGS=--data-dir 'my data"], cwd=project, capture_output=True, text=True
        )
        assert unclosed.returncode != 0 and unclosed.stderr.startswith("make: ARGS: No closing quotation\n")

    def test_make_plot_skips_failed_runs_and_make_eda_takes_a_folder_with_spaces(
        self, small_set, straight_run, tmp_path
    ):
        copy_project(tmp_path)
        (tmp_path / "runs" / "failed-before-epoch-1").mkdir(parents=True)
        result = subprocess.run(
            ["make", "-s", "plot"], cwd=tmp_path, capture_output=True, text=True, check=False, env=make_env()
        )
        assert result.returncode != 0 and "no run found" in result.stderr
        for age, name in enumerate(["newest run", "older"]):  # the newest, with a space: make plot's default
            shutil.copytree(straight_run, tmp_path / "runs" / name)
            (tmp_path / "runs" / name / "loss.png").unlink()
            os.utime(tmp_path / "runs" / name / "metrics.csv", (1e9 - age, 1e9 - age))
        (tmp_path / "runs" / "failed-before-epoch-1" / "metrics.csv").symlink_to(tmp_path / "gone")  # not a run's
        make(tmp_path, "plot")
        assert is_nonblank_png(tmp_path / "runs" / "newest run" / "loss.png")
        assert not (tmp_path / "runs" / "older" / "loss.png").exists()
        shutil.rmtree(tmp_path / "runs")
        shutil.copytree(small_set, tmp_path / "a folder with spaces")
        make(tmp_path, "eda", "DATA_DIR=a folder with spaces")
        assert is_nonblank_png(tmp_path / "runs" / "eda" / "pcam.png")

    def test_make_eda_plot_and_runs_take_paths_with_spaces_and_leave_assets_alone(self, project, straight_run):
        before = {path.name: path.read_bytes() for path in (project / "assets").iterdir()}
        run = project / "my runs" / "run one"
        shutil.copytree(straight_run, run)
        (run / "loss.png").unlink()
        for _ in range(2):  # and again: each rewrites its own output
            make(project, "eda", "OUT=eda figures")
            make(project, "plot", f"RUN={run}")
            make(project, "plot", f"RUN={run}", "OUT=my runs/overlay.png")
            make(project, "runs", "RUNS=my runs/*/")
        assert is_nonblank_png(project / "eda figures" / "pcam.png") and is_nonblank_png(run / "loss.png")
        assert is_nonblank_png(project / "my runs" / "overlay.png")
        assert read_csv_rows(project / "my runs" / "runs_summary.csv")[0]["run"] == "run one"
        assert {path.name: path.read_bytes() for path in (project / "assets").iterdir()} == before

    def test_job_scripts_pass_shellcheck(self):
        if shutil.which("shellcheck") is None:
            pytest.skip("shellcheck not installed (Debian package shellcheck)")
        result = subprocess.run(
            ["shellcheck", "first_job.sh", "train_job.sh", ".ci/slurm-up.sh", ".ci/run"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout

    @pytest.mark.parametrize("ctrl_c", [False, True], ids=["suite-fails", "ctrl-c"])
    def test_make_test_loaded_stops_its_busy_processes_when_the_suite_fails_and_on_ctrl_c(self, tmp_path, ctrl_c):
        for name in ("Makefile", "requirements.txt"):
            shutil.copy2(os.path.join(HERE, name), tmp_path / name)
        os.symlink(os.path.join(HERE, ".venv"), tmp_path / ".venv")
        (tmp_path / "test_all.py").write_text(
            "import os, pathlib, time\n\n\ndef test_a_suite():\n"
            "    pathlib.Path('started').touch()\n"
            "    while os.environ.get('HOLD') or not pathlib.Path('checked').exists():\n        time.sleep(1)\n"
            "    assert False, 'a failing suite'\n"
        )
        process = subprocess.Popen(
            ["make", "-s", "test-loaded"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=make_env({"HOLD": "yes" if ctrl_c else "", "WORKERS": "0"}),  # one test: no pytest workers to start
            start_new_session=True,
            # as in a terminal: a suite started in the background (nohup, CI) passes its ignored SIGINT down
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        busy = [int(pid) for pid in re.search(r"busy processes (\d+) (\d+)", process.stdout.readline()).groups()]
        wait_until(lambda: (tmp_path / "started").exists(), 120, "the suite's start")
        assert all(is_running(pid) for pid in busy)
        (tmp_path / "checked").touch()  # the suite may end now
        if ctrl_c:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            exit_code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"make test-loaded did not end; its output:\n{process.communicate()[0]}")
        assert exit_code != 0, process.stdout.read()
        wait_until(lambda: not any(is_running(pid) for pid in busy), 60, "the busy processes' end")


class TestMutate:
    """mutate.py, on a throwaway module and its tests: it must tell a caught mutant from a missed one."""

    def test_a_mutant_a_test_catches_is_killed_one_it_misses_survives_and_equivalents_are_skipped(self, tmp_path):
        code = (
            "def clamp(value, low, high):\n    if value < low:\n        return low\n    return min(value, high)\n\n\n"
            "def unused():\n    return 1\n"
        )
        tests = (
            "import subprocess, sys\nfrom clamp import clamp\n\n\ndef test_low_values_become_low():\n"
            "    assert clamp(-5, 0, 10) == 0\n\n\ndef test_high_values_become_high_in_a_subprocess():\n"
            "    high = 'import clamp; assert clamp.clamp(20, 0, 10) == 10'\n"
            "    subprocess.run([sys.executable, '-c', high], check=True)\n"
        )
        options = throwaway_repo(tmp_path, "clamp", code, tests, "--mutants", "99")
        output = run_script("mutate.py", *options, check=True).stdout
        assert "clamp.py:2: value < low -> value <= low  survived, 2 tests" in output, output
        assert "clamp.py:3: return low -> return None  killed, 1 tests" in output, output
        assert "clamp.py:4: return min(value, high) -> return None  killed, 1 tests" in output, output  # subprocess
        assert "clamp.py:8: return 1 -> return None  no tests" in output, output
        assert "mutation score: 2 killed of 5 (40%), 1 survived, 2 not covered" in output, output
        survivors = (tmp_path / ".mutate" / "survivors.txt").read_text()
        assert survivors == "clamp.py:clamp: value < low -> value <= low  in  if value < low:\n"
        (tmp_path / "mutants_equivalent.txt").write_text(survivors.strip() + "  # a test of this file says why\n")
        output = run_script("mutate.py", *options, check=True).stdout
        assert "mapping lines" not in output and "clamp.py:2: value < low -> value <= low  equivalent" in output
        assert "2 killed of 4 (50%), 0 survived, 2 not covered; 1 skipped as equivalent" in output, output
        moved = "# a line above it moves the mutant's line, not its entry\n" + (tmp_path / "clamp.py").read_text()
        (tmp_path / "clamp.py").write_text(moved)
        output = run_script("mutate.py", *options, check=True).stdout
        assert "clamp.py:3: value < low -> value <= low  equivalent" in output, output
        output = run_script("mutate.py", *options, "--file", "clamp.py", "--line", "4", check=True).stdout
        assert "clamp.py:4: return low -> return None  killed" in output and "1 killed of 1 (100%)" in output, output
        one_line_error(
            run_script("mutate.py", *options, "--file", "clamp.py", "--line", "1"), "no mutant on clamp.py:1"
        )

    def test_again_reruns_only_the_survivors_of_the_same_sample(self, tmp_path):
        code, tests = "def double(x):\n    return x * 2  # twice\n", "from double import double\n\n\ndef test_zero():\n"
        options = throwaway_repo(tmp_path, "double", code, tests + "    assert double(0) == 0\n", "--max-tests", "1")
        result = run_script("mutate.py", *options, "--again")
        one_line_error(result, "no readable .mutate/results.json")
        assert "mapping lines" not in result.stdout  # refused before the suite runs under coverage
        output = run_script("mutate.py", *options, check=True).stdout
        assert "mutation score: 1 killed of 3 (33%), 2 survived" in output, output
        survivors = (tmp_path / ".mutate" / "survivors.txt").read_text().splitlines()
        constant = next(survivor for survivor in survivors if "* 3  # twice" in survivor)  # its line's comment too
        (tmp_path / "mutants_equivalent.txt").write_text(f"{constant}  # say why here\n")
        with open(tmp_path / "test_double.py", "a") as tests:  # runs on the survivors beside the 1 fastest
            tests.write("\n\ndef test_three():\n    assert double(3) == 6\n")
        output = run_script("mutate.py", *options, "--again", check=True).stdout
        assert "double.py:2: return x * 2 -> return None  killed, 0 tests" in output, output  # not run again
        assert "mutation score: 2 killed of 2 (100%), 0 survived, 0 not covered; 1 skipped as equivalent" in output
        (tmp_path / "double.py").write_text("def double(x):\n    return x + x\n")
        one_line_error(run_script("mutate.py", *options, "--again"), "the last run was of another sample")
        (tmp_path / ".mutate" / "results.json").write_text('{"sample": ')
        one_line_error(run_script("mutate.py", *options, "--again"), "no readable .mutate/results.json")

    def test_by_default_every_test_file_of_the_root_runs(self, tmp_path):
        code, tests = "def double(x):\n    return x * 2\n", "from double import double\n\n\ndef test_zero():\n"
        options = throwaway_repo(tmp_path, "double", code, tests + "    assert double(0) == 0\n", "--file", "double.py")
        (tmp_path / "test_more.py").write_text(
            "from double import double\n\n\ndef test_three():\n    assert double(3) == 6\n"
        )
        one_file = run_script("mutate.py", *options, "--line", "2", check=True).stdout
        assert "1 killed of 3 (33%), 2 survived" in one_file, one_file
        default = [option for option in options if option not in ("--tests", "test_double.py")]
        every_file = run_script("mutate.py", *default, "--line", "2", check=True).stdout
        assert "3 killed of 3 (100%)" in every_file, every_file

    def test_a_default_on_a_def_line_meets_the_tests_that_run_its_function(self, tmp_path):
        code = "def scale(x, factor=2):\n    return x * factor\n"
        tests = "from scale import scale\n\n\ndef test_twice_by_default():\n    assert scale(3) == 6\n"
        options = throwaway_repo(tmp_path, "scale", code, tests, "--file", "scale.py", "--line", "1")
        output = run_script("mutate.py", *options, check=True).stdout
        assert "scale.py:1: def scale(x, factor=2): -> def scale(x, factor=3):  killed, 1 tests" in output, output

    def test_a_folder_outside_git_ends_in_one_line(self, tmp_path):
        one_line_error(run_script("mutate.py", "--root", str(tmp_path)), "is not a git work tree")
        one_line_error(run_script("mutate.py", "--root", str(tmp_path / "missing")), "is not a git work tree")

    def test_a_test_file_pytest_cannot_find_stops_before_any_mutant(self, tmp_path):
        code, tests = "def double(x):\n    return x * 2\n", "from double import double\n\n\ndef test_zero():\n"
        options = throwaway_repo(tmp_path, "double", code, tests + "    assert double(0) == 0\n", "--tests", "nope.py")
        result = run_script("mutate.py", *options)  # pytest's own words come first, on stderr too
        assert result.returncode == 1 and "mutation score" not in result.stdout
        assert result.stderr.splitlines()[-1].startswith("mutate.py: error: pytest ended with exit code 4")

    def test_a_mutant_that_hangs_is_stopped_and_counted_as_killed(self, tmp_path):
        code = "def countdown(n):\n    while n > 0:\n        n = n - 1\n    return n\n"
        tests = "from countdown import countdown\n\n\ndef test_countdown_ends_at_0():\n    assert countdown(3) == 0\n"
        options = throwaway_repo(tmp_path, "countdown", code, tests, "--grace", "2")
        output = run_script("mutate.py", *options, "--file", "countdown.py", "--line", "3", check=True).stdout
        assert "countdown.py:3: n - 1 -> n + 1  killed (timeout)" in output, output
        assert "mutation score: 2 killed of 2 (100%)" in output, output
