set -o pipefail
export PYTHONPATH=$PWD/.snap:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd .snap && echo rev $(cat REV)
timeout 400 python benchmark/benchmark_documents.py --compute_side --world 2 4 8 --kv_heads 32 --warmup 2 --iters 5 --rounds 3 --distribution mixed window 128x1k 16x8k one --out $OUT/documents_final.jsonl 2>&1 | grep -v Warn | grep -v exe_args
timeout 150 python benchmark/benchmark_documents.py --compute_side --world 2 4 8 --layout placed --balance_tie 1 --kv_heads 32 --warmup 2 --iters 5 --rounds 3 --distribution mixed --out $OUT/documents_final_tie1.jsonl 2>&1 | grep -v Warn | grep -v exe_args | sed 's/^/tie1 /'
