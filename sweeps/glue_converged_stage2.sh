#!/usr/bin/env bash
# What follows stage 1 of the converged comparison for one task, as analysis/two_stage.py plans it:
# each method's grid extended where its choice is at an edge (re-planned after every extension,
# until no choice is), then the chosen rate on seeds 1 and 2. Every command writes into a fixed
# sweep dir with skip_completed=true, so the same command finishes a chain cut off by a time limit;
# result files are copied to docs/results/glue_converged/runs/ after each command, as in stage 1.
#
#   bash sweeps/glue_converged_stage2.sh mrpc      # from the checkout that trained stage 1
set -u
task=$1
here=$(cd "$(dirname "$0")" && pwd)
source "$here/glue_converged_lib.sh"
for name in "$docs"/"${task}"_s[12]*; do [ -d "$name" ] && restore "$(basename "$name")"; done
previous=
while true; do
  commands=$(python "$here/../analysis/two_stage.py" "$root/${task}"_s1*/ --commands --sweep-root "$root")
  [ "$commands" = "$previous" ] && break  # every command ran and the plan did not change: done
  previous=$commands
  while read -r command; do
    [ -n "$command" ] || continue
    sweep=$(basename "${command##*hydra.sweep.dir=}")
    echo "$(date -Is) start $sweep: $command"
    eval "$command" > "$root/$sweep.log" 2>&1
    echo "$(date -Is) end $sweep rc=$?"
    copy "$sweep"
  done <<< "$commands"
done
echo "$(date -Is) $task: nothing left to run"
