#!/usr/bin/env python
"""What a run pays before it trains: a tiny ``run.py`` run (4 steps, 64 examples) as the project
runs it, against the same run with transformers' Trainer modules imported first, which is what
``from transformers import get_scheduler`` (and ``set_seed``) used to import, and with them peft and
bitsandbytes when installed (training/optim.py writes the schedules itself since).

    python bench/startup.py                    # 5 rounds
    python bench/startup.py --rounds 3 --json out.json

Each round runs both commands in fresh interpreters, one after the other (the first alternating),
so load from other jobs on the machine slows both alike; the ratio of the medians is the result.
Wall-clock seconds of the whole process: start-up, model load, 4 steps, evaluation, writing the run dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=2", "task.train_size=64",
        "task.eval_size=32", "tracking.mode=disabled"]
TRAINER_MODULES = "import transformers.trainer_utils, transformers.optimization"
WAYS = {
    "run.py as it is": [],
    "with transformers' Trainer modules imported first": [
        "-c", (f"{TRAINER_MODULES}; import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")],
}


def timed_run(prefix: list[str], run_dir: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *prefix, str(ROOT / "run.py"), *TINY, f"hydra.run.dir={run_dir}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def imported(module: str, prefix: str = "") -> bool:
    code = f"{prefix}; import sys, run, training.experiment; print({module!r} in sys.modules)"
    return subprocess.run([sys.executable, "-c", code.lstrip("; ")], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip().endswith("True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
            for way in order:
                times[way].append(timed_run(WAYS[way], Path(tmp) / f"{r}_{len(times[way])}_{order.index(way)}"))
    medians = {way: statistics.median(t) for way, t in times.items()}
    fast, slow = medians.values()
    result = {"rounds": args.rounds, "seconds": times, "median_s": medians, "ratio": slow / fast,
              "peft_imported": {"run.py": imported("peft"), "with Trainer modules": imported("peft", TRAINER_MODULES)}}
    for way, median in medians.items():
        print(f"{way}: median {median:.1f} s over {args.rounds} ({', '.join(f'{t:.1f}' for t in times[way])})")
    print(f"ratio {result['ratio']:.2f}x; peft imported: {result['peft_imported']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
