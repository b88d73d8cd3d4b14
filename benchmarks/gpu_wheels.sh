#!/usr/bin/env bash
# Download, here (with network), the wheels that benchmarks/gpu_check.sh needs on a GPU machine that has
# Python 3.12, torch, triton, transformers and peft (and their own dependencies) but nothing else of the
# project's and no package registry. They land in benchmarks/gpu_wheels/ (git-ignored; about 11 MiB;
# carry the folder to the machine). gpu_check.sh unpacks, per module, only what the machine lacks.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON]
#
# Pure-Python wheels (py3-none-any), pinned:
#   liger-kernel   the loss benchmark's comparison (benchmarks/bench_loss.py)
#   pytest pluggy iniconfig   the GPU tests
#   math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2   answer reward (mrpo.rewards.answer)
#   nltk joblib rouge-score absl-py six   BLEU/ROUGE of open answers (mrpo.rewards.answer; rouge-score's newest
#                  wheel is 0.0.4: 0.1.2 is published as a source archive only; same rouge_scorer API)
#   num2words      integer answers spelled out (mrpo.eval.answers; its docopt need is the CLI's only)
# One binary wheel (cp312, manylinux x86_64), only used where the machine has no Pillow:
#   pillow         images (mrpo.models.backbone imports PIL)
set -euo pipefail
PY=${1:-python3}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="$HERE/gpu_wheels"
mkdir -p "$DEST"
PURE=(liger-kernel==0.8.5 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 math-verify==0.9.0
      latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 nltk==3.10.4 joblib==1.6.0
      rouge-score==0.0.4 absl-py==2.5.1 six==1.17.0 num2words==0.5.14)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
    --platform any -d "$DEST" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" pillow==13.0.0
size=$(du -sm "$DEST" | cut -f1)
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, ${size} MiB in $DEST"
if [ "$size" -gt 64 ]; then
    echo "gpu_wheels: over the 64 MiB limit" >&2
    exit 1
fi
