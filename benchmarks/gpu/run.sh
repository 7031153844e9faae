#!/usr/bin/env bash
# The GPU checks, as one script for a lent machine (see benchmarks/README.md): model-level parity,
# flash attention, bf16 + compile training and generation against transformers, MFU per head, batch
# size and attention kernel (mfu.py), then `gpt2lab train`
# end to end (single process with --compile, and FSDP2 under torchrun) on a prepared data folder.
#   DATA=path/to/prepared GPT2LAB_CACHE=path/to/cache benchmarks/gpu/run.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-/tmp/gpt2lab-gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
data=${DATA:?set DATA to a folder written by gpt2lab prepare}
common=(--data "$data" --model gpt2 --batch-size 16 --block-size 1024 --device cuda --warmup-steps 10
        --eval-interval 25 --eval-batches 4 --log-interval 5 --no-keep-best)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/env.txt"
python3 benchmarks/gpu/check.py --steps 20 2>&1 | grep -v Warning | tee "$out/check.log"
python3 benchmarks/gpu/mfu.py --data "$data" --out "$out/mfu.jsonl" 2>&1 | grep -v Warning | tee "$out/mfu.log"
python3 -m gpt2lab train "${common[@]}" --out /tmp/gpu-run --max-steps 50 --compile 2>&1 | tail -15 | tee "$out/train.log"
cp /tmp/gpu-run/metrics.jsonl "$out/train-metrics.jsonl"
python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m gpt2lab train "${common[@]}" \
  --out /tmp/gpu-fsdp --max-steps 20 --fsdp 2>&1 | tail -8 | tee "$out/fsdp.log"
cp /tmp/gpu-fsdp/metrics.jsonl "$out/fsdp-metrics.jsonl"
