#!/usr/bin/env bash
# The Fashion-MNIST model of the evidence issue: a CPU background job (one thread, passive OpenMP wait)
# that checkpoints every 100 steps into runs/fashion-ddpm/checkpoint.pt and resumes from it when run again.
# Usage: scripts/train_fashion.sh   (from the repository root, in the environment README's commands make;
# Fashion-MNIST from Debian's dataset-fashion-mnist package or --data-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
mkdir -p runs/fashion-ddpm
exec attnguide train --dataset fashion-mnist --out runs/fashion-ddpm --steps 10000 --batch-size 128 \
  --lr 1e-3 --label-dropout 0.2 --ema-decay 0.9995 --seed 0 --threads 1 --log-every 50 \
  --checkpoint-every 100 --keep-checkpoint --skip-classifier "$@" >>runs/fashion-ddpm/train.log 2>&1
