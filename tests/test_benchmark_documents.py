"""Smoke runs of benchmark/benchmark_documents.py on CPU with tiny batches: the one-process
compute-side mode (every distribution, P = 2 and 4, both layouts), a 2-process gloo launch (slow
tier), and the summary and figures of their records."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmark", "benchmark_documents.py")
TINY = ["--seq_len", "256", "--nheads", "2", "--head_dim", "16", "--warmup", "0", "--iters", "2"]
TIMEOUT = 600


def _torchrun(args, out):
    """Records of a 2-process gloo launch that must end with status 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, *TINY,
           *args, "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"benchmark did not finish in {TIMEOUT} s (hang?):\n{(exc.stdout or '')[-3000:]}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with open(out) as f:
        return [json.loads(line) for line in f]


def _module():
    spec = importlib.util.spec_from_file_location("benchmark_documents", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summarize(path, out_dir, capsys):
    assert _module().main(["--summarize", path, "--out_dir", out_dir]) == 0
    return capsys.readouterr().out


def test_compute_side_records_and_summary(tmp_path, capsys):
    """In this process, one torch thread (the CPU is shared; spinning threads distort the timings)."""
    out = str(tmp_path / "compute.jsonl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _module().main([*TINY, "--iters", "1", "--rounds", "2", "--compute_side", "--world", "2", "4",
                               "--out", out]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        records = [json.loads(line) for line in f]
    names = ["one", "16x8k", "128x1k", "mixed", "window"]
    assert [(r["name"], r["distribution"], r["world"], r["layout"]) for r in records] == [
        row for d in names for row in [("single_gpu", d, 1, None)]
        + [("compute_side", d, P, layout) for P in (2, 4) for layout in ("placed", "zigzag")]]
    for r in records:
        assert r["error"] is None, r["error"]
        assert r["card"] == "cpu" and r["seq_len"] == 256 and math.isfinite(r["time_ms"]) and r["time_ms"] > 0
        assert r["window"] == (8 if r["distribution"] == "window" else None)
        if r["name"] == "single_gpu":
            continue
        assert len(r["rank_ms"]) == len(r["rank_enqueue_ms"]) == r["world"] and r["time_ms"] == max(r["rank_ms"])
        assert r["rounds"] == 2
        assert r["efficiency"] == pytest.approx(r["single_ms"] / r["world"] / r["time_ms"])
        assert r["tokens_per_rank"] * r["world"] >= 256 and r["balance"] >= 1
        if r["layout"] == "zigzag":  # every document over every rank
            assert r["spanning_documents"] == r["documents"] and r["largest_subring"] == r["world"]
        else:
            assert r["balance"] <= 1.03
        if r["layout"] == "placed" and r["distribution"] == "128x1k":  # 2 tokens each: all whole, nothing sent
            assert r["spanning_documents"] == 0 and r["kv_tokens_sent_per_rank"] == 0
    capsys.readouterr()
    text = _summarize(out, str(tmp_path / "plots"), capsys)
    assert "compute-side mixed    P=4   placed" in text and "one GPU, whole batch" in text
    assert os.listdir(tmp_path / "plots") == ["documents_compute_side_h2_kv2_d16_s256_fwdbwd_cpu.png"]


def test_compute_side_under_ulysses(tmp_path, capsys):
    """P GPUs as ulysses U x ring P / U: one timed rank per ring rank, on nheads / U heads; a degree
    that does not divide P or the heads gives a record naming the fix."""
    out = str(tmp_path / "ulysses.jsonl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _module().main([*TINY, "--iters", "1", "--rounds", "1", "--compute_side", "--world", "4",
                               "--ulysses", "1", "2", "4", "--distribution", "mixed", "--layout", "placed",
                               "--out", out]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out) as f:
        single, u1, u2, u4 = [json.loads(line) for line in f]
    assert single["name"] == "single_gpu" and single["error"] is None
    assert (u1["ulysses"], u1["ring"], len(u1["rank_ms"]), u1["error"]) == (1, 4, 4, None)
    assert (u2["ulysses"], u2["ring"], len(u2["rank_ms"]), u2["error"]) == (2, 2, 2, None)
    assert u2["world"] == 4 and u2["efficiency"] == pytest.approx(u2["single_ms"] / 4 / u2["time_ms"])
    assert u2["tokens_per_rank"] % 2 == 0 and u2["tokens_per_rank"] * 2 >= 256  # a ring of 2, split by Ulysses
    assert "--ulysses 4 must divide" in u4["error"] and "query heads (2)" in u4["error"]
    capsys.readouterr()
    text = _summarize(out, str(tmp_path / "plots"), capsys)
    assert "compute-side mixed    P=4 (U2 x R2) placed " in text


@pytest.mark.slow
def test_torchrun_records(tmp_path, capsys):
    out = str(tmp_path / "dist.jsonl")
    records = _torchrun(["--distribution", "mixed", "window"], out)
    configs = [(r["name"], r["distribution"], r["layout"], r["path"]) for r in records]
    assert configs == [row for d in ("mixed", "window") for row in [
        ("single_gpu", d, None, None), ("ours", d, "placed", "compute_only"), ("ours", d, "placed", "ring"),
        ("ours", d, "zigzag", "compute_only"), ("ours", d, "zigzag", "ring"), ("torch_cp", d, "flex", None)]]
    for r in records:
        if r["name"] == "torch_cp":  # FlexAttention has no CPU backward: recorded, not raised
            assert "FlexAttention does not support backward on CPU" in r["error"]
            continue
        assert r["error"] is None, r["error"]
        assert r["world"] == (1 if r["name"] == "single_gpu" else 2) and len(r["times_ms"]) == 2
    text = _summarize(out, str(tmp_path / "plots"), capsys)
    assert "% of perfect on 2" in text and "2 failed or skipped" in text
    assert os.listdir(tmp_path / "plots") == ["documents_distributed_h2_kv2_d16_s256_fwdbwd_cpu.png"]
