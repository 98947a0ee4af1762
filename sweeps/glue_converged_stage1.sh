#!/usr/bin/env bash
# Stage 1 of the converged comparison (conf/experiment/glue_minilm_converged.yaml) for one task:
# every method's rate grid on seed 0, one one-thread job at a time, sweeps in priority order
# (full and LoRA first, the headline's pair), each into a fixed dir with skip_completed=true, so
# the same command finishes a chain cut off by a time limit. After each sweep the result files of
# its finished jobs (config, summary, metrics, predictions; no weights) are copied to
# docs/results/glue_converged/runs/<sweep>/<job>/ for committing.
#
#   bash sweeps/glue_converged_stage1.sh stsb & bash sweeps/glue_converged_stage1.sh mrpc &   # 2 cores
#
# Run it from the root of the checkout whose code should train (every run of one study from the
# same commit: a config key added later would make compare.py refuse to mix them); RESULTS_DIR
# moves the copies (e.g. into another checkout). A fresh machine has lost the sweep dirs but not
# the committed result files: the script copies those back first, so skip_completed sees the jobs
# that finished.
set -u
task=$1
root=runs/sweeps/glue_converged
docs=${RESULTS_DIR:-docs/results/glue_converged/runs}
export OMP_NUM_THREADS=1
restore() {  # committed result files -> the sweep dir (only where the job dir has no summary yet)
  for job in "$docs/$1"/*/; do
    [ -f "$job/summary.json" ] || continue
    target=$root/$1/$(basename "$job")
    [ -f "$target/summary.json" ] && continue
    mkdir -p "$target" && cp "$job"/* "$target"/
  done
}
copy() {  # finished jobs of a sweep dir -> docs
  for job in "$root/$1"/*/; do
    grep -qs '"status": "completed"' "$job/summary.json" || continue
    mkdir -p "$docs/$1/$(basename "$job")"
    cp "$job"/{config.yaml,summary.json,metrics.jsonl,predictions.npz} "$docs/$1/$(basename "$job")"/
  done
}
sweep() {  # name, overrides...
  local name=${task}_s1_$1; shift
  [ -d "$docs/$name" ] && restore "$name"
  echo "$(date -Is) start $name"
  python run.py +experiment=glue_minilm_converged task="$task" "$@" skip_completed=true \
      hydra.sweep.dir="$root/$name" > "$root/$name.log" 2>&1
  echo "$(date -Is) end $name rc=$?"
  copy "$name"
}
mkdir -p "$root"
sweep full_lora variant=full,lora
sweep lora_all_linear variant=lora variant.targets=all-linear lr_grid_of=lora_all_linear
sweep head_dora_adalora_pissa variant=head,dora,adalora,pissa
