#!/usr/bin/env bash
# The full-size benchmarks on a GPU, one stage per process so that a stage that fails or runs out of time keeps
# the others' figures. Each stage appends to bench/results.json and prints its table; the log and the results
# are copied into OUT_DIR as they come.
#
#   bash bench/gpu.sh [OUT_DIR] [STAGES]     # default: bench-gpu, sfsl,finetune,levers,generate,evaluate,select-refs,help
#                                            # (sfsl-sdxl: SDXL 1024 px with/without SFSL; not in the default)
#
# Wheels in .whl/ (packages the machine lacks, e.g. diffusers) are installed into /tmp/site first; spurgen itself
# runs from the working tree. SIZE and DEVICE (default full, cuda) allow a dry run: SIZE=tiny DEVICE=cpu.
# STAGE_TIMEOUT=SECONDS stops a stage that runs longer (default 0: no limit).
set -uo pipefail
out=${1:-bench-gpu}
stages=${2:-sfsl,finetune,levers,generate,evaluate,select-refs,help}
size=${SIZE:-full}
device=${DEVICE:-cuda}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export SPURGEN_BENCH_CACHE=${SPURGEN_BENCH_CACHE:-/tmp/spurgen-bench-cache}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    python3 -c "import torch, diffusers, transformers, peft, timm, accelerate, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'peft', peft.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$out/log.txt"
for stage in ${stages//,/ }; do
    if [ "$stage" = sfsl-sdxl ]; then  # SDXL at 1024 px, the step without and with SFSL (bench.sfsl's own size)
        timeout "${STAGE_TIMEOUT:-0}" python3 -m bench.sfsl --size full-sdxl --device "$device" --steps 5 --warmup 1 \
            2>&1 | tee -a "$out/log.txt"
    else
        timeout "${STAGE_TIMEOUT:-0}" python3 -m bench --size "$size" --device "$device" --only "$stage" 2>&1 | tee -a "$out/log.txt"
    fi
    cp bench/results.json "$out/results.json" 2>/dev/null
done
