"""torchrun --nproc_per_node 8 tests/torchrun/test_ring_flash_attn_func.py"""
from common import check_dense

if __name__ == "__main__":
    check_dense([f"ring_flash_attn_{packing}func" for packing in ("", "kvpacked_", "qkvpacked_")], "contiguous")
