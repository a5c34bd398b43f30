#!/usr/bin/env bash
# Set up the MMDetection 3.3.0 reference of QueryInst (tools/reference/mmdet_queryinst.py) and
# of QueryInst-VIS, MaskTrack R-CNN (tools/reference/mmdet_masktrack.py), in a virtualenv of
# its own (CPU).
#
# What goes in, all from the package index with pip:
#   - torch and torchvision ($QUERYINST_REFERENCE_TORCH, default: the newest allowed);
#   - mmengine 0.10.7, mmcv-lite 2.2.0 and mmdet 3.3.0, without their declared dependencies
#     (they ask for opencv-python and a compiled mmcv), plus the libraries they import;
#   - one patch: mmdet 3.3.0 refuses mmcv >= 2.2.0, mmcv-lite's only 2.x release is 2.2.0,
#     so mmdet's upper bound is raised to 2.2.1. mmcv-lite has no compiled ops: the ones the
#     two models need, RoIAlign and NMS, are stood in by tools/reference/mmcv_ext_standin.py
#     at run time.
#
# Environment:
#   QUERYINST_REFERENCE_VENV   where the venv goes
#                              (default ${QUERYINST_CACHE:-~/.cache/queryinst}/mmdet_reference)
#   QUERYINST_REFERENCE_TORCH  pip requirement(s) for torch, e.g. "torch==2.14.1 torchvision==0.29.1"
#                              (default "torch torchvision"; tools/reference_check.py passes the
#                              project's own versions so that both run the same kernels)
#   QUERYINST_REFERENCE_PIP_ARGS  extra pip options for that torch install, e.g.
#                              "--index-url https://download.pytorch.org/whl/cpu" (CPU wheels,
#                              a much smaller download than the default CUDA build on Linux)
#   PYTHON                     interpreter that creates the venv (default python3, >= 3.8)
#
# Idempotent: a stamp keyed to this file and the torch requirement makes a repeated run exit
# at once. Prints the reference's interpreter on its last line.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${QUERYINST_CACHE:-$HOME/.cache/queryinst}
VENV=${QUERYINST_REFERENCE_VENV:-$CACHE/mmdet_reference}
TORCH_REQ=${QUERYINST_REFERENCE_TORCH:-torch torchvision}
TORCH_PIP_ARGS=${QUERYINST_REFERENCE_PIP_ARGS:-}
PYTHON=${PYTHON:-python3}
PY=$VENV/bin/python

key=$( { cat "$0"; echo "$TORCH_REQ|$TORCH_PIP_ARGS"; } | sha256sum | cut -c1-16)
stamp=$VENV/.reference-ready-$key
if [ -f "$stamp" ] && [ -x "$PY" ]; then
  echo "[reference] ready: $PY"
  exit 0
fi

fail() { echo "[reference] error: $*" >&2; exit 1; }

pip_install() {  # pip_install WHAT... ; a failure names the packages and the likely cause
  local log
  log=$(mktemp)
  if ! "$PY" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    fail "pip could not install: $*
  Is the package index reachable from here (network, proxy, PIP_INDEX_URL)? The reference
  needs it once; afterwards this script is a no-op. Fix the access and run it again."
  fi
  grep -v -i "warning" "$log" >&2 || true
  rm -f "$log"
}

echo "[reference] setting up MMDetection 3.3.0 in $VENV (first run: a few minutes, torch is large)"
command -v "$PYTHON" >/dev/null || fail "no interpreter '$PYTHON' (set PYTHON=...)"
if [ ! -x "$PY" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV" || fail "'$PYTHON -m venv $VENV' failed (Debian/Ubuntu: apt install python3-venv)"
fi

# shellcheck disable=SC2086  # the requirement and the options are word lists
pip_install $TORCH_PIP_ARGS $TORCH_REQ
# What mmengine, mmcv-lite and mmdet import (their own requirement lists, opencv headless).
pip_install numpy addict pyyaml yapf termcolor rich packaging Pillow opencv-python-headless \
  matplotlib scipy shapely six terminaltables tqdm pycocotools
pip_install --no-deps mmengine==0.10.7 mmcv-lite==2.2.0 mmdet==3.3.0

init=$("$PY" -c "import importlib.util as u; print(u.find_spec('mmdet').origin)")
if grep -q "^mmcv_maximum_version = '2.2.0'" "$init"; then
  sed -i "s/^mmcv_maximum_version = '2.2.0'/mmcv_maximum_version = '2.2.1'/" "$init"
fi
grep -q "^mmcv_maximum_version = '2.2.1'" "$init" \
  || fail "could not relax mmcv_maximum_version in $init (not mmdet 3.3.0?)"

# The check the reference script relies on: mmdet imports with the RoIAlign stand-in and its
# QueryInst configs are in the wheel.
"$PY" - "$HERE" <<'PYCHECK' || fail "the installed reference does not import (see above)"
import os, sys
sys.path.insert(0, sys.argv[1])
import mmcv_ext_standin
mmcv_ext_standin.install()
import mmdet, mmdet.apis  # noqa: E401
cfg = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "queryinst")
assert mmdet.__version__ == "3.3.0", mmdet.__version__
assert os.path.isdir(cfg), f"no QueryInst configs in the mmdet wheel ({cfg})"
vis = os.path.join(os.path.dirname(cfg), "masktrack_rcnn")  # the video peer's configs
assert os.path.isdir(vis), f"no MaskTrack R-CNN configs in the mmdet wheel ({vis})"
PYCHECK

rm -f "$VENV"/.reference-ready-*
touch "$stamp"
echo "[reference] ready: $PY"
echo "[reference] run: python tools/reference_check.py --image IMAGE --variant 100 (from the project's venv)"
