#!/usr/bin/env bash
# Issue 17's GPU runs: quantize() at TP=2 / FSDP2 / EP=2 beside one GPU (benchmarks/bench_dist.py)
# and the distributed test suite on NCCL, unpatched, one GPU per rank. Run from the repository
# root of a GPU machine (torch with CUDA, triton, transformers present):
#
#   bash scripts/gpu_two_gpu.sh SECTION [TEST_PATH ...]   (results in $OUT, else out/gpu)
#
# SECTION, each well inside a 10-minute command on the machine it names:
#   dense     2 GPUs: Qwen3-8B shapes, megatron TP=2 and FSDP2 (--split-calib), each beside one
#             GPU                                                    -> tp2.md, fsdp2.md
#   moe       2 GPUs: Qwen3-30B-A3B shapes (8 of 48 layers; LAYERS=48 for all), megatron EP=2
#             (--split-calib) beside EP=1                            -> ep2.md
#   tests     2 GPUs: the tests marked distributed under TEST_PATHs (default: the directories
#             holding distributed tests), --dist-backend nccl, no patches (4-rank ones skip);
#             ~120 tests of spawned ranks: two calls of about half each (below)
#                                                                    -> tests.log, junit.xml
#   one-gpu   1 GPU (dry run): the one-GPU phase of the dense megatron run and of the MoE run
#             under torchrun with one process                        -> tp1.md, moe1.md
#
# megatron-core is not installed on the lent GPU machines: it travels as a wheel in .whl/ (ignored
# by git), installed into /tmp/site below. Once, on the development machine (Python 3.12 wheel;
# 0.19.x defines moe_utils.te_general_gemm without TransformerEngine, which MoE routing needs):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl "megatron-core==0.19.2"
#   (its other needs, torch, numpy and packaging>=24.2, are on the machine)
#
# With the device tool (carry the wheel folder):
#   run(kind="nvidia-h200-x2", carry=[".whl"], command="bash scripts/gpu_two_gpu.sh dense")
#   run(carry=[".whl"], command="bash scripts/gpu_two_gpu.sh moe")
#   run(carry=[".whl"], command="bash scripts/gpu_two_gpu.sh tests tests/distributed tests/moe tests/benchmarks")
#   run(carry=[".whl"],
#       command="bash scripts/gpu_two_gpu.sh tests tests/export tests/gptq tests/integrations tests/serving")
#   run(kind="nvidia-h200", carry=[".whl"], command="bash scripts/gpu_two_gpu.sh one-gpu")
set -uo pipefail
cd "$(dirname "$0")/.."
section="${1:?usage: bash scripts/gpu_two_gpu.sh {dense|moe|tests|one-gpu} [TEST_PATH ...]}"
shift
out="${OUT:-out/gpu}"
mkdir -p "$out"

# NVLink multicast stays off on the lent multi-GPU machines (shared hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'GPUs', torch.cuda.device_count())
try:
    import megatron.core; print('megatron-core', megatron.core.__version__)
except ImportError as exc: print('megatron-core missing:', exc)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

bench() {  # bench NPROC OUTFILE ARGS...
  local n="$1" file="$2"
  shift 2
  python3 -m torch.distributed.run --nproc-per-node "$n" --master-addr 127.0.0.1 --master-port 29517 \
    benchmarks/bench_dist.py "$@" --out "$out/$file" 2>&1 | grep -v -i "warn"
}

status=0
case "$section" in
  dense)
    bench 2 tp2.md --backend megatron --tp 2 || status=1
    bench 2 fsdp2.md --backend fsdp2 --split-calib || status=1
    ;;
  moe)
    bench 2 ep2.md --backend megatron --moe --ep 2 --split-calib --layers "${LAYERS:-8}" || status=1
    ;;
  tests)
    # -n 4: four tests at a time, each on both GPUs; xdist and pytest-timeout are on the image
    paths=("$@")
    [ ${#paths[@]} -gt 0 ] || paths=(tests/distributed tests/moe tests/benchmarks tests/export tests/gptq
                                     tests/integrations tests/serving)
    python3 -m pytest -q -m distributed --dist-backend nccl -n 4 --timeout 600 -rfEs \
      --junitxml "$out/junit.xml" "${paths[@]}" 2>&1 | tee "$out/tests.log" | tail -80
    status=${PIPESTATUS[0]}
    ;;
  one-gpu)
    bench 1 tp1.md --backend megatron --phases one-gpu || status=1
    bench 1 moe1.md --backend megatron --moe --phases one-gpu --layers "${LAYERS:-8}" || status=1
    ;;
  *)
    echo "unknown section $section (dense | moe | tests | one-gpu)" >&2
    exit 2
    ;;
esac
exit $status
