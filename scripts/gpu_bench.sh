#!/usr/bin/env bash
# scripts/bench.py on a GPU machine that has no hub access and gets only a few MB of files.
#
#   bash scripts/gpu_bench.sh ASSETS OUT
#
# ASSETS holds what cannot be fetched there:
#   models/minilm, models/smollm2  config + tokenizer only (scripts/random_model.py --config-only);
#   models/marian (for seq2seq)    random weights are made on the spot: same shapes, same speed
#                                  (marian: scripts/random_model.py Helsinki-NLP/opus-mt-en-de OUT --config-only)
#   data/scikit_learn_data         the 20 Newsgroups cache (../shared/data/scikit_learn_data)
#   whl/*.whl                      optional: transformers and peft at this repo's versions
# Logs and JSON results go to OUT; QUICK=1 runs a few steps of each (a dry run on any machine). Each benchmark has its own time limit, so one that hangs
# cannot take the others' time.
set -uo pipefail
assets=$(realpath "$1"); out=$(realpath "$2"); mkdir -p "$out"
if compgen -G "$assets/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$assets"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SCIKIT_LEARN_DATA=$assets/data/scikit_learn_data \
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LORAFIT_CACHE=/tmp/lorafit-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
mkdir -p /tmp/models
for m in $(ls "$assets/models"); do
    cp -r "$assets/models/$m" /tmp/models/
    python3 scripts/random_model.py /tmp/models/$m /tmp/models/$m $([ $m = smollm2 ] && echo --causal-lm) || exit 1
done
bench() {  # name, time limit, bench.py arguments...
    local name=$1 limit=$2; shift 2
    echo "== $name: python scripts/bench.py $*" | tee "$out/$name.log"
    timeout "$limit" python3 scripts/bench.py "$@" --json "$out/$name.json" 2>&1 | tee -a "$out/$name.log"
}
# QUICK=1: a few steps of each, to try the script itself on a CPU machine. ROUNDS: rounds per benchmark.
# PARTS: which of newsgroups, smollm2, newsgroups-same, seq2seq (needs models/marian), token-classification to run.
r=${ROUNDS:-2}
if [ "${QUICK:-0}" = 1 ]; then n="--steps 3 --warmup 1"; s=$n; else n="--steps 60 --warmup 10"; s="--steps 40 --warmup 10"; fi
for part in ${PARTS:-newsgroups smollm2 newsgroups-same}; do
    case $part in
        newsgroups) bench newsgroups 170 --task newsgroups --model /tmp/models/minilm $n --rounds $r ;;
        smollm2) bench smollm2 170 --task smollm2 --model /tmp/models/smollm2 $s --rounds $r ;;
        newsgroups-same) bench newsgroups-same 110 --task newsgroups --model /tmp/models/minilm $n --rounds 1 --same-settings ;;
        seq2seq) bench seq2seq 170 --task seq2seq --model /tmp/models/marian $n --rounds $r ;;
        token-classification) bench token-classification 170 --task token-classification --model /tmp/models/minilm $n --rounds $r ;;
    esac
done
