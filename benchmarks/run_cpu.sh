#!/usr/bin/env bash
# The CPU-sized benchmark runs whose records are committed as benchmarks/results/cpu_*.json.
#
#   bash benchmarks/run_cpu.sh            # everything (about 35 min on 2 cores)
#   bash benchmarks/run_cpu.sh train      # one part: train | floor | ops | layer | inference | memory | ep | project | profile
#
# One torch thread per process and ratios of per-call CPU time: the host these records come from was
# shared with other jobs (load average 5-7 on 2 cores), where wall-clock time measures the queue for a
# core more than the work; wall-clock figures are in the records too. Shapes are CPU-sized (moecl-small
# at 32 px, ViT-B/16 at 224 px with batch 4-8); the GPU shapes of the targets are in run_gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
R=benchmarks/results
mkdir -p "$R"
T="--threads 1 --device cpu"
part=${1:-all}
run() { echo "+ $*" >&2; [ -n "${DRY:-}" ] || "$@"; }  # DRY=1: print the commands, run nothing
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }

if want train; then  # (a) moecl vs floor, (b) vs the published path
  run $PY -m benchmarks.train_step $T --model moecl-small --batch 64 --classes 20 --steps 6 --warmup 2 \
    --variants moecl,floor,reference \
    --out $R/cpu_train_step_small.json
  run $PY -m benchmarks.train_step $T --model moecl-small --batch 64 --classes 20 --steps 6 --warmup 2 \
    --routing concentrated --variants moecl,floor,reference \
    --out $R/cpu_train_step_small_concentrated.json
  run $PY -m benchmarks.train_step $T --model ViT-B-16-quickgelu --batch 4 --classes 10 --steps 2 --warmup 1 \
    --rounds 1 --variants moecl,floor,reference --out $R/cpu_train_step_vitb16.json
fi

if want floor; then  # the issue-17 ratios: moecl vs floor (prompts trimmed as the trainer does, fused AdamW)
  run $PY -m benchmarks.train_step $T --model moecl-small --batch 64 --classes 20 --steps 12 --warmup 2 --rounds 6 \
    --variants moecl,floor --out $R/cpu_train_step_small_floor.json
  run $PY -m benchmarks.train_step $T --model ViT-B-16-quickgelu --batch 4 --classes 10 --steps 4 --warmup 1 \
    --rounds 4 --variants moecl,floor --out $R/cpu_train_step_vitb16_floor.json
  # the issue's shape: ViT-B/16 at batch 64 (about 90 s per step on one thread: ~25 min)
  run $PY -m benchmarks.train_step $T --model ViT-B-16-quickgelu --batch 64 --classes 10 --steps 6 --warmup 1 \
    --rounds 6 --variants moecl,floor --out $R/cpu_train_step_vitb16_b64_floor.json
fi

if want ops; then  # dispatched operators and host syncs per training step (exact, load-independent)
  run $PY -m benchmarks.step_ops $T --model moecl-small --batch 64 --classes 20 --steps 2 \
    --variants moecl,floor,reference --out $R/cpu_step_ops_small.json
  run $PY -m benchmarks.step_ops $T --model ViT-B-16-quickgelu --batch 4 --classes 10 --steps 1 \
    --variants moecl,floor --out $R/cpu_step_ops_vitb16.json
fi

if want layer; then  # (c) one MoE layer vs DeepSpeed's stock per-token MoE
  run $PY -m benchmarks.moe_layer $T --batch 8 --tokens 197 --dim 768 --steps 6 --warmup 2 \
    --out $R/cpu_moe_layer_vitb16_b8.json
  run $PY -m benchmarks.moe_layer $T --batch 8 --tokens 197 --dim 768 --steps 6 --warmup 2 --routing concentrated \
    --out $R/cpu_moe_layer_vitb16_b8_concentrated.json
  run $PY -m benchmarks.moe_layer $T --model moecl-small --batch 64 --steps 10 --warmup 2 \
    --out $R/cpu_moe_layer_small_b64.json
fi

if want inference; then  # (d) DDAS + routed forward vs plain zero-shot
  run $PY -m benchmarks.inference $T --model moecl-small --batch 64 --classes 20 --tasks 11 --steps 10 --warmup 2 \
    --text-batch 256 --variants plain,oracle,ddas-in,ddas-half,ddas-out,ddas-half-subset \
    --out $R/cpu_inference_small.json
  run $PY -m benchmarks.inference $T --model ViT-B-16-quickgelu --batch 8 --classes 10 --tasks 11 --steps 2 \
    --warmup 1 --rounds 1 --text-batch 32 --variants plain,oracle,ddas-in,ddas-out,ddas-half,ddas-half-subset \
    --out $R/cpu_inference_vitb16.json
fi

if want memory; then  # CPU peak RSS delta per variant (not GPU memory)
  run $PY -m benchmarks.memory $T --model moecl-small --batch 64 --classes 20 --steps 2 \
    --variants moecl,floor,moecl+ckpt,floor+ckpt --out $R/cpu_memory_small.json
  # issue 17 item 5: per-image slope with and without checkpointing (torch vs fairscale), projected to batch 64
  run $PY -m benchmarks.memory $T --model ViT-B-16-quickgelu --classes 10 --steps 2 --batches 1,2,4 \
    --variants moecl,moecl+ckpt,moecl+fsckpt,floor --out $R/cpu_memory_vitb16_slope.json
  run $PY -m benchmarks.memory $T --model ViT-L-14 --classes 10 --steps 2 --batches 1,2 \
    --variants moecl,moecl+ckpt,moecl+fsckpt --out $R/cpu_memory_vitl14_slope.json
fi

if want ep; then  # expert parallelism: ep_size 1 vs 2 over two gloo ranks
  run $TORCHRUN --nproc_per_node 2 -m benchmarks.ep_scaling $T --model moecl-small --batch 64 --classes 20 \
    --steps 6 --warmup 2 --rounds 3 --configs 1,2:gather,2:all-to-all --out $R/cpu_ep_scaling_small.json
fi

if want project; then  # (f) MTIL-shaped run projected from the records above (CPU figures: a demonstration)
  run $PY -m benchmarks.project_mtil --train $R/cpu_train_step_vitb16.json --inference $R/cpu_inference_vitb16.json \
    --out $R/cpu_project_mtil_vitb16.json
fi

if want profile; then  # where the moecl step's time goes
  run $PY -m benchmarks.train_step $T --model moecl-small --batch 64 --classes 20 --steps 2 --warmup 1 \
    --variants moecl --profile $R/cpu_profile_train_step_small.txt --out $R/cpu_profile_train_step_small.json
fi
