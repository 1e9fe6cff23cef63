#!/usr/bin/env bash
# Many nodes with DeepSpeed's launcher (pdsh/ssh to every host of the hostfile; RUN on a shared file system).
#   HOSTFILE=launch/hostfile.example launch/deepspeed_multinode.sh CONFIG RUN [section.field=value ...]
# The hostfile lists "hostname slots=GPUS" lines; the first host is the master.
set -euo pipefail
CONFIG=${1:?config name or YAML path}; RUN=${2:?run folder}; shift 2
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module moecl train --config "$CONFIG" --out "$RUN" "$@"
