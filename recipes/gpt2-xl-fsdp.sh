#!/usr/bin/env bash
# Pretrain GPT-2 XL (1.5B) from scratch on one machine's GPUs: FSDP2, bf16, activation checkpointing.
#
#   recipes/gpt2-xl-fsdp.sh DATA_DIR RUN_DIR [more `gpt2lab train` options]
#
# DATA_DIR comes from `gpt2lab prepare`. Rerun the same command to resume. The defaults are GPT-3's
# for its 1.3B model (0.5M-token batches, peak lr 2e-4, cosine to a tenth), 10B tokens in 19,073 steps.
# Plan first: the memory per GPU and the time per step for these settings,
#   gpt2lab estimate gpt2-xl --batch-size 512 --micro-batch 8 --block-size 1024 --devices 8 --fsdp \
#       --precision bf16 --gradient-checkpointing --device H100
# Every setting is an environment variable (tests/test_recipes.py runs this on CPU, small shapes, gloo).
set -euo pipefail
data=${1:?usage: recipes/gpt2-xl-fsdp.sh DATA_DIR RUN_DIR [gpt2lab train options]}
out=${2:?usage: recipes/gpt2-xl-fsdp.sh DATA_DIR RUN_DIR [gpt2lab train options]}
shift 2

NPROC=${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}  # processes: one per GPU
MODEL=${MODEL:-gpt2-xl}
BATCH=${BATCH:-512}          # sequences per optimizer step, over all GPUs (x BLOCK tokens)
MICRO=${MICRO:-8}            # sequences per GPU per forward pass (accumulation covers the rest)
BLOCK=${BLOCK:-1024}
STEPS=${STEPS:-19073}
WARMUP=${WARMUP:-700}
LR=${LR:-2e-4}
PYTHON=${PYTHON:-python}

if [ "$NPROC" -lt 1 ]; then
    echo "recipes/gpt2-xl-fsdp.sh: no GPU found; set NPROC to the number of processes" >&2
    exit 2
fi
resume=()
if [ -d "$out/checkpoints" ]; then resume=(--resume); fi

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m gpt2lab train \
    --data "$data" --out "$out" "${resume[@]}" --model "$MODEL" \
    --fsdp --precision bf16 --gradient-checkpointing \
    --batch-size "$BATCH" --micro-batch "$MICRO" --block-size "$BLOCK" \
    --max-steps "$STEPS" --decay-steps "$STEPS" --warmup-steps "$WARMUP" --lr "$LR" --min-lr "$(
        "$PYTHON" -c "print($LR / 10)")" \
    --weight-decay 0.1 --grad-clip 1.0 "$@"
