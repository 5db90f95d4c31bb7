"""Distributed attention error against float64, next to the single-device kernel's own error:

    torchrun --nproc_per_node 2 benchmark/numerics.py --seq_lens 32768 131072 --backends fa4 cudnn

The check and its bounds live in tests/torchrun/numerics.py (``python -m pytest -m gpu`` runs it for
every GPU backend); this is the same script under its benchmark name. See its docstring.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "torchrun"))
from numerics import main  # noqa: E402  (tests/torchrun, ahead of benchmark/common.py)

if __name__ == "__main__":
    main()
