#!/usr/bin/env bash
# One process: one GPU, or the CPU when there is none.
#   launch/single.sh CONFIG RUN [section.field=value ...] [--resume auto]
set -euo pipefail
CONFIG=${1:?config name or YAML path}; RUN=${2:?run folder}; shift 2
exec moecl train --config "$CONFIG" --out "$RUN" "$@"
