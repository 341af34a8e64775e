#!/usr/bin/env bash
# One check of the CUDA path on a machine lent with a GPU (see bench/README.md, "GPU check"):
#   bash bench/gpu_check.sh                  # the check: tests, two gunicorn workers and bench --quick on cuda
#   bash bench/gpu_check.sh --device cpu     # the same steps on the CPU with a tiny model (the dry run)
# PYTHON picks the interpreter (default .venv/bin/python); nothing is installed, what is missing is reported.
# Exit status 0 when every step passed, 1 when one failed (the summary names it), 2 when there is no usable Python.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "gpu_check: no usable Python 3.11+ at PYTHON=$PYTHON (set PYTHON to the interpreter that has this" \
         "project's requirements; this check installs nothing)" >&2
    exit 2
fi
# The check keeps to its own --budget (450 s); this outer limit only backstops a hang in the check itself.
exec timeout --kill-after=10 480 "$PYTHON" -m bench.gpu_check --python "$PYTHON" "$@"
