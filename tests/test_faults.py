"""Faults injected on purpose through run.py (issue 32): each leaves a run dir that tells the truth,
and a user's mistake gets one line, exit 2, no traceback."""

import json
import socket
import time

import pytest
from test_causal_lm import needs_smollm2
from test_run import run_py

from training import rundir
from training.trainer import check_divergence

SMALL = ["model.keep_layers=2", "task.train_size=160", "task.eval_size=64", "trainer.batch_size=16",
         "tracking.mode=disabled"]


def test_divergence_is_the_loss_staying_far_above_its_minimum_and_its_start():
    rising = [0.5, 0.3, 2.0, 9.0, 12.0]
    assert check_divergence(0.69, rising, 10, 3) is None  # 2.0 is not above 10 x 0.3
    assert "for 3 logs in a row (now 1200)" in check_divergence(0.69, [0.5, 0.3, 40.0, 90.0, 1200.0], 10, 3)
    assert check_divergence(0.69, [0.5, 0.3, 40.0, 0.2, 1200.0], 10, 3) is None  # not in a row
    assert check_divergence(0.69, [0.001, 0.0001, 0.05, 0.08, 0.1], 10, 3) is None  # far above the minimum, below the start
    assert check_divergence(0.69, [0.3, 40.0, 90.0, 1200.0], None, 3) is None  # off
    assert check_divergence(0.69, [40.0, 90.0], 10, 3) is None  # too few logs to say
    assert check_divergence(0.69, [8e5, 2e6, 1e7], 10, 3)  # blown up before the first log: the first step says where it began


def test_a_diverging_run_ends_failed_not_completed(tmp_path):
    run_dir = tmp_path / "diverged"
    result = run_py(*SMALL, "trainer.max_steps=40", "trainer.log_every=2", "trainer.lr=1e6", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Diverged: at step ") and "lower trainer.lr" in last, last
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("Diverged: ")
    # the same run without the guard "completes" with a loss in the millions: the guard is what caught it
    run_dir = tmp_path / "unguarded"
    result = run_py(*SMALL, "trainer.max_steps=12", "trainer.log_every=2", "trainer.lr=1e6",
                    "trainer.divergence.factor=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["train/loss"] for line in (run_dir / rundir.METRICS).read_text().splitlines()
              if "train/loss" in line]
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "completed" and min(losses) > 1e4


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"), ("abc", "'abc'"), ("-1", "-1.0")])
def test_a_bad_rate_is_one_line_before_anything_and_leaves_no_run_dir(tmp_path, value, shown):
    run_dir = tmp_path / "refused"
    result = run_py(*SMALL, f"trainer.lr={value}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: trainer.lr={shown} must be null or a finite number > 0"
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert not run_dir.exists()  # Hydra had made it; nothing of the run's was written, so it is gone


def run_with_file_size_limit(limit_bytes, *args):
    """run.py with every file it writes limited to ``limit_bytes`` (RLIMIT_FSIZE), as a full disk
    would stop it: a write past the limit fails with EFBIG instead of killing the process."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    from test_run import ROOT

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit, check=False)


def killed_run(tmp_path, min_step, whole=True):
    """(an uninterrupted run, the same run killed after its checkpoint at ``min_step`` or later)."""
    from test_resume import RUN, kill_after_checkpoint, start

    args = [*RUN, "model.keep_layers=2"]
    if whole:
        assert run_py(*args, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    proc = start(*args, f"hydra.run.dir={tmp_path / 'broken'}")
    kill_after_checkpoint(proc, tmp_path / "broken" / rundir.CHECKPOINT, min_step=min_step)
    return tmp_path / "whole", tmp_path / "broken"


def test_a_full_disk_ends_the_run_failed_with_its_cause_and_the_last_checkpoint_intact(tmp_path):
    import torch
    from test_resume import records

    whole, broken = killed_run(tmp_path, min_step=5)
    saved = (broken / rundir.CHECKPOINT).read_bytes()
    step = torch.load(broken / rundir.CHECKPOINT, weights_only=True)["step"]

    # the resumed run can write small files but not its next checkpoint
    result = run_with_file_size_limit(len(saved) // 2, f"resume={broken}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: OSError: [Errno 27] File too large while writing {broken / rundir.CHECKPOINT} (the previous one is kept)")
    summary = json.loads((broken / rundir.SUMMARY).read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert (broken / rundir.CHECKPOINT).read_bytes() == saved  # the last good checkpoint, untouched
    assert [p.name for p in broken.iterdir() if p.name.endswith(".tmp")] == []  # no partial file left
    assert torch.load(broken / rundir.CHECKPOINT, weights_only=True)["step"] == step

    # with room again, resuming finishes the run as if nothing had happened
    assert run_py(f"resume={broken}").returncode == 0
    assert json.loads((broken / rundir.SUMMARY).read_text())["eval"] == json.loads((whole / rundir.SUMMARY).read_text())["eval"]
    assert records(broken) == records(whole)


def test_a_torn_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    from test_resume import records

    whole, broken = killed_run(tmp_path, min_step=5)
    with (broken / rundir.METRICS).open("a") as f:
        f.write('{"step": 7, "train/lo')  # a write cut short
    lines = len((broken / rundir.METRICS).read_text().splitlines())
    result = run_py(f"resume={broken}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"metrics.jsonl line {lines} is not a whole record" in result.stdout + result.stderr
    assert records(broken) == records(whole)


def test_an_unreadable_summary_counts_as_not_completed_everywhere(tmp_path, capsys):
    from analysis import collect_runs

    sweep = tmp_path / "sweep"
    args = [*SMALL, "trainer.max_steps=2", "task.train_size=32", "task.eval_size=16", "seed=0,1",
            f"hydra.sweep.dir={sweep}"]
    assert run_py(*args, "-m").returncode == 0
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    (jobs[1] / rundir.SUMMARY).write_text("")  # what a full disk left before summaries were written atomically

    capsys.readouterr()
    assert collect_runs.main([str(sweep)]) == 0
    printed = capsys.readouterr()
    assert f"skipped: {jobs[1] / rundir.SUMMARY} is unreadable" in printed.err and jobs[0].name in printed.out

    result = run_py(*args, "skip_completed=true", "-m")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skip_completed: {jobs[1] / rundir.SUMMARY} is unreadable" in result.stderr
    assert f"skip: {jobs[0]} already holds a completed run" in result.stderr
    assert json.loads((jobs[1] / rundir.SUMMARY).read_text())["status"] == "completed"  # ran again
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_a_damaged_checkpoint_falls_back_to_the_one_before_it(tmp_path):
    from test_resume import records

    whole, broken = killed_run(tmp_path, min_step=10)
    assert not (whole / "checkpoint.previous.pt").exists()  # both removed once the run completed
    assert (broken / "checkpoint.previous.pt").is_file()
    (broken / rundir.CHECKPOINT).write_bytes(b"\x8f\x02 not a checkpoint" * 100)  # overwritten by accident
    result = run_py(f"resume={broken}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"{broken / rundir.CHECKPOINT} is unreadable (UnpicklingError); resuming from checkpoint.previous.pt "
            "instead") in result.stdout + result.stderr
    assert json.loads((broken / rundir.SUMMARY).read_text())["eval"] == json.loads((whole / rundir.SUMMARY).read_text())["eval"]
    assert records(broken) == records(whole)


def test_no_readable_checkpoint_is_one_line_that_says_what_to_do(tmp_path):
    _, broken = killed_run(tmp_path, min_step=10, whole=False)
    (broken / rundir.CHECKPOINT).write_bytes(b"")
    (broken / "checkpoint.previous.pt").write_bytes(b"\x00" * 64)
    result = run_py(f"resume={broken}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: {broken / rundir.CHECKPOINT} is unreadable (EOFError); {broken / 'checkpoint.previous.pt'} "
                    "is unreadable (UnpicklingError) and no earlier checkpoint loads: the run cannot be continued; "
                    "start it again without resume (or put back a copy of the file)"), last
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr


def test_a_resume_under_a_different_config_is_refused_naming_the_keys_and_changes_nothing(tmp_path):
    """The issue's case: ``hydra.run.dir=<run> resume=true`` with the run's overrides left off
    would continue a 30-step schedule as a 300-step one."""
    _, broken = killed_run(tmp_path, min_step=5, whole=False)

    def files():  # all but Hydra's log, which says what was tried, and the killed run's lock (taken over)
        return {p.relative_to(broken): p.read_bytes() for p in broken.rglob("*")
                if p.is_file() and p.name not in ("run.log", rundir.LOCK)}

    before = files()
    result = run_py("model.keep_layers=2", "tracking.mode=disabled", f"hydra.run.dir={broken}", "resume=True")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: resume: the config differs from the one the checkpoint was trained with in "), last
    assert "task.train_size (112 -> 4000), trainer.batch_size (16 -> 32)" in last and " and 1 more;" in last
    assert last.endswith("resume_changes=[task.eval_size,task.train_size,trainer.batch_size,trainer.checkpoint_every,"
                         "trainer.eval_every,trainer.log_every,trainer.max_steps]")
    assert "Traceback" not in result.stderr
    assert files() == before  # nothing cut back or rewritten, and the refused attempt's overrides not kept
    assert run_py(f"resume={broken}").returncode == 0  # the run's own settings still resume it


def test_a_deliberate_change_is_recorded_and_the_first_overrides_are_kept(tmp_path):
    _, broken = killed_run(tmp_path, min_step=5, whole=False)
    first = (broken / ".hydra" / "overrides.yaml").read_text()
    result = run_py(f"resume={broken}", "trainer.max_steps=40", "resume_changes=[trainer.max_steps]")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((broken / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    [resumed] = summary["resumes"]
    assert resumed["changed"] == {"trainer.max_steps": [30, 40]} and resumed["step"] >= 5
    assert (broken / ".hydra" / "overrides.yaml").read_text() == first  # the first run's, untouched
    assert "trainer.max_steps=40" in (broken / ".hydra" / "resumed_1" / "overrides.yaml").read_text()
    assert "max_steps: 40" in (broken / rundir.CONFIG).read_text()  # config.yaml: what trained last


def test_a_run_dir_cannot_choose_hydra_settings_for_the_resume(tmp_path):
    """A crafted ``.hydra/overrides.yaml`` naming a callback: resume drops it, with a warning."""
    _, broken = killed_run(tmp_path, min_step=5, whole=False)
    overrides = broken / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- +hydra.callbacks.evil._target_=os.system\n- hydra/launcher=basic\n")
    result = run_py(f"resume={broken}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("resume ignores 2 setting(s) of " in result.stderr
            and "that are not config overrides: +hydra.callbacks.evil._target_=os.system hydra/launcher=basic" in result.stderr)
    [resumed] = json.loads((broken / rundir.SUMMARY).read_text())["resumes"]
    assert resumed["changed"] == {}  # the crafted settings changed nothing


def test_a_second_process_in_a_running_run_dir_is_refused_and_touches_nothing(tmp_path):
    from test_resume import start

    run_dir = tmp_path / "busy"
    first = start(*SMALL, "trainer.max_steps=60", "trainer.log_every=1", f"hydra.run.dir={run_dir}")
    deadline = time.time() + 120
    while not (run_dir / rundir.LOCK).exists() and time.time() < deadline:
        time.sleep(0.05)
    while not (run_dir / rundir.LOCK).read_text() and time.time() < deadline:
        time.sleep(0.05)
    lock = json.loads((run_dir / rundir.LOCK).read_text())
    assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    import signal
    first.send_signal(signal.SIGSTOP)  # held mid-run while the second starts, however loaded the machine
    try:
        second = run_py(*SMALL, "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} is in use by pid {first.pid} on "), second.stderr
    assert "Traceback" not in second.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides  # Hydra's files too are the first run's
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60
    steps = [json.loads(line)["step"] for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 60  # one run's records, in order
    assert (run_dir / rundir.LOCK).read_text() == ""  # released at the end: no record left


def test_a_lock_left_by_a_dead_process_is_taken_over_and_logged(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / rundir.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                   "process_start": "1", "started": "2026-01-01T00:00:00+0000"}))
    result = run_py(*SMALL, "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"taking over the lock of a run that is gone (pid {dead.pid} on {socket.gethostname()})" in result.stdout + result.stderr
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "completed"
    assert (run_dir / rundir.LOCK).read_text() == ""


def test_a_sweep_job_whose_dir_is_in_use_writes_nothing_there_and_the_others_run(tmp_path):
    """The lock itself (not only the check before Hydra starts): a sweep whose job 0 dir is held."""
    sweep = tmp_path / "sweep"
    held = sweep / "0_s0"
    with rundir.owned(held):
        result = run_py(*SMALL, "trainer.max_steps=2", "seed=0,1", f"hydra.sweep.dir={sweep}",
                        "hydra.sweep.subdir=${hydra.job.num}_s${seed}", "-m")
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"error: {held} is in use by pid " in result.stderr
        assert not (held / rundir.SUMMARY).exists() and not (held / rundir.CONFIG).exists()
    assert json.loads((sweep / "1_s1" / rundir.SUMMARY).read_text())["status"] == "completed"


def test_a_look_at_a_lock_does_not_make_its_owner_fail_and_a_look_at_a_held_one_names_the_owner(tmp_path):
    """``check_free`` (another worker's look, a sweep summary) holds a shared lock for a moment:
    a run that takes the dir in that moment waits for it rather than reporting the dir in use."""
    import fcntl
    import os
    import threading

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.LOCK).write_text("")
    look = os.open(run_dir / rundir.LOCK, os.O_RDONLY)
    fcntl.flock(look, fcntl.LOCK_SH)  # a look in progress, ended 0.3 s from now
    threading.Timer(0.3, os.close, [look]).start()
    rundir.check_free(run_dir)  # looks share the lock (a shared flock, which NFS grants on a read-only file)
    with rundir.owned(run_dir):
        rundir.check_free(tmp_path / "never_run")  # no lock file: free
        with pytest.raises(rundir.InUse, match=f"is in use by pid {os.getpid()} on {socket.gethostname()} "):
            rundir.check_free(run_dir)
    rundir.check_free(run_dir)  # released

def test_job_dir_names_hash_paths_and_long_values_and_stay_one_short_folder():
    from training.sweep import MAX_NAME, job_dirname

    assert job_dirname(["variant=lora", "rank=8", "tracking.mode=online"], ["tracking.mode"]) == "rank=8,variant=lora"
    path = job_dirname(["task.glue_dir=/data/glue/v1/MRPC", "seed=1"], [])
    assert path.startswith("seed=1,task.glue_dir=#") and "/" not in path  # sorted, as Hydra's override_dirname
    assert job_dirname(["variant.targets=[query,value]"], []) == "variant.targets=_query_value_"
    many = [f"trainer.setting_number_{i}={i * 1000}" for i in range(15)]
    name = job_dirname(many, [])
    assert len(name) <= MAX_NAME and "/" not in name and name.startswith("setting_number_0=0,")
    assert name == job_dirname(many, []) and name != job_dirname([*many[:-1], "trainer.setting_number_14=1"], [])


def test_a_sweep_with_path_valued_and_many_overrides_gets_flat_dirs_and_counts_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    many = ["trainer.weight_decay=0.0", "trainer.warmup_ratio=0.06", "trainer.grad_clip=1.0", "trainer.log_every=1",
            "trainer.eval_batch_size=64", "trainer.eval_at_start=false", "trainer.keep_best=false",
            "trainer.group_by_length=false", "trainer.gradient_checkpointing=false", "tracking.project=a_long_name",
            "tracking.tags=[first_tag_of_this_sweep,second_tag_of_this_sweep]"]
    result = run_py(*SMALL, "trainer.max_steps=2", "tracking.group=/a/b/c/d/e/f/g/h", *many, "seed=0,1",
                    f"hydra.sweep.dir={sweep}", "-m")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"] and all(len(p.name) <= 100 for p in jobs)
    assert all((p / rundir.SUMMARY).is_file() for p in jobs)  # each job one folder, directly in the sweep dir
    assert "tracking.group=/a/b/c/d/e/f/g/h" in (jobs[0] / ".hydra" / "overrides.yaml").read_text()  # all of them kept
    assert len(json.loads((sweep / "sweep_summary.json").read_text())) == 2
    assert "sweep summary: 2 of 2 jobs completed" in result.stdout + result.stderr
    # a job dir nested deeper (a hand-set subdir) is still counted
    nested = tmp_path / "nested"
    result = run_py(*SMALL, "trainer.max_steps=2", "seed=0,1", f"hydra.sweep.dir={nested}",
                    "hydra.sweep.subdir=by_seed/${seed}", "-m")
    assert "sweep summary: 2 of 2 jobs completed" in result.stdout + result.stderr, result.stderr[-2000:]


def test_when_the_failure_cannot_be_recorded_the_error_reported_is_the_write_that_failed_first(tmp_path, monkeypatch):
    """A run dir made read-only mid-run: the checkpoint write fails first, then the failed
    summary's; the error that reaches the user names the checkpoint. (In-process, with both
    writes failing as a read-only dir makes them: tests run as root, for whom chmod is no barrier.)"""
    import errno

    from hydra import compose, initialize_config_dir
    from test_run import ROOT

    from training import checkpoint, experiment

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, f"Read-only file system while writing {path} (the previous one is kept)")

    monkeypatch.setattr(checkpoint, "write", read_only)
    monkeypatch.setattr(rundir, "write_summary", lambda run_dir, summary: read_only(run_dir / rundir.SUMMARY))
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", [*SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2"])
    with pytest.raises(OSError, match=r"while writing .*checkpoint\.pt"):
        experiment.run_experiment(cfg, tmp_path / "read_only")


def hide(tmp_path, module):
    """A PYTHONPATH entry under which ``import <module>`` fails, as if it were not installed."""
    import os

    package = tmp_path / "hidden" / module.replace(".", "/")
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError('{module} hidden by the test')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "hidden"), "LORA_VARIANTS_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def run_py_env(env, *args):
    import subprocess
    import sys

    from test_run import ROOT
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@needs_smollm2
def test_a_missing_package_of_the_llm_path_is_named_in_one_line(tmp_path):
    # gguf hidden (hiding accelerate would break peft, which the test extra installs, at import)
    result = run_py_env(hide(tmp_path, "gguf"), "model=smollm2", "task=sft_smoke", "trainer.max_steps=1",
                        "tracking.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model.gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf' needs gguf, which is not installed; "
        'pip install -e ".[llm]" (or pip install gguf)')


def test_a_missing_launcher_plugin_is_named_in_one_line(tmp_path):
    result = run_py_env(hide(tmp_path, "hydra_plugins.hydra_joblib_launcher"), "hydra/launcher=local",
                        "variant=lora,dora", "-m")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: hydra/launcher=local needs hydra-joblib-launcher, which is not installed; "
        'pip install -e ".[scale]" (or pip install hydra-joblib-launcher)')


def test_a_conversion_cut_off_midway_is_removed_at_the_next_start(tmp_path, monkeypatch):
    """A GGUF conversion killed midway leaves ``<model>.partial-<pid>-*`` (187 MB for SmolLM2); the
    next load of a GGUF removes it, and leaves a live process's conversion alone."""
    import os
    import subprocess
    import sys

    from training.models import ModelSource, gguf_as_folder

    monkeypatch.setenv("LORA_VARIANTS_CACHE", str(tmp_path / "cache"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache" / "gguf"
    host = socket.gethostname()
    cut_off = cache / f"model-0123456789ab.partial-{host}-{dead.pid}-x1y2"
    live = cache / f"model-0123456789ab.partial-{host}-{os.getpid()}-z3w4"
    elsewhere = cache / f"model-0123456789ab.partial-another-host-{dead.pid}-v5u6"  # a shared cache
    for partial in (cut_off, live, elsewhere):
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # not a real one: its conversion fails, after the clean-up
    with pytest.raises(Exception):  # noqa: B017  (the conversion fails its own way; what matters is the clean-up)
        gguf_as_folder(ModelSource(str(tmp_path), "model.gguf"))
    assert not cut_off.exists() and live.is_dir() and elsewhere.is_dir()
