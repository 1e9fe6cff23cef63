#!/usr/bin/env bash
# The one-command demo: synthetic world, tiny CLIP pretraining, four methods side by side (CPU or GPU).
set -euo pipefail
exec moecl demo --out "${1:-runs/demo}"
