"""torchrun --nproc_per_node 8 tests/torchrun/test_ulysses_attn.py  (pure Ulysses; MQA replicates KV heads)"""
from common import check_dense

if __name__ == "__main__":
    import os
    world = int(os.environ["WORLD_SIZE"])
    check_dense("UlyssesAttention", "contiguous", ulysses_degrees=(world,), heads=8, kv_heads=1)
