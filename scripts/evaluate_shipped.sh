#!/usr/bin/env bash
# Issue 5's comparison on the shipped model (CIFAR-10 re-encoded copy). Writes runs/eval-*/ and docs/.
set -euo pipefail
export PATCHCERT_DATA="${PATCHCERT_DATA:-../shared/data}"
N_ALL="${N_ALL:-10000}"   # voting / clipping: the whole test set
N_CMP="${N_CMP:-2000}"    # every defense on the same first N_CMP images (masking is the slow one)
MODEL="${MODEL:-}"        # a shipped model's name (default: the default model)
MODEL_ARGS=()
[ -n "$MODEL" ] && MODEL_ARGS=(--model "$MODEL")
# robust masking's window for each patch: the patch's feature window in this model's geometry
win() { python -c "import sys, patchcert; m = patchcert.load_pretrained(sys.argv[1] or None); (w,) = patchcert.geometry.patch_windows(m, sys.argv[2], (32, 32)); print(f'{w[0]}x{w[1]}')" "$MODEL" "$1"; }
W2=$(win 2x2)
W5=$(win 5x5)
# 1. one model pass over the test set; voting (3.2, 3.3) and clipping; score maps cached
patchcert certify "${MODEL_ARGS[@]}" -n "$N_ALL" --defense voting --defense voting:condition=3.3 --defense clipping:clip=tanh \
  --patch 2x2 --patch 5x5 --patch area=24 --square-cap 12 --save-scores --out runs/eval-all --no-progress
# 2. every defense on the same first N_CMP maps, from the cache (no model pass); masking with the patch's window
patchcert certify --scores runs/eval-all/scores.safetensors -n "$N_CMP" \
  --defense voting --defense voting:condition=3.3 --defense clipping:clip=tanh \
  --defense "masking:threshold=0.0,features=logits,window=$W2" --defense "masking:threshold=0.0,features=logits,window=$W5" \
  --patch 2x2 --patch 5x5 --square-cap 0 --out runs/eval-cmp --no-progress
# 3. the heuristic attack (BagCert A.2) on the first 500 test images, 5x5
patchcert attack "${MODEL_ARGS[@]}" -n "${N_ATTACK:-500}" --defense voting --patch 5x5 --out runs/eval-attack --no-progress --save-png 4
# 4. tables and plots
patchcert report runs/eval-all runs/eval-cmp --attack runs/eval-attack --examples 4,0 --map-patch 5x5 --out docs/results
