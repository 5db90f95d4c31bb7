set -o pipefail
export PYTHONPATH=$PWD/.snap:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages NCCL_NVLS_ENABLE=0
cd .snap && echo rev $(cat REV)
timeout 300 python benchmark/benchmark_documents.py --compute_side --world 2 4 8 --layout placed zigzag --kv_heads 32 --warmup 2 --iters 5 --rounds 5 --distribution mixed --out $OUT/documents_mixed_repeat.jsonl 2>&1 | grep -v Warn | grep -v exe_args | grep -v "^single_gpu\|^compute_side"
