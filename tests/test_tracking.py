"""Tracking: W&B failures never stop training; metrics.jsonl keeps every record."""

import json
import logging

import wandb

from training.tracking import Tracker


def test_wandb_failure_is_a_warning(tmp_path, monkeypatch, caplog):
    def broken_init(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(tmp_path, {"rank": 8}, mode="online")
    assert "W&B init failed" in caplog.text and tracker.wandb_run is None
    tracker.log({"step": 1, "train/loss": 0.5})
    tracker.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 0.5}


def test_wandb_log_failure_midway(tmp_path, caplog):
    class FlakyRun:
        id = "flaky"

        def log(self, data, step):
            raise ConnectionError("lost")

        def finish(self, exit_code=0):
            raise AssertionError("finish must not be called after W&B was switched off")

    tracker = Tracker(tmp_path, {}, mode="disabled")
    tracker.wandb_run = FlakyRun()
    with caplog.at_level(logging.WARNING):
        tracker.log({"step": 1, "train/loss": 0.5})
        tracker.log({"step": 2, "train/loss": 0.4})
    tracker.finish()
    assert caplog.text.count("W&B log failed") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
