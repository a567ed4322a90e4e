#!/usr/bin/env bash
# The GPU rows of docs/performance.md, in calls of at most 8 minutes each (BUDGET_S; all stages need three, see the
# estimate below), on a machine with no network.
#
#   bash bench/gpu.sh prepare           # here, before each device call: wheels and commit into .bench-gpu/
#   bash bench/gpu.sh [OUT_DIR]         # on the GPU machine; OUT_DIR default docs/benchmarks
#   bash bench/gpu.sh --tiny [OUT_DIR]  # the same steps on the CPU at tiny sizes; OUT_DIR default a new temp folder
#
# prepare (needs pip's index and git) downloads, for the device's Python 3.12 on x86-64, the wheels of the packages
# that its image lacks (diffusers, open-clip-torch and their small dependencies) or may hold outside spurgen's
# ranges (timm, peft), at the versions installed here, where the tests pass; and it writes the commit
# (git rev-parse, +dirty for uncommitted changes) to .bench-gpu/commit. The device gets a copy of the working tree,
# maybe without .git: the run takes the commit from git when git works there, else from that file.
# With the device tool: run(command='bash bench/gpu.sh $OUT', carry=['.bench-gpu'], timeout_s=540), then copy the
# record file from the files that come back into docs/benchmarks/.
#
# A run: the wheels go into a temporary site folder (spurgen itself runs from the working tree, as
# `python -m spurgen`, so nothing is built); bench.preflight checks every requirement's version and the GPU, and
# builds the random SD 1.5 once into SPURGEN_BENCH_CACHE; then each stage runs in its own process under its time
# budget, cut to what is left of BUDGET_S, so a stage that fails or overruns keeps the others' figures. Every stage
# appends its run (date, machine with the card's name, size, commit, records) to OUT_DIR/DATE-CARD-SIZE.json, the
# layout of docs/benchmarks/; OUT_DIR/DATE-CARD-SIZE.log holds the whole output.
#
# Environment: STAGES (comma-separated; default all below, in that order), BUDGET_S (default 480; --tiny 2700),
# REPEATS (timed turns per side; --tiny default 1), PYTHON (default python3: on the device, the one with torch).
set -uo pipefail
out=${1:-}  # OUT_DIR, resolved before the script moves to the repository's root
[[ $out == prepare || $out == --tiny ]] && out=${2:-}
[[ -n $out ]] && out=$(realpath -m "$out")
cd "$(dirname "$0")/.." || exit

# Seconds per stage on an H100/H200, about 1.5x the 2026-11-26 runs' (docs/benchmarks/): finetune took 65 s,
# generate 58 s, evaluate 83 s, select-refs 46 s there; sfsl and mfu are estimated from their step counts.
# sdxl (SDXL at 1024 px, random weights, bf16; not run on a GPU yet) is estimated at 140 s: building the random
# SDXL (3.5 B parameters on the CPU, 14 GB written) ~45 s, loading it for our trainer and for the reference ~35 s,
# class images and the first compilation ~30 s, then 3 turns (1 warm-up) x 3 sides x 3 steps of about 1 s.
# flux (FLUX.1-dev at 512 px, random weights, bf16, gradient checkpointing; not run on a GPU yet) is estimated at
# 250 s, most of it building the random model: torch fills random weights on one core whatever the core count
# (~240 M parameters/s measured here), and FLUX.1-dev has 16.9 B (the 11.9 B transformer, T5-XXL 4.8 B): ~75 s,
# the casts to bf16 ~15 s, writing the 34 GB folder ~30 s; loading it for our trainer and for the reference ~40 s,
# class images and first kernels ~20 s; then 3 turns x 3 sides x 3 steps of about 1.3 s (~220 TFLOPs of transformer
# forward and backward per step at batch 1+1, recomputation on top) ~35 s.
declare -A BUDGET=([finetune]=100 [sfsl]=80 [sdxl]=210 [flux]=400 [mfu]=60 [levers]=240 [generate]=70
                   [evaluate]=100 [select-refs]=60 [help]=20)
# The least time a stage needs to finish (default 10 s): with less of BUDGET_S left it is skipped, not started and
# cut (flux would spend the rest of a call building its model).
declare -A NEEDS=([flux]=300)
# The whole default run, estimated: wheels and preflight (the random SD 1.5 built) ~45 s, finetune 65, sfsl ~55,
# sdxl ~140, flux ~250, mfu ~40, generate 58, evaluate 83, select-refs 46, help ~13: ~795 s before levers, more
# than BUDGET_S (480 s, so that a device call with timeout_s=540 keeps its margin). A default call measures the
# training rows of SD and SDXL (~305 s), skips flux (~175 s left, less than its 300), then mfu, generate and most
# likely not evaluate, select-refs, help or levers. STAGES=flux measures FLUX.1's rows in a second call (~300 s;
# its 34 GB folder beside SD 1.5's 4 GB and SDXL's 14 GB fits the machine's 64 GB disk),
# STAGES=evaluate,select-refs,help,levers the rest in a third (~300 s).
# levers (--compile, --channels-last) last among the training rows: two cold compiles may take its whole budget.
STAGE_ORDER=finetune,sfsl,sdxl,flux,mfu,generate,evaluate,select-refs,help,levers
PYTHON=${PYTHON:-python3}
WHEELS="diffusers open-clip-torch ftfy wcwidth timm peft"

commit() {  # the checkout's commit, +dirty with uncommitted changes to tracked files
    local head
    head=$(git -c safe.directory="$PWD" rev-parse --short HEAD 2>/dev/null) || return 1
    git -c safe.directory="$PWD" diff --quiet HEAD 2>/dev/null && echo "$head" || echo "$head+dirty"
}

if [[ ${1:-} == prepare ]]; then
    rm -rf .bench-gpu/wheels && mkdir -p .bench-gpu/wheels || exit
    pins=$("$PYTHON" -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" \
        $WHEELS) || exit
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .bench-gpu/wheels $pins || exit
    commit >.bench-gpu/commit || { echo "not a git checkout: no commit to record" >&2; exit 1; }
    echo "prepared: $pins; commit $(cat .bench-gpu/commit); $(du -sh .bench-gpu | cut -f1) to carry"
    exit
fi

size=full device=cuda budget=${BUDGET_S:-480} repeats=${REPEATS:-}
if [[ ${1:-} == --tiny ]]; then
    size=tiny device=cpu budget=${BUDGET_S:-2700} repeats=${REPEATS:-1}
    for stage in "${!BUDGET[@]}"; do BUDGET[$stage]=900; done  # a 2-core CPU shared with other jobs: minutes
    NEEDS=()  # the tiny models build in seconds
fi
[[ -n $out ]] || out=$([[ $size == tiny ]] && mktemp -d -t spurgen-gpu-dry-run-XXXX || echo docs/benchmarks)
mkdir -p "$out" || exit
started=$SECONDS
scratch=$(mktemp -d -t spurgen-gpu-XXXX)
trap 'rm -rf "$scratch"' EXIT
log=$scratch/log  # renamed once the card's name is known

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SPURGEN_BENCH_CACHE=${SPURGEN_BENCH_CACHE:-/tmp/spurgen-bench-cache}
if compgen -G ".bench-gpu/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" \
        .bench-gpu/wheels/*.whl 2>&1 | tee -a "$log"
    [[ ${PIPESTATUS[0]} == 0 ]] || exit 1
    export PYTHONPATH=$scratch/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SPURGEN_BENCH_COMMIT=$(commit || cat .bench-gpu/commit 2>/dev/null || echo unknown)
export SPURGEN_BENCH_COMMIT
{ echo "commit $SPURGEN_BENCH_COMMIT, size $size, device $device, budget $budget s"; nvidia-smi 2>/dev/null | head -12; } \
    | tee -a "$log"
"$PYTHON" -m bench.preflight --device "$device" --name-file "$scratch/name" --build-model "$size" 2>&1 | tee -a "$log"
[[ ${PIPESTATUS[0]} == 0 ]] || { cp "$log" "$out/preflight-failed.log"; exit 1; }
name=$(date -u +%F)-$(cat "$scratch/name")-$size
export SPURGEN_BENCH_RESULTS=$out/$name.json
mv "$log" "$out/$name.log" && log=$out/$name.log

summary=()
since=$(date +%Y-%m-%dT%H:%M:%S%z)
IFS=, read -ra stages <<<"${STAGES:-$STAGE_ORDER}"
for stage in "${stages[@]}"; do
    left=$((budget - (SECONDS - started)))
    limit=${BUDGET[$stage]:-120}
    ((limit > left)) && limit=$left
    if ((limit < ${NEEDS[$stage]:-10})); then
        summary+=("$stage: skipped, ${left} s of the budget left (it needs ${NEEDS[$stage]:-10} s: STAGES=$stage)")
        continue
    fi
    echo "== $stage: at most $limit s ($((SECONDS - started)) s since the start)" | tee -a "$log"
    stage_start=$SECONDS
    timeout -k 10 "$limit" "$PYTHON" -m bench --size "$size" --device "$device" --only "$stage" \
        ${repeats:+--repeats "$repeats"} 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    case $status in
        0) result=ok ;;
        124 | 137) result="stopped at its budget, no records" ;;
        *) result="failed (exit $status)" ;;
    esac
    summary+=("$stage: $((SECONDS - stage_start)) s, $result")
done
{
    # One table of this call's records (the file may hold an earlier call's of the same day too).
    [[ -f $SPURGEN_BENCH_RESULTS ]] && "$PYTHON" - "$SPURGEN_BENCH_RESULTS" "$since" <<'PY'
import json, sys
from bench.__main__ import print_table
runs = [run for run in json.load(open(sys.argv[1]))["runs"] if run["date"] >= sys.argv[2]]
machine = runs[0]["machine"] if runs else {}
print_table([record for run in runs for record in run["records"]],
            f"bench/gpu.sh: {machine.get('gpu') or machine.get('cpu')}, commit {runs[0]['git_commit'] if runs else ''}")
PY
    echo "== summary: $((SECONDS - started)) s in all (budget $budget s); records in $SPURGEN_BENCH_RESULTS"
    printf '   %s\n' "${summary[@]}"
} 2>&1 | tee -a "$log"
