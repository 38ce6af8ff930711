#!/usr/bin/env bash
# The ResNet-20 study of examples/README.md ("ResNet-20 (issue 17)"), in one command:
#
#   bash examples/resnet20_study.sh [DATA_DIR] [OUT]     # defaults: ../shared/data/cifar10 runs/r20
#
# 1. tuning, on one baseline seed that is not an evaluation seed (100): the resnet20 recipe
#    with its peak lr 0.2 and with 0.4; the lr whose run ends with the higher test accuracy
#    is used for everything after (written to OUT/chosen_lr);
# 2. baseline and SE (r = 16) with seeds 0-4, one run folder per seed (OUT/s0 ... OUT/s4),
#    so every finished seed has both arms;
# 3. ECA and CBAM with seeds 0-2 (OUT/eca-cbam-s0 ...);
# 4. the joint summary (Welch 95 % interval of each arm minus the baseline) and figures in
#    OUT/all, and the SE arm's per-site gate statistics in OUT/gates.
#
# Resumable and idempotent: a finished run folder (summary.json) is skipped, a cut-off one
# is continued with --resume, so after an interruption (Ctrl-C, the end of a working
# session) the same command carries on. Run nothing else on the machine meanwhile: every
# run records its seconds per epoch and time to 90 %. Each run's output goes to
# <run folder>.log.
set -euo pipefail

DATA=${1:-../shared/data/cifar10}
OUT=${2:-runs/r20}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"

run() {  # run FOLDER ARGS...: train unless finished; resume if cut off
    local dir=$1
    shift
    if [[ -f $dir/summary.json ]]; then
        echo "finished: $dir"
    elif [[ -f $dir/config.json ]]; then
        echo "resuming: $dir"
        python "$HERE/cifar10_se.py" --resume "$dir" >>"$dir.log" 2>&1
    else
        echo "training: $dir"
        python "$HERE/cifar10_se.py" --model resnet20 --no-plots --data-dir "$DATA" \
            --out "$dir" "$@" >>"$dir.log" 2>&1
    fi
}

final_acc() {  # final_acc FOLDER: the baseline's final test accuracy of a finished run
    python -c 'import json, sys
print(json.load(open(sys.argv[1] + "/summary.json"))["arms"]["baseline"]["final_test_acc_mean"])' "$1"
}

run "$OUT/tune-lr0.2" --arms baseline --seed 100 --lr 0.2
run "$OUT/tune-lr0.4" --arms baseline --seed 100 --lr 0.4
if [[ ! -f $OUT/chosen_lr ]]; then
    python -c 'import sys; a, b = map(float, sys.argv[1:]); print(0.4 if b > a else 0.2)' \
        "$(final_acc "$OUT/tune-lr0.2")" "$(final_acc "$OUT/tune-lr0.4")" >"$OUT/chosen_lr"
fi
LR=$(cat "$OUT/chosen_lr")
echo "peak lr: $LR"

folders=()
for seed in 0 1 2 3 4; do
    run "$OUT/s$seed" --arms baseline,se --seed "$seed" --lr "$LR"
    folders+=("$OUT/s$seed")
done
for seed in 0 1 2; do
    run "$OUT/eca-cbam-s$seed" --arms eca,cbam --seed "$seed" --lr "$LR"
    folders+=("$OUT/eca-cbam-s$seed")
done

python "$HERE/cifar10_se.py" --compare "${folders[@]}" --out "$OUT/all"
python "$HERE/gate_specificity.py" "$OUT"/s? --arm se --out "$OUT/gates"
