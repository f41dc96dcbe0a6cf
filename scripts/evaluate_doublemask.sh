#!/usr/bin/env bash
# Issue 11's evaluation: double masking (PatchCleanser) on the shipped doublemask_cifar10 model and, both ways,
# on the BagCert model; all on the first test images of CIFAR-10 (re-encoded copy). Writes runs/eval-dm*/.
set -euo pipefail
export PATCHCERT_DATA="${PATCHCERT_DATA:-../shared/data}"
N_DM="${N_DM:-1000}"        # double masking on the doublemask model (666 masked images per test image)
N_BOTH="${N_BOTH:-100}"     # double masking on the BagCert model (its forward pass is ~3x dearer)
N_ATTACK="${N_ATTACK:-100}"
# 1. the doublemask model: double masking (bf16 deployment) and, for the comparison, BagCert voting on its 1-cell map
patchcert certify --model doublemask_cifar10 -n "$N_DM" --defense double-masking:k=6,bf16=true --defense voting \
  --patch 5x5 --square-cap 0 --out runs/eval-dm --no-progress
# 2. the BagCert model as a plain classifier under double masking, next to its own score-map defenses, same images
patchcert certify -n "$N_BOTH" --defense double-masking:k=6,bf16=true --defense voting \
  --defense masking:threshold=0.0,features=logits,window=11x11 --patch 5x5 --square-cap 0 --out runs/eval-dm-bagcert --no-progress
# 3. an empirical upper bound: PGD patches through the double-masking defense
patchcert attack --model doublemask_cifar10 -n "$N_ATTACK" --defense double-masking:k=6,bf16=true --patch 5x5 \
  --out runs/eval-dm-attack --no-progress
# 4. throughput and bf16 vs float32 (benchmarks/double_masking.md)
python benchmarks/bench_double_masking.py -n "${N_BENCH:-50}" --threads 2
