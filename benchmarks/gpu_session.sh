#!/usr/bin/env bash
# The one-shot GPU benchmark session (issues 8 and 10), for ONE `run` call of at most ~9 minutes
# on the GPU machine, from the project root, with .whl/ carried (see benchmarks/README.md):
#
#   ATTNCC_COMMIT=<hash> bash benchmarks/gpu_session.sh
#
# Parts, most important first, each under `timeout` and within what is left of the session's
# budget (GPU_SESSION_BUDGET_S, default 530 s; a part that would start with less than
# GPU_SESSION_MIN_PART_S left is skipped, and the summary keeps its own reserve):
#   setup      install the carried wheels, record nvidia-smi and versions      -> $OUT/env.txt
#   static     sm_90 registers/spills/shared memory of the gallery, in the background on the
#              CPU (nice, 3 at a time), merged at the end                        -> $OUT/static.json
#   train ...  issue 10: forward + backward of causal, alibi (learnable slopes), relative_bias
#              (learnable table), document, learned_sinks against compiled FlexAttention and
#              SDPA, bf16: D=128 N=4k a part per variant, then one (D, N) per part:
#              D=64 N=4k, D=128 N=16k, ...
#                                                                                -> $OUT/train.json
#   fwd ...    issue 8: the forward of the main variants, one (D, N) per part    -> $OUT/forward.json
#   summary    both tables and what did not run; train + forward collated      -> $OUT/results.json
# Every results file is rewritten after each shape, so a part cut short keeps what it finished.
# Everything printed also goes to $OUT/session.log. At most 8 files come back from $OUT: these 6.
#
# Without a GPU: GPU_SESSION_DRY=1 OUT=/tmp/s PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
# runs every part at smoke size on the CPU (Triton's interpreter; one static example), no install;
# GPU_SESSION_DRY=2 runs the first part of each kind only. tests/test_bench.py runs the script
# with a stand-in python and checks the command lines it would run.
set -u -o pipefail

START=$(date +%s)
BUDGET=${GPU_SESSION_BUDGET_S:-530}
MIN_PART=${GPU_SESSION_MIN_PART_S:-25}
SUMMARY_RESERVE=25
DRY=${GPU_SESSION_DRY:-0}
PY=${PYTHON:-python3}
: "${OUT:?OUT must name the folder the results go to}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
TRAIN_VARIANTS=causal,alibi,relative_bias,document,learned_sinks
FWD_VARIANTS=causal,alibi,document,sliding_window,dense,softcap,neighborhood_2d
TRAIN_COMPETITORS=attncc,flex,sdpa:flash,sdpa:cudnn
FWD_COMPETITORS=attncc,flex,sdpa:flash,sdpa:cudnn
STATUS=()
RAN=" "

left() { echo $((START + BUDGET - $(date +%s))); }

# part NAME MAX_S COMMAND...: run COMMAND (a program, not a shell function) under a timeout of
# MAX_S, or of what is left
part() {
    local name=$1 max=$2 avail t0 rc
    shift 2
    avail=$(($(left) - SUMMARY_RESERVE))
    if ((avail < MIN_PART)); then
        echo "=== $name: skipped, ${avail}s left"
        STATUS+=("$name: skipped (no time left)")
        return
    fi
    ((max > avail)) && max=$avail
    echo "=== $name: timeout ${max}s, $(left)s of the session left"
    t0=$(date +%s)
    timeout -k 10 "$max" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0))s$( ((rc == 124)) && echo ' (timed out: its JSON keeps the shapes it finished)')"
    STATUS+=("$name: exit $rc, $(($(date +%s) - t0))s")
}

# suite MAX_S KIND D N [VARIANTS]: the training (issue 10) or forward suite at one head dim and
# length, for its variants or those given
suite() {
    local max=$1 kind=$2 d=$3 n=$4 variants shape common=(--warmup 2 --reps 10 --no-plot --append)
    shape=(--n "$n" --head-dims "$d")
    if ((DRY)); then
        shape=(--smoke)
        common=(--warmup 2 --reps 1 --no-plot --append)
        if ((DRY == 2)) && [[ $RAN == *" $kind "* ]]; then
            STATUS+=("$kind D=$d N=$n${5:+ $5}: not run (GPU_SESSION_DRY=2)")
            return
        fi
    fi
    RAN+="$kind "
    if [ "$kind" = train ]; then
        variants=${5:-$TRAIN_VARIANTS}
        part "train D=$d N=$n${5:+ $5}" "$max" "$PY" benchmarks/run_suite.py --mode fwd_bwd --variants "$variants" \
            --competitors "$TRAIN_COMPETITORS" "${shape[@]}" "${common[@]}" --out "$OUT/train.json"
    else
        variants=${5:-$FWD_VARIANTS}
        part "fwd D=$d N=$n${5:+ $5}" "$max" "$PY" benchmarks/run_suite.py --variants "$variants" \
            --competitors "$FWD_COMPETITORS" "${shape[@]}" "${common[@]}" --out "$OUT/forward.json"
    fi
}

# the carried wheels (as shared/gpu/prepare.sh prints), nvidia-smi and versions; in this shell,
# so that PYTHONPATH reaches the parts
setup() {
    if ((!DRY)); then
        if [ -d .whl ]; then
            timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl &&
                export PYTHONPATH=$PWD/.site &&
                timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
                echo "=== setup: installing the wheels failed"
        else
            echo "=== setup: no .whl/ here: run shared/gpu/prepare.sh on the machine with network, carry .whl"
        fi
    fi
    {
        date -u
        echo "ATTNCC_COMMIT=${ATTNCC_COMMIT:-unset}"
        timeout 20 nvidia-smi || echo "nvidia-smi: not available"
        timeout 60 "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
        timeout 60 "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|lark|optuna|numpy|rich|matplotlib) '
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

# the static sm_90 report of every example (one in a dry run), 3 at a time at low priority, each
# into its own file; it stops by itself before the summary, which merges what finished
STATIC_TMP=$(mktemp -d)
static_start() {
    local examples max=$(($(left) - SUMMARY_RESERVE))
    examples=$(ls examples/*.attn | xargs -n1 basename | sed 's/\.attn$//')
    ((DRY)) && examples=causal
    echo "=== static: in the background, at most ${max}s"
    echo "$examples" | env -u TRITON_INTERPRET timeout -k 10 "$max" nice -n 19 xargs -P 3 -I{} \
        "$PY" benchmarks/static_resources.py --json "$STATIC_TMP/{}.json" {} > "$STATIC_TMP/log.txt" 2>&1 &
    STATIC_PID=$!
}
STATIC_MERGE='
import json, sys
from pathlib import Path
parts = sorted(Path(sys.argv[1]).glob("*.json"))
docs = [json.loads(p.read_text()) for p in parts]
rows = [r for d in docs for r in d["rows"]]
head = {k: v for k, v in docs[0].items() if k != "rows"} if docs else {}
Path(sys.argv[2]).write_text(json.dumps({**head, "rows": rows}, indent=1) + "\n")
print(f"static: {len(rows)} kernels of {len(parts)} examples -> {sys.argv[2]}")
'
static_collect() {
    kill -0 "$STATIC_PID" 2>/dev/null && echo "=== static: still running, waiting (it stops itself in time)"
    wait "$STATIC_PID"
    "$PY" -c "$STATIC_MERGE" "$STATIC_TMP" "$OUT/static.json"
    grep -E "Error|Traceback" "$STATIC_TMP/log.txt" | head -n 5
}

echo "=== attncc GPU session, budget ${BUDGET}s, results in $OUT$( ((DRY)) && echo ' (DRY RUN: smoke sizes on the CPU)')"
((DRY)) && export TRITON_INTERPRET=1
setup
static_start
# issue 10 first: forward + backward at the headline shape, one part per variant (each gets its
# own time: FlexAttention's compile of forward and backward takes tens of seconds), then the
# forward's headline shape, then the other shapes, a part each
for variant in ${TRAIN_VARIANTS//,/ }; do
    suite 75 train 128 4096 "$variant"
done
suite 110 fwd 128 4096
suite 120 train 64 4096
suite 120 train 128 16384
suite 80 fwd 64 4096
suite 100 train 128 1024
suite 80 fwd 128 16384
suite 100 train 64 16384
suite 100 train 64 1024
suite 80 fwd 128 1024
suite 80 fwd 64 16384
suite 80 fwd 64 1024

echo "=== summary, $(left)s of the session left"
static_collect
results=()
for f in "$OUT/train.json" "$OUT/forward.json"; do [ -f "$f" ] && results+=("$f"); done
if ((${#results[@]})); then
    timeout 60 "$PY" benchmarks/run_suite.py --merge "${results[@]}" --out "$OUT/results.json" --no-plot
fi
printf '%s\n' "${STATUS[@]}"
echo "=== done after $(($(date +%s) - START))s; files in $OUT:"
ls -l "$OUT"
rm -rf "$STATIC_TMP"
