"""torchrun --nproc_per_node 8 tests/torchrun/test_long_context_qkvpacked_attn.py  (every ulysses x ring split)"""
from common import check_dense

if __name__ == "__main__":
    check_dense("LongContextAttentionQKVPacked", "zigzag", ulysses_degrees=(1, 2, 4, 8))
