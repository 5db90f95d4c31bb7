bash .snap/fa4env.sh
export PYTHONPATH=$PWD/.snap:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd .snap && echo rev $(cat REV)
timeout 200 python benchmark/benchmark_documents.py --compute_side --world 8 --ulysses 1 2 4 --layout placed --distribution mixed --kv_heads 32 --warmup 2 --iters 5 --rounds 3 --out $OUT/documents_hybrid.jsonl 2>&1 | grep -v Warn | grep -v exe_args
