#!/usr/bin/env bash
# Issue 18's evaluation of the shipped doublemask_cifar10 (v5 since session 11; v4 is doublemask_cifar10_v4, v3 doublemask_cifar10_v3, v2 doublemask_cifar10_v2) on CIFAR-10 (re-encoded copy). Writes runs/dm-*/
# Every step is resumable: rerun the script after an interruption (certify/attack --resume continue their folders).
set -euo pipefail
export PATCHCERT_DATA="${PATCHCERT_DATA:-../shared/data}"
N_ATTACK="${N_ATTACK:-200}"
# 1. all 10,000 test images, double masking as deployed (the checkpoint's measured bf16 + channels_last + flip), ~2 h 20 min
patchcert certify --model doublemask_cifar10 --defense double-masking --patch 5x5 --square-cap 0 -n 10000 \
  --out runs/dm-all --resume --no-progress
# 2. the pilots' 256 random images (the comparison with v1 and every pilot, docs/experiments.md)
patchcert certify --model doublemask_cifar10 --defense double-masking --patch 5x5 --square-cap 0 \
  --subset random:256 --seed 0 --out runs/dm-256 --resume --no-progress
# 3. an empirical upper bound: PGD patches through the deployed defense
patchcert attack --model doublemask_cifar10 -n "$N_ATTACK" --defense double-masking --patch 5x5 \
  --out runs/dm-attack --resume --no-progress
# 4. tables with confidence intervals and the block-by-block homogeneity test
patchcert report runs/dm-all --attack runs/dm-attack --out runs/dm-report --no-plots
# 5. cost against an official-style pair loop (benchmarks/double_masking.md)
python benchmarks/bench_dm_pair_loop.py -n 32 --repeats 2 --threads 2
