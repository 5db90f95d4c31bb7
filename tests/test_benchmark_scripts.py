"""Smoke runs of the benchmark scripts on CPU with tiny shapes: they run, write well-formed records,
record failures instead of crashing or hanging, and plot.py summarizes and draws them.

The torchrun launches (ours, torch CP, the clock trace and the numerics, 2 gloo processes each) and
the GPU-check entry points (kernel_check.py, gpu_check.sh, which must skip every test with the
reason without a GPU) start together and run while the single-GPU script and the trace summary run
in this process. The training benchmark trains the
tiny decoder through Lightning under ulysses_ring and ddp (2 gloo processes each, started together);
its slow-tier test fails one rank with a simulated out-of-memory error in a --find_max search.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

# every test here launches the benchmark scripts (torchrun, several processes): the slow tier
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmark")
TINY = ["--nheads", "4", "--head_dim", "16", "--seq_len", "64", "--warmup", "1", "--iters", "2"]
LAUNCH_TIMEOUT = 240

RECORD_FIELDS = {"name", "card", "date", "world", "nheads", "kv_heads", "head_dim", "batch_size", "seq_len",
                 "fwd_only", "causal", "dtype", "warmup", "iters", "ulysses", "ring", "layout", "backend", "kernel",
                 "error", "args", "command", "torch"}
TIMING_FIELDS = {"time_ms", "time_ms_min", "time_ms_mean", "iters_per_s", "flops", "tflops_per_gpu",
                 "peak_mem_gib", "peak_extra_gib"}


def _module(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _launch(cmd, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _torchrun(script, args, out, tiny=TINY):
    return _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    os.path.join(BENCH, script), *tiny, *args, "--out", out])


def _finish(proc):
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish in {LAUNCH_TIMEOUT} s (hang?):\n{out[-3000:]}")
    return proc.returncode, out


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _succeeded(proc, path):
    """(records, output) of a launch that must end with status 0."""
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
    return _records(path), out


def _check_timed(r, name, world):
    assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
    assert r["name"] == name and r["world"] == world and r["card"] == "cpu"
    assert r["error"] is None, r["error"]
    assert TIMING_FIELDS <= set(r)
    assert r["time_ms_min"] <= r["time_ms"] and math.isfinite(r["time_ms"]) and r["time_ms"] > 0
    assert len(r["times_ms"]) == r["iters"] and min(r["times_ms"]) == pytest.approx(r["time_ms_min"], abs=1e-4)
    assert 0 < r["enqueue_ms"] and isinstance(r["env"], dict)
    assert r["iters_per_s"] == pytest.approx(1e3 / r["time_ms"])
    fwd = 4 * r["batch_size"] * r["seq_len"] ** 2 * r["nheads"] * r["head_dim"] / 2
    assert r["flops"] == pytest.approx(fwd if r["fwd_only"] else 3.5 * fwd)
    assert r["tflops_per_gpu"] == pytest.approx(r["flops"] / world / (r["time_ms"] / 1e3) / 1e12)
    assert r["peak_mem_gib"] is None  # cpu
    assert r["command"].split()[0] in ("torchrun", "python")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Start ours and torch CP under torchrun; the tests wait for them when they need their records."""
    d = tmp_path_factory.mktemp("bench")
    ours_out, cp_out = str(d / "ours.jsonl"), str(d / "cp.jsonl")
    ours = _torchrun("benchmark_longctx_qkvpacked.py",
                     ["--kv_heads", "4", "2", "--mode", "fwd_bwd", "fwd", "--ulysses_degree", "1", "2", "3",
                      "--ring_impl_type", "zigzag", "strip", "--backend", "cpu_flash", "--profile", str(d / "prof"),
                      "--interleave", "2", "--interleave_iters", "2"],
                     ours_out)
    cp = _torchrun("benchmark_torch_cp.py", ["--kv_heads", "4", "2", "--sdpa_backend", "flash"], cp_out)
    separate_out = str(d / "separate.jsonl")
    separate = _torchrun("benchmark_longctx_qkvpacked.py", ["--kv_heads", "4", "--mode", "fwd_bwd", "--separate_qkv",
                                                           "--backend", "cpu_flash", "--profile", str(d / "prof")],
                         separate_out)
    clocks_out = str(d / "clocks.jsonl")
    clocks = _torchrun("clock_trace.py", ["--backend", "cpu_flash", "--rounds", "2", "--baseline_iters", "2",
                                          "--ours_iters", "3"], clocks_out)
    numerics_out = str(d / "numerics.jsonl")
    numerics = _torchrun("numerics.py", ["--seq_lens", "64", "--nheads", "4", "--kv_heads", "2", "--head_dim", "16",
                                         "--backends", "cpu_flash", "cudnn"], numerics_out, tiny=())
    # the GPU checks' entry points with no GPU visible, whatever the machine: every test skips
    kernel_check = _launch([sys.executable, os.path.join(BENCH, "kernel_check.py")], CUDA_VISIBLE_DEVICES="")
    gpu_out = d / "gpu_check"
    gpu_check = _launch(["bash", os.path.join(BENCH, "gpu_check.sh"), str(gpu_out),
                         "tests/gpu/test_gpu_distributed.py"], CUDA_VISIBLE_DEVICES="")
    procs = {"ours": (ours, ours_out), "cp": (cp, cp_out), "separate": (separate, separate_out),
             "clocks": (clocks, clocks_out), "numerics": (numerics, numerics_out),
             "kernel_check": (kernel_check, None), "gpu_check": (gpu_check, str(gpu_out))}
    yield d, procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_clock_trace_records_every_iteration(launches):
    [r], text = _succeeded(*launches[1]["clocks"])
    assert r["name"] == "clock_trace" and r["kernel"] == "cpu_flash" and r["ring"] == 2
    sides = [(it["round"], it["side"]) for it in r["iterations"]]
    assert sides == [(0, "baseline")] * 2 + [(0, "ours")] * 3 + [(1, "baseline")] * 2 + [(1, "ours")] * 3
    assert all(it["ms"] > 0 and it["sm_mhz"] == it["power_w"] == [None, None] for it in r["iterations"])  # cpu
    assert "ours: median" in text


def test_single_gpu_ceiling_records(launches):
    d, _ = launches
    out = str(d / "single.jsonl")
    _module("benchmark_qkvpacked_func").main([*TINY, "--kv_heads", "4", "2", "--mode", "fwd_bwd", "fwd",
                                              "--backend", "auto", "cudnn", "--world", "2", "--out", out])
    records = _records(out)
    assert [(r["kv_heads"], r["fwd_only"], r["backend"]) for r in records] == [
        (kv, fwd, b) for kv in (4, 2) for fwd in (False, True) for b in ("auto", "cudnn")]
    for r in records:
        if r["backend"] == "cudnn":  # not on cpu: recorded, not raised
            assert "KernelError" in r["error"] and "time_ms" not in r
            continue
        _check_timed(r, "single_gpu", 1)
        assert r["kernel"] == "cpu_flash" and r["ulysses"] == r["ring"] == 1
        assert r["perfect_world"] == 2 and r["perfect_time_ms"] == pytest.approx(r["time_ms"] / 2)


def test_ours_records(launches):
    _, procs = launches
    records, _ = _succeeded(*procs["ours"])
    timed = [r for r in records if r["error"] is None]
    # per shape: u1 x r2 in zigzag and stripe, u2 x r1 once; u3 does not divide 2 -> one error record
    assert len(timed) == 4 * 3 and len(records) == 4 * 4
    for r in timed:
        _check_timed(r, "ours", 2)
        assert r["kernel"] == "cpu_flash" and r["ulysses"] * r["ring"] == 2
        assert r["input"] == ("qkvpacked" if r["kv_heads"] == 4 else "q,k,v")
        # auto: 2 where Ulysses splits the per-rank heads in two (4 heads / 2 ranks), else 1
        assert r["head_groups"] == (2 if r["ulysses"] == 2 and r["kv_heads"] == 4 else 1)
        assert r["profile"]["gpu_events"] == 0 and os.path.exists(r["profile"]["trace"])
        assert os.path.getsize(r["profile"]["table"]) > 0
        inter = r["interleaved"]
        assert inter["baseline_kernel"] == "cpu_flash" and len(inter["ours_times_ms"]) == 4  # warm-up round not counted
        assert (inter["rounds"], inter["warmup_rounds"]) == (2, 1)
        assert inter["baseline_ms"] == pytest.approx(statistics.median(inter["baseline_times_ms"]))
        assert inter["perfect_pct"] == pytest.approx(100 * inter["baseline_ms"] / 2 / inter["ours_ms"])
        # clocks and power per round and rank: not measured on cpu
        assert inter["ours_sm_mhz"] == inter["baseline_power_w"] == [[None, None]] * 2
    assert {(r["ring"], r["layout"]) for r in timed} == {(2, "zigzag"), (2, "stripe"), (1, "zigzag")}
    assert {r["ring_impl_type"] for r in timed if r["layout"] == "stripe"} == {"strip"}
    bad = [r for r in records if r["error"] is not None]
    assert all(r["ulysses"] == 3 and "does not divide the world size 2" in r["error"] for r in bad)


def test_ours_mha_from_separate_qkv(launches):
    _, procs = launches
    [r], _ = _succeeded(*procs["separate"])
    _check_timed(r, "ours", 2)
    assert r["input"] == "q,k,v" and r["kv_heads"] == r["nheads"] and r["config"].endswith(" q,k,v")
    assert r["profile"]["trace"].endswith("_separate_qkv_rank0.trace.json")  # not the packed run's file


def test_torch_cp_fails_clearly_on_cpu(launches):
    _, procs = launches
    records, _ = _succeeded(*procs["cp"])
    assert [(r["kv_heads"], r["fwd_only"]) for r in records] == [(4, False), (2, False)]
    for r in records:
        assert RECORD_FIELDS <= set(r) and r["name"] == "torch_cp" and r["sdpa_backend"] == "flash"
        assert "sharding strategy" in r["error"] and "GPUs only" in r["error"]
        assert r["load_balance"] is True and r["layout"] == "zigzag"  # 64 tokens split head-tail over 2 ranks
        assert r["sdpa_patched"] is True


def test_numerics_records_every_split_and_fails_for_a_backend_that_cannot_run(launches):
    """float64 on gloo: every split of 2 ranks and layout within 1e-10 of float64, recorded with its
    bound; cudnn cannot run on a CPU, which fails the launch, named, after the other records."""
    proc, path = launches[1]["numerics"]
    rc, text = _finish(proc)
    assert rc != 0 and "FAIL S=64 backend=cudnn cannot run" in text and "cudnn runs on CUDA GPUs only" in text
    records = _records(path)
    assert [(r["ulysses"], r["ring"], r["layout"]) for r in records] == [
        (1, 2, "contiguous"), (1, 2, "zigzag"), (1, 2, "stripe"), (2, 1, "contiguous")]
    assert text.count("PASS S=64 cpu_flash") == 4
    for r in records:
        assert r["backend"] == "cpu_flash" and r["passed"] is True and r["world"] == 2 and r["card"] == "cpu"
        assert (r["dtype"], r["nheads"], r["kv_heads"], r["seq_len"]) == ("torch.float64", 4, 2, 64)
        assert max(r[f"{n}_err"] for n in ("out", "dq", "dk", "dv")) < 1e-10
        assert r["bound"] == (1.05 if r["ulysses"] == 2 else 1.3)  # pure Ulysses: 2 KV heads split evenly
        assert r["command"].startswith("torchrun --nproc_per_node 2 benchmark/numerics.py --seq_lens 64 ")


def test_gpu_check_entry_points_skip_every_test_with_the_reason_without_a_gpu(launches):
    import xml.etree.ElementTree as ET

    _, procs = launches
    rc, text = _finish(procs["kernel_check"][0])
    assert rc == 0, text[-3000:]
    assert "needs a CUDA GPU" in text and " skipped" in text and "passed" not in text and "failed" not in text
    proc, out = procs["gpu_check"]
    rc, text = _finish(proc)
    assert rc == 0, text[-3000:]
    log = open(os.path.join(out, "gpu_check.log")).read()
    assert "0 GPU(s)" in log and "gpu_check: pytest exit status 0" in log
    cases = ET.parse(os.path.join(out, "gpu_check.xml")).getroot().iter("testcase")
    skipped = [c.find("skipped") for c in cases]
    assert len(skipped) >= 10 and all(s is not None and "needs a CUDA GPU" in s.get("message") for s in skipped)


def test_plot_summary_and_figures(launches, capsys):
    d, procs = launches
    for proc, _ in procs.values():
        _finish(proc)
    plot = _module("plot")
    try:
        import matplotlib  # noqa: F401
        plots = []
    except ImportError:
        plots = ["--no_plots"]
    plot.main([str(d / "ours.jsonl"), str(d / "single.jsonl"), str(d / "cp.jsonl"), str(d / "separate.jsonl"),
               "--out_dir", str(d / "plots"), *plots])
    text = capsys.readouterr().out
    assert "== h4/kv4 d16 b1 S=64 fwd+bwd on cpu" in text and "== h4/kv2 d16 b1 S=64 fwd on cpu" in text
    assert "u1xr2 zigzag / cpu_flash" in text and "u2xr1 zigzag / cpu_flash" in text
    assert "u1xr2 zigzag / cpu_flash / auto / q,k,v" in text  # --separate_qkv: its own row beside the packed one
    assert "%perf-cpu_flash" in text and "failed configuration" in text
    assert "same launch, one-GPU cpu_flash / 2 = " in text and "% interleaved (" in text
    if not plots:
        assert len([f for f in os.listdir(d / "plots") if f.endswith(".png")]) == 4


def test_trace_summary_counts_exposed_comm_idle_and_copies(tmp_path):
    common = _module("common")
    events = [  # two iterations on one GPU, microseconds
        dict(ph="X", cat="kernel", name="flash_fwd_kernel", ts=0, dur=100),
        dict(ph="X", cat="kernel", name="ncclDevKernel_SendRecv", ts=50, dur=80),  # 30 us exposed
        dict(ph="X", cat="gpu_memcpy", name="Memcpy DtoD", ts=140, dur=10),
        dict(ph="X", cat="kernel", name="flash_fwd_kernel", ts=200, dur=100),  # 50 us idle before it
        dict(ph="X", cat="cpu_op", name="aten::mm", ts=0, dur=999),
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = common.summarize_trace(str(path), iters=2)
    assert s["gpu_events"] == 4
    assert s["window_ms"] == pytest.approx(0.300 / 2)
    assert s["compute_ms"] == pytest.approx(0.210 / 2)
    assert s["comm_ms"] == pytest.approx(0.080 / 2)
    assert s["exposed_comm_ms"] == pytest.approx(0.030 / 2)
    assert s["idle_ms"] == pytest.approx(0.060 / 2)
    assert s["copy_ms"] == pytest.approx(0.010 / 2)
    assert s["top_kernels"][0]["name"] == "flash_fwd_kernel" and s["top_kernels"][0]["calls_per_iter"] == 1
    assert s["kernel_ms_by_kind"] == pytest.approx({"attention": 0.100, "nccl": 0.040, "copy": 0.005})
    assert [common.kernel_kind(n) for n in ("nvjet_tst_128x256", "sm90_xmma_gemm_bf16", "vectorized_elementwise",
                                            "cudnn_generated_fort_native_sdpa", "elementwise_copy")] == [
        "matmul", "matmul", "other", "attention", "copy"]


# ------------------------------------------------------------------------------ training benchmark

TRAIN = [sys.executable, os.path.join(BENCH, "benchmark_train.py"), "--model", "tiny", "--accelerator", "cpu",
         "--devices", "2", "--warmup", "1", "--steps", "2", "--quiet"]
TRAIN_FIELDS = {"name", "card", "date", "torch", "command", "model", "strategy", "world", "ulysses", "ring", "dp",
                "layout", "backend", "attention", "kernel", "checkpointing", "seq_len", "tokens_per_step",
                "step_time_s", "all_step_times_s", "tokens_per_s", "flops_per_token", "flops_params",
                "flops_params_note", "mfu", "peak_mem_gib", "peak_mem_gib_per_rank", "compile", "completed", "error", "args"}


def _train(args, out, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([*TRAIN, *args, "--out", out], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def train_launches(tmp_path_factory):
    """ulysses_ring and ddp, 2 gloo processes each, started together."""
    d = tmp_path_factory.mktemp("train")
    runs = {"ulysses_ring": ["--strategy", "ulysses_ring", "--seq_len", "64", "--checkpointing", "except_attention",
                             "--peak_tflops", "1", "--profile", str(d / "prof"), "--head_groups", "1",
                             "--checkpointed_layers", "1"],
            "ddp": ["--strategy", "ddp", "--seq_len", "48", "--compile"]}
    procs = {k: (_train(a, str(d / f"{k}.jsonl")), str(d / f"{k}.jsonl")) for k, a in runs.items()}
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _check_train(r, strategy, seq_len):
    from lightning_sp.models import LlamaConfig

    assert TRAIN_FIELDS <= set(r), TRAIN_FIELDS - set(r)
    assert r["name"] == "train" and r["completed"] is True and r["error"] is None
    assert r["card"] == "cpu" and r["world"] == 2 and r["strategy"] == strategy and r["seq_len"] == seq_len
    assert r["command"].startswith("python ") and "benchmark_train.py" in r["command"]
    assert len(r["all_step_times_s"]) == 2 and len(r["warmup_step_times_s"]) == 1
    assert r["step_time_s"] == pytest.approx(statistics.median(r["all_step_times_s"]))
    assert r["tokens_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
    config = LlamaConfig(**r["config"])
    assert r["flops_params"] == config.num_params() - config.vocab_size * config.hidden_size  # untied: no lookup
    attn = 6 * config.num_layers * config.num_heads * config.head_dim * seq_len  # 12 L h d S, causal half
    assert r["flops_per_token"] == pytest.approx(6 * r["flops_params"] + attn)
    assert r["peak_mem_gib"] is None  # cpu
    assert math.isfinite(r["final_loss"])


def test_train_benchmark_ulysses_ring(train_launches):
    [r], out = _succeeded(*train_launches["ulysses_ring"])
    _check_train(r, "ulysses_ring", 64)
    assert (r["ulysses"], r["ring"], r["dp"], r["layout"]) == (2, 1, 1, "zigzag")  # auto: Ulysses over both
    assert r["head_groups"] == 1 and r["args"]["head_groups"] == 1  # --head_groups, through the strategy
    assert r["tokens_per_step"] == 64  # the two ranks share one sequence
    assert r["attention"] == "LongContextAttention" and r["backend"] == "auto" and r["kernel"] == "cpu_flash"
    assert r["checkpointing"] == "except_attention" and r["compile"] is False  # tiny.yaml's compile_blocks
    assert r["checkpointed_layers"] == 1
    # --profile: one more step, profiled and not timed (_check_train saw 2 timed steps)
    assert r["profile"]["gpu_events"] == 0 and os.path.getsize(r["profile"]["table"]) > 0  # cpu: no GPU activity
    assert os.path.exists(r["profile"]["trace"])
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / (1e12 * 2))  # --peak_tflops 1
    assert "train tiny ulysses_ring S=64" in out and "tokens/s" in out


def test_train_benchmark_ddp_keeps_local_attention(train_launches):
    [r], _ = _succeeded(*train_launches["ddp"])
    _check_train(r, "ddp", 48)
    assert (r["ulysses"], r["ring"], r["dp"], r["layout"], r["head_groups"]) == (1, 1, 2, None, None)
    assert r["tokens_per_step"] == 2 * 48  # each GPU its own sequence
    assert (r["attention"], r["backend"], r["kernel"]) == ("LocalAttention", "local", "torch_sdpa")
    assert r["checkpointing"] == "none" and r["mfu"] is None  # tiny.yaml's mode; no peak known on cpu
    assert r["compile"] is True  # --compile: the layers' parts around the attention compiled (inductor)


@pytest.mark.slow
def test_train_benchmark_find_max_survives_an_oom_on_one_rank(tmp_path):
    """The last rank fails with (simulated) out-of-memory at 64 tokens while the other waits in a
    collective: the launch ends, is recorded, and the search reports 32 as the longest."""
    out = str(tmp_path / "find.jsonl")
    proc = _train(["--strategy", "ulysses_ring", "--seq_len", "32", "--find_max", "--max_seq_len", "128",
                   "--checkpointing", "full"], out, env={"LIGHTNING_SP_BENCH_SIMULATE_OOM_ABOVE": "32"})
    rc, text = _finish(proc)
    assert rc == 0, text[-3000:]
    records = _records(out)
    assert len(records) == 3, (records, text[-3000:])  # 32 completed, 64 failed, the summary
    ok, failed, summary = records
    assert ok["seq_len"] == 32 and ok["completed"] and ok["checkpointing"] == "full"
    assert failed["seq_len"] == 64 and failed["completed"] is False and failed["oom"] is True
    assert "simulated out of memory" in failed["error"] and failed["command"] == ok["command"]
    assert summary["name"] == "train_find_max" and summary["longest_completed"] == 32
    assert summary["tried"] == [32, 64] and summary["first_failed"] == 64 and summary["stopped_by"] == "failure"
    assert "find_max: longest completed 32 tokens" in text


def test_memory_estimate_per_layer_costs():
    """Fake tensors, no compute. What one more layer keeps per token: with full checkpointing its
    fp32 input (4 x hidden bytes); with except_attention also the attention's bf16 q, k, v and output
    and its fp32 log-sum-exp; without checkpointing more still. The chunked MLP lowers the peak."""
    est = _module("estimate_memory")
    c = dict(vocab_size=256, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2)
    tokens, hd = 8192, 256 // 4

    def peak(mode, layers, chunk=None):
        return est.activation_peak(dict(c, num_layers=layers), dict(activation_checkpointing=mode,
                                                                     mlp_chunk_size=chunk), tokens)

    def per_layer(mode):
        return (peak(mode, 3) - peak(mode, 2)) / tokens

    full, selective, none = per_layer("full"), per_layer("except_attention"), per_layer("none")
    assert full == 4 * c["hidden_size"]
    attention = 2 * (2 * c["num_heads"] * hd + 2 * c["num_kv_heads"] * hd) + 4 * c["num_heads"]
    assert selective == pytest.approx(full + attention, rel=0.05)
    assert none > selective
    assert peak("none", 2, chunk=1024) < peak("none", 2)


def test_transport_benchmark_on_cpu(tmp_path):
    """The transport microbenchmark runs over gloo (torch.distributed) and records why the copy
    engines cannot run on CPU instead of crashing."""
    out = str(tmp_path / "transport.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(BENCH, "bench_transport.py"), "--mib", "1", "--transport", "nccl", "copy_engine",
           "--compute", "matmul", "--matmul_size", "32", "--iters", "2", "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    records, _ = _succeeded(proc, out)
    assert [(r["transport"], r["pattern"]) for r in records] == [
        ("nccl", "ring"), ("nccl", "all_to_all"), ("copy_engine", "ring"), ("copy_engine", "all_to_all")]
    for r in records[:2]:
        assert r["error"] is None and r["gb_per_s"] > 0 and r["matmul"]["compute_ms"] > 0
    for r in records[2:]:
        assert "transport 'copy_engine' needs CUDA tensors, got cpu" in r["error"]
