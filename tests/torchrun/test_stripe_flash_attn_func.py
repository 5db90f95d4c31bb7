"""torchrun --nproc_per_node 8 tests/torchrun/test_stripe_flash_attn_func.py"""
from common import check_dense

if __name__ == "__main__":
    check_dense("stripe_flash_attn_func", "stripe")
