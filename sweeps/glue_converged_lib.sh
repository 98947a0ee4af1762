# Shared by sweeps/glue_converged_stage{1,2}.sh: where sweeps run, where their result files go, and
# the two copies between them. Sourced, not run.
# A study of its own (e.g. in fp32 on a CPU without native bf16: BENCHMARKS.md) gets its own SWEEP_ROOT
# and RESULTS_DIR, so that two_stage.py and compare.py never pool its runs with this one's.
root=${SWEEP_ROOT:-runs/sweeps/glue_converged}      # the sweep dirs, in the checkout that trains
docs=${RESULTS_DIR:-docs/results/glue_converged/runs}   # the committed result files (no weights)
export OMP_NUM_THREADS=1                            # two one-thread jobs on 2 cores
mkdir -p "$root"

restore() {  # committed result files -> the sweep dir (only where the job dir has no summary yet)
  for job in "$docs/$1"/*/; do
    [ -f "$job/summary.json" ] || continue
    target=$root/$1/$(basename "$job")
    [ -f "$target/summary.json" ] && continue
    mkdir -p "$target" && cp -r "$job"/. "$target"/
  done
}

copy() {  # finished jobs of a sweep dir -> docs: config, summary, metrics, predictions, Hydra's overrides
  for job in "$root/$1"/*/; do
    grep -qs '"status": "completed"' "$job/summary.json" || continue
    local to=$docs/$1/$(basename "$job")
    mkdir -p "$to/.hydra"
    cp "$job"/{config.yaml,summary.json,metrics.jsonl,predictions.npz} "$to"/
    [ -f "$job/.hydra/overrides.yaml" ] && cp "$job/.hydra/overrides.yaml" "$to/.hydra/"
    rmdir "$to/.hydra" 2>/dev/null || true
  done
}
