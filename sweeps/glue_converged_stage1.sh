#!/usr/bin/env bash
# Stage 1 of the converged comparison (conf/experiment/glue_minilm_converged.yaml) for one task:
# every method's rate grid on seed 0, one one-thread job at a time, sweeps in priority order
# (full and LoRA first, the headline's pair), each into a fixed dir with skip_completed=true, so
# the same command finishes a chain cut off by a time limit. After each sweep the result files of
# its finished jobs (config, summary, metrics, predictions, overrides; no weights) are copied to
# docs/results/glue_converged/runs/<sweep>/<job>/ for committing. Stage 2: glue_converged_stage2.sh.
#
#   bash sweeps/glue_converged_stage1.sh stsb & bash sweeps/glue_converged_stage1.sh mrpc &   # 2 cores
#   bash sweeps/glue_converged_stage1.sh stsb added     # the methods added by issue 37, later rows
#   SWEEP_ROOT=runs/sweeps/glue_fp32 RESULTS_DIR=docs/results/glue_fp32/runs EXTRA_OVERRIDES=trainer.precision=fp32 \
#       bash sweeps/glue_converged_stage1.sh mrpc anchor     # a separate fp32 study: LoRA as its anchor, then `added`
#
# Run it from the root of the checkout whose code should train (every run of one study from the
# same commit: a config key added later would make compare.py refuse to mix them); RESULTS_DIR
# moves the copies (e.g. into another checkout). A fresh machine has lost the sweep dirs but not
# the committed result files: the script copies those back first, so skip_completed sees the jobs
# that finished.
set -u
task=$1
source "$(dirname "$0")/glue_converged_lib.sh"
sweep() {  # name, overrides...
  local name=${task}_s1_$1; shift
  [ -d "$docs/$name" ] && restore "$name"
  echo "$(date -Is) start $name"
  # shellcheck disable=SC2086  # EXTRA_OVERRIDES: words, e.g. trainer.precision=fp32 (stage 2 repeats them)
  python run.py +experiment=glue_minilm_converged task="$task" "$@" ${EXTRA_OVERRIDES:-} skip_completed=true \
      hydra.sweep.dir="$root/$name" > "$root/$name.log" 2>&1
  echo "$(date -Is) end $name rc=$?"
  copy "$name"
}
case ${2:-first} in
  first)
    sweep full_lora variant=full,lora
    sweep lora_all_linear variant=lora variant.targets=all-linear lr_grid_of=lora_all_linear
    sweep head_dora_adalora_pissa variant=head,dora,adalora,pissa ;;
  anchor)
    sweep lora variant=lora ;;
  added)
    sweep olora_corda_gralora_hira variant=olora,corda,gralora,hira
    sweep lora_fa variant=lora variant.freeze_a=true lr_grid_of=lora_fa
    sweep vera variant=vera rank=1024
    # QLoRA and LoftQ adapt every linear layer (QLoRA's setup): LoRA on every linear layer is their
    # 16-bit reference (a study that ran `first` has it already: the same sweep dir, skipped)
    sweep lora_all_linear variant=lora variant.targets=all-linear lr_grid_of=lora_all_linear
    sweep qlora variant=qlora
    # LoftQ as the authors' GLUE code runs it (yxli2123/LoftQ, glue/): 5 alternations, and the start
    # Q + SVD_r(W0 − Q) exactly, at the protocol's alpha too (docs/variants.md#loftq, "The factor s")
    sweep loftq variant=qlora variant.init=loftq variant.loftq_iter=5 variant.loftq_divide_scaling=true \
        lr_grid_of=loftq ;;
  *) echo "usage: $0 TASK [first|anchor|added]" >&2; exit 2 ;;
esac
