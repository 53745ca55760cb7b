#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR (the rank-0 node's address), the
# same RUN_ID and its own NODE_RANK. Arguments are Hydra overrides for segplat.train.
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 RUN_ID=exp1 launch/torchrun_multi_node.sh trainer.max_epochs=50
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 RUN_ID=exp1 launch/torchrun_multi_node.sh trainer.max_epochs=50
# The run folder is named after RUN_ID (run_name=RUN_ID) and trainer.resume=auto is passed, so a restarted job
# resumes (a first start finds no checkpoint and starts fresh); RUN_ID is required, since a default one would
# resume another run. The run folder (paths.log_dir) must be on a file system every node sees.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node, 0 .. NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of the node with NODE_RANK=0}"
MASTER_PORT=${MASTER_PORT:-29500}
: "${RUN_ID:?set RUN_ID, the run name every node shares (a restart with the same RUN_ID resumes that run)}"
JOIN_TIMEOUT=${JOIN_TIMEOUT:-300}  # seconds torchrun waits for all nodes before it gives up
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec python -m torch.distributed.run \
  --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${RUN_ID}" \
  --rdzv-conf "join_timeout=${JOIN_TIMEOUT}" \
  -m segplat.train run_name="${RUN_ID}" trainer.resume=auto "$@"
