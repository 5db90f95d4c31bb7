#!/usr/bin/env bash
# The attention suite of issue 6 (item 2) in one go, on one machine with 2 GPUs; about 5-6 minutes on 2 x H100.
#
#   bash benchmark/run_attention_suite.sh [OUT_DIR]        # from the repo root; OUT_DIR defaults to benchmark/results/<today>-suite (give each run its own folder with a NOTES.md)
#
# bf16, causal, batch 1, 32 query heads of 128, with 32 (MHA) and 8 (GQA) KV heads, 32K and 128K tokens,
# forward+backward and forward only:
#   ours       ulysses 1 x ring 2 in each layout (basic, zigzag, stripe) and ulysses 2 x ring 1 with 1, 2 and 4
#              head groups (the all-to-all in pieces that overlap attention), backends fa4 and cudnn
#   single_gpu the one-GPU ceiling (fa4, cudnn): perfect scaling on 2 GPUs = its time / 2
#   torch_cp   torch's context_parallel with cuDNN SDPA (allgather rotation); for GQA also with flash SDPA
# then one profiled run (MHA fwd+bwd at the longest length, zigzag and pure Ulysses) and the summary table.
# Every launch has a time limit; a launch that fails or hangs gets a failure record and the suite goes on.
# Records: OUT_DIR/attention.jsonl (profiled runs: OUT_DIR/profile.jsonl, traces in OUT_DIR/profile/),
# figures: OUT_DIR/plots/, everything the launches print: OUT_DIR/suite.log.
#
# Overrides for other machines or a CPU smoke run (environment): NPROC, SEQS, KVS, NHEADS, HEAD_DIM, DTYPE,
# PYTHON, BACKENDS, SINGLE_BACKENDS, LAYOUTS, HEAD_GROUPS, TRANSPORTS, SDPA, SDPA_GQA, PROFILE (0 = skip the profiled run),
# PROFILE_SEQ (default: the longest of SEQS), SHORT_WARMUP/SHORT_ITERS (seq <= 32K),
# LONG_WARMUP/LONG_ITERS, LIMIT_SHORT/LIMIT_LONG (seconds per launch), BUDGET (seconds for all launches),
# INTERLEAVE (N > 0: ours also times N rounds alternating with the one-GPU kernel, a baseline under the
# same clocks; see benchmark/README.md; it costs about N x 10 iterations per configuration).
set -u

OUT=${1:-benchmark/results/$(date +%F)-suite}
NPROC=${NPROC:-2}
SEQS=${SEQS:-"32768 131072"}
KVS=${KVS:-"32 8"}
NHEADS=${NHEADS:-32}
HEAD_DIM=${HEAD_DIM:-128}
DTYPE=${DTYPE:-bf16}
BACKENDS=${BACKENDS:-"fa4 cudnn"}
SINGLE_BACKENDS=${SINGLE_BACKENDS:-$BACKENDS}
LAYOUTS=${LAYOUTS:-"basic zigzag stripe"}
HEAD_GROUPS=${HEAD_GROUPS:-"1 2 4"}
TRANSPORTS=${TRANSPORTS:-"nccl copy_engine"}  # how our ranks exchange data (NCCL kernels, or the copy engines)
SDPA=${SDPA:-cudnn}
SDPA_GQA=${SDPA_GQA:-"$SDPA flash"}  # for KV heads < heads: flash too, in case this torch's CP cannot run cuDNN with GQA
PROFILE=${PROFILE:-1}
SHORT_WARMUP=${SHORT_WARMUP:-3}; SHORT_ITERS=${SHORT_ITERS:-20}
LONG_WARMUP=${LONG_WARMUP:-2};   LONG_ITERS=${LONG_ITERS:-5}
LIMIT_SHORT=${LIMIT_SHORT:-150}; LIMIT_LONG=${LIMIT_LONG:-240}
BUDGET=${BUDGET:-540}  # seconds for all launches; later ones are skipped (and recorded) so the summary always prints
INTERLEAVE=${INTERLEAVE:-0}

export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # no NVLink multicast (the machines' rule)
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lightning_sp from this checkout, installed or not
mkdir -p "$OUT"
RESULTS="$OUT/attention.jsonl"
LOG="$OUT/suite.log"
touch "$RESULTS" "$OUT/profile.jsonl"
SHAPE="--nheads $NHEADS --head_dim $HEAD_DIM --batch_size 1 --dtype $DTYPE"
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the interpreter that has torch (and FlashAttention-4)
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC"
START=$SECONDS

# run NAME LIMIT_S RESULTS_FILE SEQ KV command...: run one launch with a time limit, report it in one line,
# and on failure append a record saying so (configurations with a record of their own keep it)
run() {
    local name=$1 limit=$2 file=$3 seq=$4 kv=$5
    shift 5
    local before after rc t=$SECONDS
    before=$(wc -l < "$file")
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
        echo "$name S=$seq kv=$kv: skipped, the suite's budget of $BUDGET s is spent"
        $PY benchmark/common.py failure --out "$file" --name "$name" --rc 0 --command "$*" --note "the suite's budget of $BUDGET s was spent" \
            --nheads "$NHEADS" --head_dim "$HEAD_DIM" --batch_size 1 --seq_len "${seq%% *}" --kv_heads "${kv%% *}"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "### $(date -Is) $*" >> "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    after=$(wc -l < "$file")
    printf '%-10s S=%-7s kv=%-5s %4ds  rc=%-3d +%d records\n' "$name" "$seq" "$kv" $((SECONDS - t)) "$rc" \
        $((after - before))
    if [ "$rc" -ne 0 ]; then
        $PY benchmark/common.py failure --out "$file" --name "$name" --rc "$rc" --command "$*" \
            --nheads "$NHEADS" --head_dim "$HEAD_DIM" --batch_size 1 --seq_len "${seq%% *}" --kv_heads "${kv%% *}"
        tail -n 4 "$LOG" | cut -c1-400 | sed 's/^/    | /'
    fi
}

$PY - <<EOF 2>&1 | tee -a "$LOG"
import torch
try:
    import flash_attn.cute  # noqa: F401
    fa4 = "FlashAttention-4 installed"
except Exception as exc:
    fa4 = f"no FlashAttention-4 ({type(exc).__name__}: the fa4 rows will fail)"
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"suite: torch {torch.__version__}, {len(gpus)} GPU(s) {gpus[0] if gpus else '(cpu)'}, {fa4}, "
      f"NPROC=$NPROC, results in $RESULTS")
EOF

for S in $SEQS; do
    if [ "$S" -le 32768 ]; then W=$SHORT_WARMUP; I=$SHORT_ITERS; LIMIT=$LIMIT_SHORT
    else W=$LONG_WARMUP; I=$LONG_ITERS; LIMIT=$LIMIT_LONG; fi
    COMMON="$SHAPE --seq_len $S --mode fwd_bwd fwd --warmup $W --iters $I --out $RESULTS"
    # the ceiling first: every row of the summary is measured against it
    run single_gpu "$LIMIT" "$RESULTS" "$S" "$KVS" $PY benchmark/benchmark_qkvpacked_func.py $COMMON \
        --kv_heads $KVS --backend $SINGLE_BACKENDS --world "$NPROC"
    for KV in $KVS; do
        run ours "$LIMIT" "$RESULTS" "$S" "$KV" $TORCHRUN benchmark/benchmark_longctx_qkvpacked.py $COMMON \
            --kv_heads "$KV" --ulysses_degree 1 2 --ring_impl_type $LAYOUTS --backend $BACKENDS --head_groups $HEAD_GROUPS --transport $TRANSPORTS \
            --interleave "$INTERLEAVE"
        if [ "$KV" -lt "$NHEADS" ]; then CP_SDPA=$SDPA_GQA; else CP_SDPA=$SDPA; fi
        run torch_cp "$LIMIT" "$RESULTS" "$S" "$KV" $TORCHRUN benchmark/benchmark_torch_cp.py $COMMON \
            --kv_heads "$KV" --sdpa_backend $CP_SDPA --rotate allgather
    done
done

if [ "$PROFILE" != 0 ]; then
    S=${PROFILE_SEQ:-${SEQS##* }}
    KV=${KVS%% *}
    run profile "$LIMIT_SHORT" "$OUT/profile.jsonl" "$S" "$KV" $TORCHRUN benchmark/benchmark_longctx_qkvpacked.py \
        $SHAPE --seq_len "$S" --kv_heads "$KV" --mode fwd_bwd --ulysses_degree 1 2 --ring_impl_type zigzag \
        --backend $BACKENDS --head_groups $HEAD_GROUPS --transport $TRANSPORTS --warmup 1 --iters 2 --profile "$OUT/profile" --profile_iters 2 --out "$OUT/profile.jsonl"
fi

echo "suite ran $((SECONDS - START)) s"
$PY benchmark/plot.py "$RESULTS" --out_dir "$OUT/plots"
if [ "$PROFILE" != 0 ] && [ -s "$OUT/profile.jsonl" ]; then
    echo "== profiled runs (2 timed iterations each: read the profile lines, not the times; traces in $OUT/profile)"
    $PY benchmark/plot.py "$OUT/profile.jsonl" --no_plots | grep -E "^   u|profile/iter|^== [0-9]+ failed|^   [0-9]+x|first:"
fi
