#!/bin/bash
# SimCLR teacher training on two machines with torchrun, without a scheduler.
#
# Run the same command on both machines, with NODE_RANK=0 on the first and NODE_RANK=1 on the
# second; MASTER is an address of the first machine that the second can reach (port 29500 open):
#
#   MASTER=10.0.0.1 NODE_RANK=0 bash scripts/torchrun_two_nodes.sh      # machine 1
#   MASTER=10.0.0.1 NODE_RANK=1 bash scripts/torchrun_two_nodes.sh      # machine 2
#
# The static rendezvous puts global rank 0 on NODE_RANK=0. Both machines need the same edgeclr version and the data at the same path. GPUs use NCCL; without
# GPUs the processes use gloo on the CPU (NPROC CPU processes per machine). Only the global
# rank 0 (on machine 1) writes OUT; the other machine writes nothing. To continue after a stop,
# run the same command with --resume on machine 1's OUT (any number of machines or processes).
set -euo pipefail
: "${MASTER:?set MASTER to the address of the first machine}"
: "${NODE_RANK:?set NODE_RANK to 0 on the first machine, 1 on the second}"
NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
DATA=${DATA:-fashion-mnist}
OUT=${OUT:-runs/two-nodes}

exec python -m torch.distributed.run \
  --nnodes=2 --node-rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --master-addr="$MASTER" --master-port=29500 \
  -m edgeclr train --data "$DATA" --out "$OUT" --no-progress "$@"
