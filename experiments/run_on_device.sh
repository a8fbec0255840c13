#!/usr/bin/env bash
# How experiments/results/paper-gpu was produced: run on a GPU machine that has PyTorch but no
# network, from the repository root, with .gpu/ holding robench's wheel (pip wheel --no-deps -w .gpu .),
# the reference AutoAttack package (.gpu/site/pyautoattack) and the CIFAR-10 JPEG archive.
#   bash experiments/run_on_device.sh OUT_DIR
set -euo pipefail
out=${1:?usage: run_on_device.sh OUT_DIR}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .gpu/robench-*.whl
export PYTHONPATH=/tmp/site:$PWD/.gpu/site
mkdir -p ../shared/data
[ -f ../shared/data/cifar10-jpeg.tar.gz ] || cp .gpu/cifar10-jpeg.tar.gz ../shared/data/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
w=${WORKDIR:-/tmp/paper-gpu}
status=0
repo=$PWD
# From /tmp, so that the installed robench (not the checkout's folder) is imported.
(cd /tmp && timeout "${BUDGET_S:-520}" python3 -m robench experiment "$repo/experiments/paper-gpu.toml" \
    --workdir "$w" --out "$w/report" --no-progress "${@:2}") || status=$?
cp "$w/progress.log" "$out/" 2>/dev/null || true
# Everything but the weights (the per-example outcomes, stage records, report) in one archive.
tar czf "$out/paper-gpu.tgz" -C "$w" --exclude='*.safetensors' --exclude='*.pt' .
exit $status
