#!/usr/bin/env bash
# Time tools/install_requirements.py's install of requirements.txt into fresh venvs: pip
# against uv, with uv's cache as it is and with an empty one.
# One install at a time, in a temporary folder (about 6 GB at a time, 12 GB with the empty
# cache), removed at the end. Usage: bash tools/benchmark_install.sh [ROUNDS (default 2)]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
field() { lscpu | sed -n "s/^$1: *//p"; }
echo "CPU: $(field 'Model name') (family $(field 'CPU family'), model $(field 'Model')); $(nproc)" \
  "cores; $("$PYTHON" --version)"
timed() {  # label, command...: a fresh venv, then the command's wall time
  rm -rf "$work/venv" "$work/uv-cache"; "$PYTHON" -m venv "$work/venv"
  local start end; start=$(date +%s.%N); "${@:2}" >/dev/null; end=$(date +%s.%N)
  printf '%-34s %6.1f s\n' "$1" "$(echo "$end - $start" | bc)"
}
for round in $(seq "$rounds"); do
  echo "round $round"
  timed "pip install -r requirements.txt" env QUERYINST_SETUP_INSTALLER=pip \
    "$work/venv/bin/python" tools/install_requirements.py -r requirements.txt
  timed "uv, its cache as it is" env QUERYINST_SETUP_INSTALLER=uv \
    "$work/venv/bin/python" tools/install_requirements.py -r requirements.txt
  timed "uv, an empty cache" env QUERYINST_SETUP_INSTALLER=uv UV_CACHE_DIR="$work/uv-cache" \
    "$work/venv/bin/python" tools/install_requirements.py -r requirements.txt
done
