#!/usr/bin/env bash
# torchrun launches of `nvfp4-dist quantize` on the embedded tiny-dense model, one per backend.
# CPU-only machines use gloo; with one GPU per rank the ranks use NCCL on cuda:LOCAL_RANK.
#   bash scripts/torchrun_examples.sh [NPROC]          (default 2; out/ receives the exports)
# --backend megatron needs megatron-core (pip install -e ".[megatron]") and CUDA: megatron-core's
# rotary embedding moves its tables to torch.cuda.current_device() (the CPU tests patch that).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2}"
common=(--model tiny-dense --method local_hessian --dss --calib-samples 16 --seq-len 64
        --no-progress --overwrite --dist-timeout 300)

# Whole model on every rank; each rank calibrates on its share of the data (statistics summed).
torchrun --nproc-per-node "$n" -m nvfp4_dist quantize "${common[@]}" --backend hf --split-calib \
  --format compressed-tensors --out out/tiny-dense-hf-dp

# FSDP2 shards: every rank searches only the rows it owns; every rank feeds all the data, so the
# checkpoint equals a single-process run's tensor for tensor.
torchrun --nproc-per-node "$n" -m nvfp4_dist quantize "${common[@]}" --backend fsdp2 \
  --format modelopt --out out/tiny-dense-fsdp2

# Megatron-core GPT at TP=n (needs CUDA): float64 calibration makes the Hessian statistics, and
# so the exported checkpoint, identical at every TP size.
if python -c "import megatron.core, torch; assert torch.cuda.device_count() >= $n" 2>/dev/null; then
  rm -rf out/tiny-dense-megatron-ckpt  # --save-dist-ckpt writes into a new or empty directory
  torchrun --nproc-per-node "$n" -m nvfp4_dist quantize "${common[@]}" --backend megatron --tp "$n" \
    --float64-calib --format modelopt --out out/tiny-dense-megatron-tp"$n" \
    --save-dist-ckpt out/tiny-dense-megatron-ckpt
  # The saved checkpoint exported again at TP=1, in a new job, without calibrating.
  torchrun --nproc-per-node 1 -m nvfp4_dist export --model tiny-dense --method local_hessian --dss \
    --backend megatron --tp 1 --dist-ckpt out/tiny-dense-megatron-ckpt --format modelopt \
    --out out/tiny-dense-megatron-tp1-export --overwrite --no-progress
fi

for d in out/tiny-dense-hf-dp out/tiny-dense-fsdp2 out/tiny-dense-megatron-tp"$n" out/tiny-dense-megatron-tp1-export; do
  [ -d "$d" ] && nvfp4-dist inspect "$d" | tail -1
done
