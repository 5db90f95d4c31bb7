"""Every block-kernel backend on this GPU against float64, through the contract:

    python benchmark/kernel_check.py [pytest options, e.g. -k fa4]

runs tests/gpu/test_gpu_kernels.py (fa4, cudnn, flash, efficient, reference; bf16 and fp16; causal /
full, MHA / GQA / MQA, unequal block lengths, windows, packed documents, gradients into given
destinations), printing each case's relative errors of out, lse, dq, dk, dv, and why a backend
declines a case; exits non-zero when a case fails. ``python -m pytest -m gpu`` runs the same tests
with every other GPU check. Without a GPU every test skips, saying why.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)  # lightning_sp, uninstalled
    sys.exit(pytest.main(["tests/gpu/test_gpu_kernels.py", "-m", "gpu", "-s", "-q", "-rs", "-p", "no:cacheprovider",
                          *sys.argv[1:]]))
