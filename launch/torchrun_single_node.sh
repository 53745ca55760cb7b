#!/usr/bin/env bash
# One node, N processes (one per GPU; gloo on CPU). Every argument goes to segplat.train as a Hydra override.
#   NPROC=4 launch/torchrun_single_node.sh experiment=synthetic_mid_fusion trainer.max_epochs=50
# NPROC defaults to the number of visible GPUs (1 without any). --standalone runs a local c10d
# rendezvous on a free port, so several runs can share a machine.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec python -m torch.distributed.run --standalone --nproc-per-node "${NPROC}" -m segplat.train "$@"
