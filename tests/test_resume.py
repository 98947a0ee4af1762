"""Checkpoint/resume after SIGKILL, non-finite loss, and fault-isolated sweeps, through run.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hydra.experimental.callback import Callback
from safetensors.torch import load_file
from test_causal_lm import needs_smollm2
from test_run import ROOT, run_py

RUN = ["trainer.max_steps=30", "trainer.checkpoint_every=5", "trainer.log_every=1", "trainer.eval_every=10",
       "trainer.batch_size=16", "task.train_size=112", "task.eval_size=64", "tracking.mode=disabled"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_checkpoint(proc, checkpoint, min_step):
    """SIGKILL the run once a checkpoint at ``min_step`` or later exists."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file():
            try:
                step = torch.load(checkpoint, weights_only=True, mmap=True)["step"]
            except Exception:  # noqa: BLE001  (replaced between open and read: try again)
                step = -1
            if step >= min_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return step
        time.sleep(0.05)
    raise AssertionError(f"the run ended before a checkpoint at step {min_step}: {proc.stderr.read()}")


VARIANT_SETTINGS = {
    "lora": ["variant=lora"],
    "adalora": ["variant=adalora", "rank=6", "variant.t_init=5", "variant.t_final=10", "variant.delta_t=5"],
    "staged": ["variant=staged", "variant.full_fraction=0.6"],  # the switch (step 18) comes after the kill point
    # The switch (step 6) comes before the kill: the resumed run restores phase 2's optimizer, its
    # schedule from the switch, and the phase record.
    "staged_switched": ["variant=staged", "variant.full_fraction=0.2"],
    # A data-driven start (not repeated on resume), a variant-owned AdamW state, LoRA+'s groups.
    "lora_ga": ["variant=lora_ga", "variant.init_batches=2"],
    "lora_pro": ["variant=lora_pro"],
    "loraplus": ["variant=lora", "variant.lr_ratio=16"],
    # A data-driven start that also changes the layers' ranks: the resumed model takes them
    # from the checkpoint before loading it.
    "eva": ["variant=eva"],
    # Length-grouped batches, a held-out validation set that keeps the best state and early-stops
    # (patience 1), and the test set evaluated only at new bests: the resumed run decides alike.
    "grouped_keep_best": ["variant=lora", "trainer.group_by_length=true", "task.val_fraction=0.25",
                          "trainer.keep_best=true", "trainer.eval_others=when_best", "trainer.early_stopping.patience=1"],
    # A causal LM (its first 2 blocks): response-only loss, generation at each evaluation, and the
    # step-0 evaluation, which the resumed run must not repeat.
    "smollm2_lora": ["model=smollm2", "task=sft_smoke", "model.keep_layers=2", "trainer.batch_size=4",
                     "task.train_size=28", "task.eval_size=8", "task.max_new_tokens=4", "trainer.eval_at_start=true",
                     "trainer.forgetting.examples=3", "trainer.forgetting.max_new_tokens=4"],
}


# The fast tier resumes LoRA, a run past the staged switch and one that keeps its best state and
# stops early (the converged protocol's path); the other variants' own state is in the slow tier.
FAST_TIER = {"lora", "staged_switched", "grouped_keep_best"}


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=[*([needs_smollm2] if v.startswith("smollm2") else []),
                           *([] if v in FAST_TIER else [pytest.mark.slow])])
    for v in VARIANT_SETTINGS])
def test_killed_run_resumes_to_identical_results(tmp_path, variant):
    """Mid-epoch kill (7 batches per epoch, checkpoints every 5 steps), then resume=<run dir>."""
    # MiniLM's first 2 blocks: what is tested is that the resumed run is the uninterrupted one
    extra = VARIANT_SETTINGS[variant] if variant.startswith("smollm2") else ["model.keep_layers=2", *VARIANT_SETTINGS[variant]]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = run_py(*RUN, *extra, f"hydra.run.dir={whole}")
    assert result.returncode == 0, result.stderr
    assert not (whole / "checkpoint.pt").exists()  # removed once the run completed
    assert ("initialised from training data" in result.stdout) == (variant in ("lora_ga", "eva"))  # Hydra logs to stdout

    proc = start(*RUN, *extra, f"hydra.run.dir={broken}")
    killed_at = kill_after_checkpoint(proc, broken / "checkpoint.pt", min_step=10)
    assert not (broken / "summary.json").exists()
    result = run_py(f"resume={broken}")
    assert result.returncode == 0, result.stderr
    assert "initialised from training data" not in result.stdout  # LoRA-GA's and EVA's start came from the checkpoint

    expected = json.loads((whole / "summary.json").read_text())
    got = json.loads((broken / "summary.json").read_text())
    assert got["eval"] == expected["eval"]  # bit-identical on CPU
    assert got["adapter_report"] == expected["adapter_report"] and got["phases"] == expected["phases"]
    assert got["initialization"] == expected["initialization"]
    assert got["forgetting"] == expected["forgetting"] and got["forgetting"]  # measured against the same start
    assert records(broken) == records(whole)  # every loss, lr and eval record, rewritten after the kill
    assert got["stopped"] == expected["stopped"] and got["best"] == expected["best"]
    if expected["best"]["adapter"]:
        best_whole, best_broken = load_file(whole / "adapter_best.safetensors"), load_file(broken / "adapter_best.safetensors")
        assert best_whole.keys() == best_broken.keys()
        assert all(torch.equal(best_whole[k], best_broken[k]) for k in best_whole)
    assert killed_at >= 10


def test_a_sweep_job_killed_mid_run_continues_from_its_checkpoint_with_skip_completed(tmp_path):
    """The sweep's own command again, with skip_completed=true: the job killed after a checkpoint
    continues from it, not from step 0, and ends as the uninterrupted run."""
    extra = ["model.keep_layers=2", "variant=lora"]
    whole, sweep = tmp_path / "whole", tmp_path / "sweep"
    result = run_py(*RUN, *extra, f"hydra.run.dir={whole}")
    assert result.returncode == 0, result.stderr
    command = [*RUN, *extra, f"hydra.sweep.dir={sweep}"]
    proc = start(*command, "-m")
    deadline = time.time() + 120
    while not (jobs := list(sweep.glob("0_*"))) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert jobs, proc.stderr.read()
    killed_at = kill_after_checkpoint(proc, jobs[0] / "checkpoint.pt", min_step=10)
    earlier = torch.load(jobs[0] / "checkpoint.pt", weights_only=True)["train_state"]["train_time_s"]

    result = run_py(*command, "skip_completed=true", "-m")
    assert result.returncode == 0, result.stderr
    assert f"skip_completed: {jobs[0]} was cut off; it continues from its last checkpoint" in result.stderr
    assert f"resuming {jobs[0]} from step {killed_at}" in (jobs[0] / "run.log").read_text()
    expected, got = (json.loads((d / "summary.json").read_text()) for d in (whole, jobs[0]))
    assert got["status"] == "completed" and got["eval"] == expected["eval"]  # bit-identical on CPU
    assert records(jobs[0]) == records(whole)
    # the resume is recorded, with the killed process's training seconds, which the wall time counts
    assert got["resumes"] == [{"step": killed_at, "changed": {}, "earlier_train_time_s": earlier}] and earlier > 0
    assert got["wall_time_s"] >= got["train_time_s"]  # (train_time_s sums every process's training)


def last_step(run_dir):
    """The step of the last train/* record in ``run_dir``'s metrics.jsonl (0 before any)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if '"train/loss"' in line), default=0)


def sigterm_sweep_at(command, sweep, step):
    """Start the sweep ``command``, SIGTERM it once its job 0 has logged ``step``, expect exit 143:
    job 0's dir and the sweep's stderr."""
    proc = start(*command, "-m")
    deadline = time.time() + 300
    while not ((jobs := list(sweep.glob("0_*"))) and last_step(jobs[0]) >= step) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    return jobs[0], proc.stderr.read()


def test_sigterm_stops_a_sweep_at_a_step_with_its_checkpoint_and_skip_completed_ends_it_as_uninterrupted(tmp_path):
    """SIGTERM (a scheduler's time limit or preemption): the job writes a checkpoint at the step
    it was at, is marked interrupted, the sweep exits 143 without starting its next job, and
    the sweep's command with skip_completed=true continues the job from that very step."""
    extra = ["model.keep_layers=2", "variant=lora"]
    whole, sweep = tmp_path / "whole", tmp_path / "sweep"
    result = run_py(*RUN, *extra, f"hydra.run.dir={whole}")
    assert result.returncode == 0, result.stderr
    command = [*RUN, *extra, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    job, stderr = sigterm_sweep_at(command, sweep, step=7)
    summary = json.loads((job / "summary.json").read_text())
    step = summary["step"]
    assert summary["status"] == "interrupted" and step >= 7
    assert torch.load(job / "checkpoint.pt", weights_only=True)["step"] == step  # not the periodic one at 5
    assert last_step(job) == step
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: stopped by SIGTERM after step {step}, whose checkpoint is kept: continue with "
        "resume=<run dir> (a sweep: its command again with skip_completed=true)")
    assert [p.name[:2] for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()] == ["0_"]  # job 1 never started
    assert [row["status"] for row in json.loads((sweep / "sweep_summary.json").read_text())] == ["interrupted"]

    result = run_py(*command, "skip_completed=true", "-m")
    assert result.returncode == 0, result.stderr
    assert f"resuming {job} from step {step}" in (job / "run.log").read_text()
    expected, got = (json.loads((d / "summary.json").read_text()) for d in (whole, job))
    assert got["status"] == "completed" and got["eval"] == expected["eval"]  # bit-identical on CPU
    assert records(job) == records(whole) and got["resumes"][0]["step"] == step
    assert json.loads(next(sweep.glob("1_*/summary.json")).read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigterm_during_the_last_evaluation_completes_the_job_and_starts_no_other(tmp_path):
    """A SIGTERM after the last step (here: during the final evaluation, made long by a large
    eval set) keeps the run: it completes as usual, and only the sweep stops, with 143 and a
    sweep summary; the command again with skip_completed=true skips that job and runs the next."""
    sweep = tmp_path / "sweep"
    command = [*RUN, "model.keep_layers=2", "variant=lora", "trainer.eval_every=30", "task.eval_size=1500",
               "seed=0,1", f"hydra.sweep.dir={sweep}"]
    job, stderr = sigterm_sweep_at(command, sweep, step=30)
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: {job} completed; no further job starts (a sweep: its command again with skip_completed=true)")
    assert [p.name[:2] for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()] == ["0_"]
    assert [row["status"] for row in json.loads((sweep / "sweep_summary.json").read_text())] == ["completed"]

    result = run_py(*command, "skip_completed=true", "-m")
    assert result.returncode == 0, result.stderr
    assert f"skip: {job} already holds a completed run" in result.stderr
    assert [row["status"] for row in json.loads((sweep / "sweep_summary.json").read_text())] == ["completed"] * 2


class SigtermAtJobStart(Callback):
    """A Hydra callback for the test below: SIGTERM to the sweep's process as job ``job`` starts,
    after the job before it ended and before run.py's code of this one runs."""

    def __init__(self, job: int):
        self.job = job

    def on_job_start(self, config, **kwargs):
        if config.hydra.job.num == self.job:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_between_two_jobs_starts_neither_and_leaves_no_dir_of_the_second(tmp_path):
    """A SIGTERM after a job ended and before the next one's code runs (a real signal, sent by
    a Hydra callback at the job's start): the next job's dir, which Hydra made, is removed, the
    sweep summary lists the finished job, and the sweep exits 143."""
    sweep = tmp_path / "sweep"
    result = run_py(*RUN[1:], "trainer.max_steps=4", "model.keep_layers=2", "seed=0,1,2", f"hydra.sweep.dir={sweep}",
                    "+hydra.callbacks.sigterm._target_=test_resume.SigtermAtJobStart", "+hydra.callbacks.sigterm.job=1",
                    "-m", PYTHONPATH=str(ROOT / "tests"))
    assert result.returncode == 143, result.stderr
    job = next(sweep.glob("1_*"), None)
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: ") and job is None
    assert result.stderr.strip().splitlines()[-1].endswith(
        " was not started; no further job starts (a sweep: its command again with skip_completed=true)")
    assert [p.name[:2] for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()] == ["0_"]
    assert [row["status"] for row in json.loads((sweep / "sweep_summary.json").read_text())] == ["completed"]


@pytest.mark.slow
def test_two_processes_on_one_sweep_share_its_jobs_with_skip_completed(tmp_path):
    """The same sweep command started twice with skip_completed=true (a second worker): each job
    trains in one process only. The second skips the job the first holds (its run.lock) and
    takes the next ones; the first then skips what the second completed; a sweep summary written
    while a job runs elsewhere says "running" for it, not "missing"."""
    sweep = tmp_path / "sweep"
    command = [*RUN, "trainer.max_steps=10", "model.keep_layers=2", "seed=0,1,2", f"hydra.sweep.dir={sweep}",
               "skip_completed=true", "-m"]
    first = start(*command)
    deadline = time.time() + 300
    while not ((jobs := list(sweep.glob("0_*"))) and (jobs[0] / "run.lock").is_file()
               and (jobs[0] / "run.lock").read_text()) and time.time() < deadline:
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # held in job 0 while the second worker runs the sweep
    try:
        second = run_py(*command)
        summary_meanwhile = json.loads((sweep / "sweep_summary.json").read_text())
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    first_stderr = first.stderr.read()
    assert second.returncode == 0, second.stderr
    job0, job1, job2 = (next(sweep.glob(f"{k}_*")) for k in range(3))
    assert f"skip: {job0} is being run by pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert [row["status"] for row in summary_meanwhile] == ["running", "completed", "completed"]
    for job in (job1, job2):
        assert f"skip: {job} already holds a completed run (skip_completed=true)" in first_stderr
    assert [row["status"] for row in json.loads((sweep / "sweep_summary.json").read_text())] == ["completed"] * 3
    for job in (job0, job1, job2):  # trained once, by one process: one start, one run's records
        assert (job / "run.log").read_text().count("optimizer adamw from step 0") == 1
        assert [r["step"] for r in records(job) if "train/loss" in r] == list(range(1, 11))


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "done"
    assert run_py(*RUN[:1], "trainer.max_steps=2", "task.train_size=32", "task.eval_size=16",
                  "tracking.mode=disabled", f"hydra.run.dir={run_dir}").returncode == 0
    result = run_py(f"resume={run_dir}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: resume=true but {str(run_dir)!r} has no checkpoint.pt to resume from")
    result = run_py(f"resume={tmp_path / 'nothing'}")
    assert result.returncode == 2 and "is not a run dir (no .hydra/overrides.yaml)" in result.stderr


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    result = run_py(*RUN, "trainer.lr=1e30", "trainer.grad_clip=null", "trainer.checkpoint_every=1",
                    f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: NonFiniteLoss: the training loss is nan at step") or "is inf" in last, last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "NonFiniteLoss" in summary["error"]
    assert (run_dir / "checkpoint.pt").is_file()  # the last good checkpoint stays


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_py("trainer.max_steps=2", "task.train_size=32", "task.eval_size=16", "tracking.mode=disabled",
                    "rank=4,100000,8", f"hydra.sweep.dir={sweep}", "-m")
    assert result.returncode == 0, result.stderr
    assert "error: rank=100000 must be an integer in [1, 384]" in result.stderr
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["job"].split("_")[0], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed"), ("2", "completed")]
    assert rows[0]["metric"] == "accuracy" and rows[0]["value"] is not None and "rank=100000" in rows[1]["error"]
    failed = json.loads((sweep / rows[1]["job"] / "summary.json").read_text())
    assert failed["status"] == "failed"
    assert f"| {rows[1]['job']} | failed |" in (sweep / "sweep_summary.md").read_text()


def test_parallel_local_sweep_with_the_joblib_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    result = run_py("trainer.max_steps=2", "task.train_size=32", "task.eval_size=16", "tracking.mode=disabled",
                    "hydra/launcher=local", "rank=2,4", f"hydra.sweep.dir={sweep}", "-m")
    assert result.returncode == 0, result.stderr
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_wandb_sweep_file_drives_run_py_with_hydra_overrides():
    """Every parameter of the sweep file is a valid override of run.py's config."""
    import yaml
    from hydra import compose, initialize_config_dir

    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_variants.yaml").read_text())
    assert sweep["program"] == "run.py" and "${args_no_hyphens}" in sweep["command"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for variant in sweep["parameters"]["variant"]["values"]:
            overrides = [f"variant={variant}", f"rank={sweep['parameters']['rank']['values'][-1]}", "seed=2"]
            cfg = compose("config", overrides=overrides)
            assert (cfg.variant.name, cfg.rank, cfg.seed) == (variant, 64, 2)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
