#!/usr/bin/env bash
# GPU acceptance run (issue 14): one command, at most 8 minutes on one H200, nothing from the network.
#
#   PYTHONPATH=/path/to/repo bash benchmarks/gpu_check.sh            # on the GPU machine
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh --dry-run           # rehearsal here: toy sizes on the CPU,
#                                                                    # with only torch/triton/transformers/peft
#                                                                    # (and their dependencies) importable
# The project comes from PYTHONPATH (default: the folder above this script). Python packages the machine
# lacks come from the wheels in benchmarks/gpu_wheels/ next to this script (bash benchmarks/gpu_wheels.sh
# downloads them; about 11 MiB): only those whose modules do not import are unpacked, into a temporary
# folder put first on PYTHONPATH. Stages, targets and outputs: benchmarks/gpu_check.py (results land in
# benchmarks/results/gpu/: summary.md, summary.csv, loss_h200.*, step_h200_step*.*, env.json, logs).
# Options after the first are passed to gpu_check.py (--budget-s, --skip STAGE..., --out DIR).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
if [ -z "${PYTHONPATH:-}" ]; then
    echo "gpu_check: PYTHONPATH is not set; taking the project from $REPO"
    export PYTHONPATH="$REPO"
fi
SITE="$(mktemp -d /tmp/mrpo_gpu_site.XXXXXX)"
trap 'rm -rf "$SITE" ${BARE:+"$BARE"}' EXIT
PYFLAGS=()
if [ "${1:-}" = "--dry-run" ] && [ "${MRPO_GPU_CHECK_FULL_ENV:-0}" != "1" ]; then
    # rehearse the bare machine: no site-packages but torch, triton, transformers, peft and their needs
    BARE="$(mktemp -d /tmp/mrpo_gpu_bare.XXXXXX)"
    EXTRA=$("$PY" -c 'import sys; print("" if sys.version_info[:2] == (3, 12) else "pillow")')
    "$PY" "$HERE/gpu_bare_env.py" "$BARE" $EXTRA > "$BARE.txt" || exit 1
    echo "gpu_check: dry run with only these distributions: $(cat "$BARE.txt")"
    rm -f "$BARE.txt"
    PYFLAGS=(-S)
    export PYTHONPATH="$BARE:$PYTHONPATH"
fi
"$PY" "${PYFLAGS[@]}" "$HERE/gpu_check.py" --unpack-wheels "$HERE/gpu_wheels" --site "$SITE" || exit 1
export PYTHONPATH="$SITE:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$REPO" && "$PY" "${PYFLAGS[@]}" "$HERE/gpu_check.py" "$@"
