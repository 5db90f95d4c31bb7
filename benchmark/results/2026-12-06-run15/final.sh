set -o pipefail
bash .snap/fa4env.sh 2>&1 | grep -v WARNING
export PYTHONPATH=$PWD/.snap:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
cd .snap && echo rev $(cat REV)
timeout 520 python benchmark/benchmark_documents.py --compute_side --world 2 4 8 --kv_heads 32 --warmup 2 --iters 5 --rounds 3 --distribution mixed window 128x1k 16x8k one --out $OUT/documents_final.jsonl 2>&1 | grep -v Warn | grep -v exe_args | grep -v "^single_gpu\|^compute_side"
