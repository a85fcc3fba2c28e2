#!/usr/bin/env bash
# End-to-end demo: synthesise an English corpus with espeak-ng, fine-tune Whisper on it with
# `accelerate launch`, print the WER before and after. Works without Hugging Face Hub access.
#
#   bash scripts/demo.sh [MODEL_DIR] [RECIPE_OVERRIDE ...]
#
#   MODEL_DIR   a local Whisper checkpoint directory. Omitted or "" (empty): openai/whisper-tiny.en,
#               fetched from the Hub once into demo/whisper-tiny.en; only where the Hub is unreachable
#               (or HF_HUB_OFFLINE=1), a tiny RANDOM Whisper made in demo/tiny-random-whisper, whose
#               WER is meaningless (the pipeline still runs end to end).
#               Pass "" to give recipe overrides with the default checkpoint.
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
#   5. print the WER before and after fine-tuning (OUTPUT_DIR/results.json) and where the model is
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
HUB_MODEL=openai/whisper-tiny.en
HUB_DIR=demo/whisper-tiny.en
RANDOM_MODEL=0
# Exit status 0: $HUB_DIR holds the checkpoint; 10: the Hub is unreachable (or offline mode is on).
# The reachability probe times out after 10 s, so a machine without network falls back quickly.
fetch_hub_model() {
    python - "$HUB_MODEL" "$HUB_DIR" <<'EOF'
import sys
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download

repo, local_dir = sys.argv[1], Path(sys.argv[2])
if (local_dir / ".complete").is_file():
    sys.exit(0)
if constants.HF_HUB_OFFLINE:
    print(f"HF_HUB_OFFLINE is set: not fetching {repo}", file=sys.stderr)
    sys.exit(10)
try:
    HfApi().model_info(repo, timeout=10)
except Exception as exc:  # no network, DNS, proxy, Hub down: all mean "use the fallback"
    print(f"the Hub is unreachable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
          file=sys.stderr)
    sys.exit(10)
snapshot_download(repo, local_dir=local_dir, allow_patterns=["*.json", "*.txt", "model.safetensors"])
(local_dir / ".complete").touch()  # a download cut short is fetched again, not used
EOF
}
if [ -z "$MODEL_DIR" ]; then
    say "fetching $HUB_MODEL into $HUB_DIR (once)"
    status=0
    fetch_hub_model || status=$?
    if [ "$status" -eq 0 ]; then
        MODEL_DIR=$HUB_DIR
    elif [ "$status" -eq 10 ]; then
        RANDOM_MODEL=1
        MODEL_DIR=demo/tiny-random-whisper
        if [ ! -f "$MODEL_DIR/config.json" ]; then
            python -c 'from toolkit.testing import make_tiny_whisper; make_tiny_whisper("demo/tiny-random-whisper")'
        fi
        cat >&2 <<EOF

########################################################################################
#  WARNING: no Hub access; training a tiny RANDOMLY INITIALISED Whisper instead of     #
#  openai/whisper-tiny.en. This checks the pipeline end to end, but its WER is         #
#  MEANINGLESS (expect ~100%). For a real result, pass a checkpoint fetched on a       #
#  machine with Hub access:                                                            #
#    hf download openai/whisper-tiny.en --local-dir whisper-tiny.en                    #
#    bash scripts/demo.sh whisper-tiny.en                                              #
########################################################################################
EOF
    else
        echo "error: fetching $HUB_MODEL failed (exit $status); rerun, or pass a local checkpoint" >&2
        exit "$status"
    fi
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

# 5. The WER before and after, and where the model is.
say "results: $OUTPUT_DIR/results.json"
python - "$OUTPUT_DIR" "$MODEL_DIR" "$RANDOM_MODEL" <<'EOF'
import json
import sys
from pathlib import Path

out, model, random_model = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
results = json.loads((out / "results.json").read_text())


def wer(metrics):
    return f"{metrics['wer']:.2f}%" if metrics else "not measured"


after = results.get("eval") or {}
print(f"WER on {after.get('num_samples', '?')} dev utterances: before fine-tuning {wer(results.get('baseline_eval'))}, "
      f"after {results.get('steps')} steps {wer(after)}" + ("  (a RANDOM model: meaningless)" if random_model else ""))
print(f"base model: {model}")
print(f"fine-tuned model: {out / 'final'}  (pipeline('automatic-speech-recognition', model='{out / 'final'}'))")
EOF
