#!/usr/bin/env bash
# One node, several processes (one per GPU; or NPROC CPU processes with gloo when there is no GPU).
#   NPROC=8 launch/torchrun.sh CONFIG RUN [section.field=value ...] [--resume auto]
set -euo pipefail
CONFIG=${1:?config name or YAML path}; RUN=${2:?run folder}; shift 2
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m moecl train --config "$CONFIG" --out "$RUN" "$@"
