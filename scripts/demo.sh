#!/usr/bin/env bash
# End-to-end demo: synthesise an English corpus with espeak-ng, fine-tune Whisper on it with
# `accelerate launch`, print the results. Needs no Hugging Face Hub access.
#
#   bash scripts/demo.sh [MODEL_DIR] [RECIPE_OVERRIDE ...]
#
#   MODEL_DIR   a local Whisper checkpoint directory, e.g. a downloaded openai/whisper-tiny.en
#               (`hf download openai/whisper-tiny.en --local-dir whisper-tiny.en` on a
#               machine with Hub access). Omitted or "" (empty): a tiny RANDOM Whisper is created in
#               demo/tiny-random-whisper; the pipeline runs end to end but its WER is meaningless.
#               Pass "" to give recipe overrides without a checkpoint.
#   overrides   dotted recipe overrides for recipes/demo.yaml, e.g. training.max_steps=20
#
# Environment: DEMO_TRAIN (default 400) and DEMO_DEV (default 100) utterances to synthesise;
# DEMO_JOBS espeak-ng processes at once (default: all cores).
#
# What it does, each step skipped when already done (safe to re-run):
#   1-2. scripts/setup.sh: apt-get install espeak-ng (python3-venv if needed); .venv with
#      `pip install torch==2.13.0` first (a bare torch requirement could pull a CUDA build), then the toolkit
#   3. `python -m toolkit synth --out demo/data` (re-made when DEMO_TRAIN/DEMO_DEV change)
#   4. accelerate launch -m toolkit train --config recipes/demo.yaml model.name_or_path=MODEL_DIR ...
#      CPU only: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 (without
#      --multi_gpu a CPU box silently starts one process); N GPUs: --num_processes N (--multi_gpu if N > 1).
#      Training resumes from the last checkpoint in output.dir (default demo/run): delete it to start over.
#   5. print OUTPUT_DIR/results.json
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL_DIR="${1:-}"
if [ $# -gt 0 ]; then shift; fi
DEMO_TRAIN="${DEMO_TRAIN:-400}"
DEMO_DEV="${DEMO_DEV:-100}"
DEMO_JOBS="${DEMO_JOBS:-$(nproc)}"
DATA=demo/data

say() { printf '\n==> %s\n' "$*" >&2; }

# 1-2. System packages and the Python environment (shared with the test set-up).
bash scripts/setup.sh
export VIRTUAL_ENV="$PWD/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"

# 3. Corpus.
rows() { if [ -f "$1/metadata.csv" ]; then echo $(($(wc -l <"$1/metadata.csv") - 1)); else echo -1; fi; }
if [ "$(rows "$DATA/train")" -eq "$DEMO_TRAIN" ] && [ "$(rows "$DATA/dev")" -eq "$DEMO_DEV" ]; then
    say "using the existing corpus in $DATA ($DEMO_TRAIN train, $DEMO_DEV dev)"
else
    say "synthesising $DATA with espeak-ng ($DEMO_TRAIN train, $DEMO_DEV dev utterances)"
    python -m toolkit synth --out "$DATA" --train "$DEMO_TRAIN" --dev "$DEMO_DEV" --jobs "$DEMO_JOBS" --overwrite
fi

# 4. Model.
if [ -z "$MODEL_DIR" ]; then
    MODEL_DIR=demo/tiny-random-whisper
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        python -c 'from toolkit.testing import make_tiny_whisper; make_tiny_whisper("demo/tiny-random-whisper")'
    fi
    cat >&2 <<EOF

########################################################################################
#  WARNING: no MODEL_DIR given; training a tiny RANDOMLY INITIALISED Whisper.          #
#  This checks the pipeline end to end, but its WER is MEANINGLESS (expect ~100%).     #
#  For a real result, pass a local checkpoint, e.g. openai/whisper-tiny.en fetched on  #
#  a machine with Hub access:                                                          #
#    hf download openai/whisper-tiny.en --local-dir whisper-tiny.en                    #
#    bash scripts/demo.sh whisper-tiny.en                                              #
########################################################################################
EOF
elif [ ! -e "$MODEL_DIR" ]; then
    echo "warning: $MODEL_DIR is not a local path; it will be fetched from the Hub as a model id" >&2
fi

# 5. Train (and evaluate) on every available device.
OUTPUT_DIR=demo/run
for arg in "$@"; do
    case "$arg" in output.dir=*) OUTPUT_DIR="${arg#output.dir=}" ;; esac
done
GPUS=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$GPUS" -eq 0 ]; then
    export ACCELERATE_USE_CPU=1
    # torchrun would give each process one thread; split the cores between the two processes instead.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(($(nproc) / 2 > 0 ? $(nproc) / 2 : 1))}"
    launch=(accelerate launch --multi_gpu --num_processes 2)
elif [ "$GPUS" -eq 1 ]; then
    launch=(accelerate launch --num_processes 1)
else
    launch=(accelerate launch --multi_gpu --num_processes "$GPUS")
fi
launch+=(--num_machines 1 --mixed_precision no --dynamo_backend no)
cmd=("${launch[@]}" -m toolkit train --config recipes/demo.yaml "model.name_or_path=$MODEL_DIR"
     "data.train=$DATA/train" "data.eval=$DATA/dev" "$@")
say "$([ "$GPUS" -eq 0 ] && echo 'ACCELERATE_USE_CPU=1 ')${cmd[*]}"
"${cmd[@]}"

say "results: $OUTPUT_DIR/results.json"
cat "$OUTPUT_DIR/results.json"
echo
