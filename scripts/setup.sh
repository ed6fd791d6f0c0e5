#!/usr/bin/env bash
# Create .venv and install torch + fbgemm + torchrec in the order that works on CPU
# (DESIGN.md section 6), then this project without letting pip pull fbgemm-gpu back in.
# Re-running is fast: a stamp file records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
WANT="v1 $(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check"
$PIP "torch==2.13.0"
$PIP "fbgemm-gpu-cpu==1.8.0"
$PIP --no-deps "torchrec==1.8.0"
$PIP tensordict "torchmetrics==1.0.3" pyre-extensions iopath
$PIP numpy pandas scikit-learn pyarrow tqdm matplotlib pytest hypothesis ruff
$PIP --no-deps -e .
echo "$WANT" > "$STAMP"
echo "setup: environment ready in $VENV"
