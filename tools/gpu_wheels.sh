#!/bin/sh
# Downloads, on a machine that reaches PyPI, the wheels that tools/gpu_check.py installs on the lent GPU
# machine (Python 3.12, x86-64, no registry) into one ignored folder that the device call carries.
#
#   sh tools/gpu_wheels.sh [DIR]        # DIR defaults to .gpu_wheels; `make gpu-wheels` runs this
#
# The GPU machine's image already has torch, triton, numpy, scipy, networkx, pyparsing, six, onnx and
# onnxruntime (CPU) (see the device tool's KINDS.md). What the GPU paths still lack:
#   nvidia-cutlass  CUTLASS's Python interface (the `cutlass` collage backend); pure Python
#   pydot, treelib  its dependencies missing there (its others, cuda-python, networkx, numpy, scipy,
#                   are there, cuda-python as cuda-bindings 13; see the note in tools/gpu_check.py)
# Not carried, too large for the 64 MiB a call carries: torch-tensorrt + tensorrt (~1 GB),
# onnxruntime-gpu (~250 MB). Their backends report "absent" and their tests skip.
# Versions are pinned so that one version of each lands in DIR (two would stop the install).
set -eu
DIR=${1:-.gpu_wheels}
PYTHON=${PYTHON:-python3}
WHEELS="nvidia-cutlass==4.2.0.0 pydot==4.0.1 treelib==1.8.0"
mkdir -p "$DIR"
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DIR" $WHEELS
# keep only the pinned versions (an earlier run may have left others)
for f in "$DIR"/*.whl; do
    keep=no
    for spec in $WHEELS; do
        name=$(echo "${spec%%==*}" | tr '-' '_')
        version=${spec##*==}
        case $(basename "$f") in "$name-$version-"*) keep=yes ;; esac
    done
    if [ $keep = no ]; then echo "removing $(basename "$f") (not pinned here)"; rm -f "$f"; fi
done
ls -l "$DIR"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(cat "$DIR"/*.whl | wc -c)
echo "total: $total bytes ($(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB) in $DIR; a device call carries at most 64 MiB"
if [ "$total" -gt 33554432 ]; then echo "error: over 32 MiB of wheels leaves too little of the 64 MiB for the tree" >&2; exit 1; fi
