#!/usr/bin/env bash
# On a CUDA machine: the speed and training-step benchmarks on the GPU, JSON in benchmarks/results/ (< 10 min).
#   bash benchmarks/gpu.sh [cuda:N]
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
llavaseg-bench speed --preset tiny-world --device "$device" --out benchmarks/results/speed-gpu.json
python benchmarks/train_step.py --size realistic --device "$device" --batch-size 4 --repeats 5 \
    --out benchmarks/results/train_step-realistic-gpu.json
python benchmarks/train_step.py --preset tiny-world --device "$device" --repeats 10 --compile \
    --out benchmarks/results/train_step-gpu.json
echo "wrote benchmarks/results/{speed-gpu,train_step-realistic-gpu,train_step-gpu}.json"
