#!/usr/bin/env bash
# Two checks on the converged comparison (docs/results.md §0), each at the rate stage 1 chose:
# 1. MRPC AdaLoRA without early stopping (trainer.early_stopping.patience=null), seeds 1 and 2: at
#    the chosen rate they sat at the majority class until patience stopped them at 4-4.5 epochs,
#    while seed 0 rose from epoch 2.5 and ran the whole 10 (its best at epoch 9.5). Seed 0 is not
#    rerun: it never stopped early, so it trained exactly this way already.
# 2. STS-B at 30 epochs instead of 10 (the LoRA paper trains RoBERTa-base 40 epochs on STS-B):
#    LoRA on W_q, W_v was still improving at 10 (its best at the last evaluation, every seed), so it
#    runs again with max_epochs=30, beside full fine-tuning at the same maximum so that compare.py
#    compares like with like; seeds 0-2, early stopping as in the protocol.
# Result files go to docs/results/glue_converged/runs/<sweep>/ as in stage 1; rerun to complete a
# chain cut off by a time limit (skip_completed=true, fixed sweep dirs).
#
#   bash sweeps/glue_converged_ablations.sh                  # all three, one after another
#   bash sweeps/glue_converged_ablations.sh stsb_x30_full    # only the named sweeps (two one-thread
#                                                            # streams on 2 cores: split the names)
# Run from the checkout that trained stages 1 and 2.
set -u
source "$(dirname "$0")/glue_converged_lib.sh"
only=("$@")
sweep() {  # task, sweep name, overrides...
  local task=$1 name=$2; shift 2
  [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " == *" $name "* ]] && return
  [ -d "$docs/$name" ] && restore "$name"
  echo "$(date -Is) start $name"
  python run.py +experiment=glue_minilm_converged task="$task" "$@" skip_completed=true \
      hydra.sweep.dir="$root/$name" > "$root/$name.log" 2>&1
  echo "$(date -Is) end $name rc=$?"
  copy "$name"
}
sweep mrpc mrpc_nostop_adalora variant=adalora lr_point=p3 seed=1,2 trainer.early_stopping.patience=null
sweep stsb stsb_x30_lora variant=lora lr_point=p1 max_epochs=30 seed=0,1,2
sweep stsb stsb_x30_full variant=full lr_point=p2 max_epochs=30 seed=0,1,2
