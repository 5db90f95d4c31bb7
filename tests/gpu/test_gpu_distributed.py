"""The multi-process GPU checks, each launched with torchrun as a subprocess (NCCL, bf16, NVLink
multicast off) under a time limit:

- the numerics (tests/torchrun/numerics.py) for each backend: LongContextAttention's error against
  float64 within a factor of the one-GPU kernel's own error (1.3x, 1.05x for pure Ulysses), over
  every (ulysses, ring) split and layout; on one GPU the single-rank path, on all GPUs of the
  machine when it has two or more;
- the reference project's test commands mirrored in tests/torchrun/test_*.py, on all GPUs (2+).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_support import GPU_BACKENDS, gpu_count, usable_kernel

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = ROOT / "tests" / "torchrun"
SCRIPTS = sorted(p.name for p in TORCHRUN.glob("test_*.py"))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LAUNCH_TIMEOUT = 480
NUMERICS_SEQ = 8192  # 4096 tokens a rank on 2 GPUs; the reference backend's one-GPU scores stay at 2 GiB


def torchrun(script: Path, nproc: int, *args: str) -> str:
    """Run ``script`` on ``nproc`` GPUs; returns its output, fails the test on a non-zero exit or
    when the launch outlives LAUNCH_TIMEOUT (the whole process group is killed either way)."""
    env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script.name} on {nproc} GPUs did not finish in {LAUNCH_TIMEOUT} s (hang?):\n{out[-4000:]}")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, the suite's time limit): leave no rank behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    print(out[-6000:])
    assert proc.returncode == 0, f"{script.name} on {nproc} GPUs failed:\n{out[-4000:]}"
    return out


def several_gpus() -> int:
    n = gpu_count()
    if n < 2:
        pytest.skip(f"needs 2 or more CUDA GPUs, found {n} (run on a machine with several)")
    return n


@pytest.mark.parametrize("world", ["one_gpu", "all_gpus"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_numerics(cuda, backend, world, tmp_path, record_property):
    usable_kernel(backend)
    nproc = 1 if world == "one_gpu" else several_gpus()
    records = tmp_path / "numerics.jsonl"
    torchrun(TORCHRUN / "numerics.py", nproc, "--seq_lens", str(NUMERICS_SEQ), "--backends", backend,
             "--out", str(records))
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    for r in rows:
        record_property(f"u{r['ulysses']}xr{r['ring']}_{r['layout']}",
                        {n: f"{r[n + '_err']:.2e} ({r[n + '_ratio']:.3f}x)" for n in ("out", "dq", "dk", "dv")})
    splits = [(u, nproc // u) for u in range(1, nproc + 1) if nproc % u == 0]
    layouts = {1: ("contiguous",)}  # one rank a ring: no layout to choose
    assert sorted((r["ulysses"], r["ring"], r["layout"]) for r in rows) == sorted(
        (u, r, layout) for u, r in splits for layout in layouts.get(r, ("contiguous", "zigzag", "stripe")))
    assert all(r["passed"] and r["backend"] == backend and r["world"] == nproc for r in rows)


@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_check(cuda, script):
    out = torchrun(TORCHRUN / script, several_gpus())
    assert "PASS" in out and "FAIL" not in out
