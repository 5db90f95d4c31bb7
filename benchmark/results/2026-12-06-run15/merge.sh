bash .snap/fa4env.sh
export PYTHONPATH=$PWD/.snap:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python .snap/merge_probe.py $OUT/merge_probe.jsonl 2>&1 | grep -v Warn | grep -v exe_args
