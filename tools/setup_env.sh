#!/usr/bin/env bash
# Create or update the project's virtualenv: dependencies, detectron2, queryinst (editable).
# Idempotent: a stamp keyed to the dependency specification makes a repeated run a no-op.
#   VENV=.venv (default)   PYTHON=python3 (interpreter used to create the venv)
#   QUERYINST_SETUP_MIN_FREE_GB=7: free disk needed to create a new venv (0: no check)
#   QUERYINST_SETUP_INSTALLER=uv: installs requirement files with uv, or pip (tools/install_requirements.py)
# A user with a working detectron2 (e.g. a full build with compiled ops) can point VENV at
# that environment: tools/install_detectron2.py leaves an importable detectron2 untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=("$@")  # extra requirement files (make test: requirements-compare.txt), each stamped apart
install_extras() {
  for req in "${EXTRAS[@]}"; do
    local stamp_x="$VENV/.queryinst-extra-$(basename "$req")-$(sha256sum < "$req" | cut -c1-16)"
    [ -f "$stamp_x" ] && continue
    echo "[setup] installing $req"
    "$VENV/bin/python" tools/install_requirements.py -r "$req"
    rm -f "$VENV/.queryinst-extra-$(basename "$req")-"*
    touch "$stamp_x"
  done
}
key=$(cat requirements.txt pyproject.toml tools/install_detectron2.py tools/setup_env.sh \
      tools/install_requirements.py \
      | sha256sum | cut -c1-16)
stamp="$VENV/.queryinst-setup-$key"
[ -f "$stamp" ] && { install_extras; exit 0; }

echo "[setup] preparing $VENV (first run: a few minutes, torch is large)"
# A new venv takes ~6.2 GB (PyPI's torch for x86_64 is a CUDA build). Check first: pip that
# runs out of disk stops midway with "No space left on device" and leaves a broken venv.
min_gb=${QUERYINST_SETUP_MIN_FREE_GB:-7}
if [ ! -x "$VENV/bin/python" ] && [ "$min_gb" -gt 0 ]; then
  parent=$(dirname "$VENV"); mkdir -p "$parent"
  free_kb=$(df -Pk "$parent" | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt $((min_gb * 1024 * 1024)) ]; then
    echo "[setup] error: $((free_kb / 1024 / 1024)) GB free on the disk of $parent, but a new" \
      "$VENV needs about $min_gb GB (torch). Free some space, or set VENV to a path on a" \
      "larger disk (QUERYINST_SETUP_MIN_FREE_GB=0 skips this check)." >&2
    exit 1
  fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# uv where pip's settings allow (several times faster than pip), else pip
"$PY" tools/install_requirements.py -r requirements.txt
"$PY" tools/install_detectron2.py
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$PY" -W ignore -c "import detectron2, detectron2.modeling, queryinst" \
  || { echo "[setup] import check failed" >&2; exit 1; }
rm -f "$VENV"/.queryinst-setup-*
touch "$stamp"
install_extras
echo "[setup] ready: $VENV"
