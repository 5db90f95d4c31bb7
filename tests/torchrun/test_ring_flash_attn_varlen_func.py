"""torchrun --nproc_per_node 8 tests/torchrun/test_ring_flash_attn_varlen_func.py"""
from common import check_varlen

if __name__ == "__main__":
    check_varlen("ring_flash_attn_varlen_func", "contiguous")
