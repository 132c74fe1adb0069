#!/bin/bash
# Multi-GPU / multi-node DDP without SLURM, through torchrun (Lightning detects its environment).
#
#   scripts/launch_torchrun.sh pretrain +experiment=beit_base                        # all local GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch_torchrun.sh finetune +experiment=beit_base_ft1k model.pretrained=...
#   (and NODE_RANK=1 on the second node, same RUN_NAME on both)
#
# Every process must agree on the run directory: it is named from RUN_NAME (default: the launch
# time, fixed here once), so a restart with the same RUN_NAME resumes with ckpt_path=auto.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 {pretrain|finetune|train_tokenizer} [hydra overrides...]" >&2
    exit 2
fi
ENTRY="$1"; shift
case "$ENTRY" in
    pretrain|finetune|train_tokenizer) ;;
    *) echo "unknown entry point '$ENTRY': use pretrain, finetune or train_tokenizer" >&2; exit 2 ;;
esac

NPROC="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RUN_NAME="${RUN_NAME:-torchrun-$(date +%Y-%m-%d_%H-%M-%S)}"

exec torchrun \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m "bitrain.$ENTRY" \
    trainer=ddp "trainer.num_nodes=$NNODES" "trainer.devices=$NPROC" \
    "paths.run_name=$RUN_NAME" ckpt_path=auto \
    "$@"
