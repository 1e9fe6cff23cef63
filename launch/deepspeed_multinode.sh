#!/usr/bin/env bash
# Many nodes with DeepSpeed's launcher. RUN must be one folder on a file system every node mounts.
#   With passwordless ssh (pdsh), once, on the first host of the hostfile:
#     HOSTFILE=launch/hostfile.example launch/deepspeed_multinode.sh CONFIG RUN [section.field=value ...]
#   Without ssh (--no_ssh), the same command once on every node, with that node's index in the hostfile:
#     NODE_RANK=1 MASTER_ADDR=node001 HOSTFILE=... launch/deepspeed_multinode.sh CONFIG RUN [...]
# The hostfile lists "hostname slots=GPUS" lines; the first host is the master. MASTER_PORT (default 29500)
# must be free on the master. Add --resume auto to continue a stopped run from its last valid checkpoint.
set -euo pipefail
CONFIG=${1:?config name or YAML path}; RUN=${2:?run folder}; shift 2
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NODE_RANK:-}" ]; then
  ARGS+=(--no_ssh --node_rank "$NODE_RANK"
         --master_addr "${MASTER_ADDR:?MASTER_ADDR: the address of the first host in the hostfile, e.g. node001}")
elif [ -n "${MASTER_ADDR:-}" ]; then
  ARGS+=(--master_addr "$MASTER_ADDR")
fi
exec "${DEEPSPEED:-deepspeed}" "${ARGS[@]}" --no_local_rank --module moecl train --config "$CONFIG" --out "$RUN" "$@"
