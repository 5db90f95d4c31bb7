"""Offloaded layer checkpoints (lightning_sp.app.models.offload): the layer inputs that full
checkpointing saves go to host buffers and come back exact.

On a CPU the offload is forced (``CheckpointOffload(force=True)``): the same hooks, host pieces and
prefetch order as on a GPU, without streams. Every restored tensor is compared bit for bit with the
tensor that was packed, and the parameters after several optimizer steps with those without offload:
in one process and under the ulysses_ring strategies on gloo ranks. A corrupted host buffer shows
that the comparison can fail. The GPU test (``-m gpu``) checks bf16 training and the memory freed.
"""
from __future__ import annotations

import logging
import weakref

import lightning as pl
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import lightning_sp
from lightning_sp.app.data import LongRangeTask
from lightning_sp.app.lm import CausalLM
from lightning_sp.app.models import LlamaConfig, LlamaForCausalLM, swap_attention
from lightning_sp.app.models.offload import CheckpointOffload, _Saved, piece_sizes
from lightning_sp.core.errors import SPConfigError

VOCAB = 264


class CheckedOffload(CheckpointOffload):
    """The offload itself (forced, small pieces), also keeping a copy of every tensor it moves to
    compare each restored tensor with, bit for bit. ``corrupt``: flip an exponent bit in the host
    copy of the first tensor moved (the test that the comparison fails)."""

    def __init__(self, corrupt: bool = False):
        super().__init__(force=True, granule=256)
        self.corrupt = corrupt
        self.originals = weakref.WeakKeyDictionary()
        self.restored = self.mismatches = self.unpacked = 0
        self.waited = 0  # restores that found no prefetched copy (the last layer's is kept: none should)

    def _pack(self, t, keep):
        saved = super()._pack(t, keep)
        if isinstance(saved, _Saved):
            self.originals[saved] = t.detach().clone()
            if self.corrupt and saved.pieces:
                saved.pieces[-1][7] ^= 0x40  # byte 7 of a float64: sign and exponent
                self.corrupt = False
        return saved

    def _unpack(self, saved):
        if isinstance(saved, _Saved):
            self.unpacked += 1
            self.waited += saved.kept is None and saved.fetched is None
        t = super()._unpack(saved)
        if isinstance(saved, _Saved) and saved.kept is None:
            self.restored += 1
            want = self.originals[saved]
            same = (t.shape == want.shape and t.dtype == want.dtype
                    and torch.equal(t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)))
            self.mismatches += not same
        return t


def tiny(seed=0, layers=3, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                         num_kv_heads=2, init_std=0.1)
    return LlamaForCausalLM(config, activation_checkpointing="full", **kw).double()


def _batches(packed: bool, steps: int, seq: int = 40):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (1, seq), generator=g)
        batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)}
        if packed:
            batch.update(position_ids=torch.cat([torch.arange(16), torch.arange(seq - 16)])[None],
                         cu_seqlens=torch.tensor([0, 16, seq]), max_seqlen=seq - 16)
        yield batch


def _train(model, packed=False, steps=3, offload=None):
    """AdamW steps; the parameters after them, bit for bit comparable, and the host bytes left after
    each step (the saved tensors are freed with the graph)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    left = []
    for batch in _batches(packed, steps):
        hidden = model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"), batch.get("max_seqlen"))
        total, count = model.loss_sum(hidden, batch["labels"])
        (total / count).backward()
        opt.step()
        opt.zero_grad()
        left.append(offload.host_bytes if offload else 0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, left


def _bitwise_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ in any bit."""
    return [k for k in a if not torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))]


# ------------------------------------------------------------------------------------- one process


def test_host_pieces_are_powers_of_two_that_hold_the_tensor():
    for nbytes in (1, 200, 256, 257, 1000, 4096, 12288, (3 << 30) + 5):
        sizes = piece_sizes(nbytes, 256)
        assert all(s & (s - 1) == 0 for s in sizes) and sizes == sorted(sizes, reverse=True)
        assert nbytes <= sum(sizes) < nbytes + 256 or (nbytes < 256 and len(sizes) == 1 and sum(sizes) < 2 * nbytes)
    assert piece_sizes(12 << 30, 2 << 20) == [8 << 30, 4 << 30]
    with pytest.raises(SPConfigError, match="power of two"):
        piece_sizes(10, 3)


@pytest.mark.parametrize("case", [dict(), dict(packed=True), dict(core="long_context"), dict(mlp_chunk_size=16),
                                  dict(checkpointed_layers=2),
                                  dict(packed=True, core="long_context", mlp_chunk_size=8)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "dense")
def test_forced_offload_trains_bit_for_bit_like_no_offload(case):
    case = dict(case)
    packed, core = case.pop("packed", False), case.pop("core", "local")
    models = []
    for offload in (False, True):
        model = tiny(offload_checkpoints=offload, **case)
        if core == "long_context":
            swap_attention(model)  # one process: the block kernel on the whole sequence
        models.append(model)
    checked = models[1].checkpoint_offload = CheckedOffload()
    want, _ = _train(models[0], packed)
    got, left = _train(models[1], packed, offload=checked)
    layers = case.get("checkpointed_layers") or 3
    assert checked.offloaded == 3 * (layers - 1)  # every checkpointed layer but the last, every step
    assert checked.restored == checked.offloaded and checked.unpacked == 3 * layers
    assert checked.mismatches == 0 and checked.waited == 0  # exact, and each one prefetched a layer ahead
    assert left == [0, 0, 0] and checked.peak_host_bytes > 0  # the host buffers go with the graph
    assert _bitwise_equal(want, got) == []


def test_forced_offload_with_compiled_blocks_trains_bit_for_bit_like_no_offload(monkeypatch):
    """compile_blocks (aot_eager: no C++ compiler needed): the compiled parts run inside the
    checkpoint, whose own saved-tensor hooks are innermost; the offload's are around it."""
    from lightning_sp.app.models import llama

    parts = llama._compiled_parts
    monkeypatch.setattr(llama, "_compiled_parts", lambda: parts("aot_eager"))
    torch._dynamo.reset()
    try:
        want, _ = _train(tiny(compile_blocks=True, mlp_chunk_size=16))
        model = tiny(compile_blocks=True, mlp_chunk_size=16, offload_checkpoints=True)
        checked = model.checkpoint_offload = CheckedOffload()
        got, _ = _train(model, offload=checked)
    finally:
        torch._dynamo.reset()
    assert checked.restored == 6 and checked.mismatches == 0
    assert _bitwise_equal(want, got) == []


def test_a_corrupted_host_buffer_is_caught():
    """The comparisons above can fail: one flipped bit in one host buffer shows in both."""
    want, _ = _train(tiny())
    model = tiny(offload_checkpoints=True)
    checked = model.checkpoint_offload = CheckedOffload(corrupt=True)
    got, _ = _train(model)
    assert checked.mismatches == 1
    assert len(_bitwise_equal(want, got)) > 0


def test_a_second_backward_copies_the_inputs_in_again():
    """retain_graph: the host copies stay until the graph goes, and serve every backward pass."""
    grads = []
    for offload in (False, True):
        model = tiny(offload_checkpoints=offload)
        if offload:
            checked = model.checkpoint_offload = CheckedOffload()
        batch = next(_batches(False, 1))
        total, count = model.loss_sum(model(batch["input_ids"]), batch["labels"])
        (total / count).backward(retain_graph=True)
        (total / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert checked.restored == 4 and checked.mismatches == 0
    assert _bitwise_equal(*grads) == []


def test_on_a_cpu_offload_is_a_no_op_that_says_so_once(caplog):
    want, _ = _train(tiny())
    model = tiny(offload_checkpoints=True)
    with caplog.at_level(logging.WARNING, logger="lightning_sp.app.models.offload"):
        got, _ = _train(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_sp.app.models.offload"]
    assert len(lines) == 1 and "nothing to offload" in lines[0] and "cpu" in lines[0]
    assert model.checkpoint_offload.offloaded == 0 and _bitwise_equal(want, got) == []


def test_offload_needs_full_checkpointing_and_says_so():
    for mode in ("none", "except_attention", False):
        with pytest.raises(SPConfigError, match="needs activation_checkpointing='full'.*checkpointing: full"):
            LlamaForCausalLM(activation_checkpointing=mode, offload_checkpoints=True)
    with pytest.raises(SPConfigError, match="offload_checkpoints must be a bool"):
        LlamaForCausalLM(activation_checkpointing="full", offload_checkpoints="yes")
    model = tiny(offload_checkpoints=True)
    model.activation_checkpointing = "except_attention"  # changed after construction: the forward says so
    with pytest.raises(SPConfigError, match="needs activation_checkpointing='full'"):
        model(torch.zeros(1, 8, dtype=torch.long))
    assert tiny().checkpoint_offload is None


def test_checkpoints_are_the_same_with_and_without_offload():
    """The offload is no state: the state dict (so a checkpoint, and resuming from one) is unchanged."""
    with_offload, without = tiny(offload_checkpoints=True), tiny()
    assert list(with_offload.state_dict()) == list(without.state_dict())
    without.load_state_dict(with_offload.state_dict())
    with_offload.load_state_dict(without.state_dict())


def test_inference_moves_nothing():
    model = tiny(offload_checkpoints=True)
    model.checkpoint_offload = checked = CheckedOffload()
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    assert checked.offloaded == 0


# --------------------------------------------------------------------- under the strategies (gloo)


def _fit_job(fsdp: bool, steps: int = 3) -> dict:
    """On every rank: CausalLM under ulysses_ring (or ulysses_ring_fsdp), Ulysses over the ranks, with
    and without the forced offload; the parameters after ``steps`` AdamW steps, compared bit for bit."""
    from torch.distributed.tensor import DTensor

    params, checked = [], None
    for offload in (False, True):
        model = tiny(layers=3, offload_checkpoints=offload, mlp_chunk_size=16)
        if offload:
            checked = model.checkpoint_offload = CheckedOffload()
        cls = lightning_sp.UlyssesRingFSDPStrategy if fsdp else lightning_sp.UlyssesRingStrategy
        trainer = pl.Trainer(accelerator="cpu", devices=dist.get_world_size(), precision="64-true", max_steps=steps,
                             strategy=cls(ulysses_degree=dist.get_world_size(), ring_degree=1), logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0)
        data = LongRangeTask("copy", seq_len=48, num_samples=2 * steps, alphabet=8)
        trainer.fit(CausalLM(model, lr=3e-3), DataLoader(data, batch_size=2))
        params.append({k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                       for k, v in model.state_dict().items()})
    differ = _bitwise_equal(*params)
    assert checked.offloaded == 2 * steps and checked.mismatches == 0 and checked.waited == 0, vars(checked)
    assert differ == [], f"parameters differ with offload: {differ}"
    return checked.restored


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fsdp", [False, True], ids=["ulysses_ring", "ulysses_ring_fsdp"])
def test_offload_under_the_strategies_trains_bit_for_bit_like_no_offload(worlds, fsdp):
    restored = worlds(2).run(_fit_job, fsdp, timeout=240)
    assert restored == [6, 6]


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_offload_on_a_gpu_trains_within_bf16_noise_and_frees_the_layer_inputs():
    """bf16 autocast on one GPU, 3 AdamW steps without offload (twice) and with it: the offloaded run
    differs from the first no-offload run no more than the second no-offload run does (the copies are
    exact; what differs is the kernels' own nondeterminism, e.g. atomic adds, which AdamW's normalised
    update amplifies for parameters with tiny gradients), and the step's peak memory drops by most
    of the layer inputs."""
    layers, seq = 8, 32768
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=layers, num_heads=4,
                         num_kv_heads=2)
    layer_bytes = seq * config.hidden_size * 4  # the float32 residual stream a layer keeps
    runs = []
    for offload in (False, False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config, activation_checkpointing="full", offload_checkpoints=offload).cuda()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        losses, peaks = [], []
        for _ in range(3):
            ids = torch.randint(0, config.vocab_size, (1, seq), generator=g).cuda()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total, count = model.loss_sum(model(ids), torch.roll(ids, -1, 1))
            (total / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            losses.append((total / count).item())
        updates = {k: v.detach() - before[k] for k, v in model.state_dict().items()}
        runs.append((losses, updates, min(peaks), model.checkpoint_offload))
        del model, opt
        torch.cuda.empty_cache()
    (want_losses, want, peak_without, _), (again_losses, again, _, _), (got_losses, got, peak_with, offload) = runs
    assert offload.offloaded == 3 * (layers - 1) and offload.host_bytes == 0

    def differ(a, b):
        return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in b)

    def loss_differ(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))

    noise, err = differ(again, want), differ(got, want)
    assert err <= max(3 * noise, 1e-6), f"parameter updates differ by {err} with offload, {noise} between two runs without"
    assert loss_differ(got_losses, want_losses) <= max(3 * loss_differ(again_losses, want_losses), 1e-6)
    # about half of the 7 offloaded inputs lower the peak (on one H100: 126 MiB of 224 MiB)
    assert peak_without - peak_with >= 3 * layer_bytes, (peak_without / 2**20, peak_with / 2**20)


# ------------------------------------------------------------------------ the benchmark scripts


def test_memory_estimate_moves_all_but_two_layer_inputs_to_the_host():
    """estimate_memory.memory_peaks runs the model's own offload (forced) under fake tensors: the host
    holds every checkpointed layer's input but the last, and the GPU peak no longer grows with the
    layers (two inputs stay: the last one and the one prefetched)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("estimate_memory", os.path.join(root, "benchmark", "estimate_memory.py"))
    est = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(est)
    tokens, hidden = 8192, 256
    layer = tokens * hidden * 4  # a float32 layer input (a power of two: its host pieces are exact)
    peaks = {}
    for layers in (4, 8):
        config = dict(vocab_size=256, hidden_size=hidden, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                      num_layers=layers)
        for offload in (False, True):
            kw = dict(activation_checkpointing="full", offload_checkpoints=offload)
            peaks[layers, offload] = est.memory_peaks(config, kw, tokens, keep_grads=False)
    for layers in (4, 8):
        assert peaks[layers, False][1] == 0 and peaks[layers, True][1] == (layers - 1) * layer
        saved = peaks[layers, False][0] - peaks[layers, True][0]
        assert abs(saved - (layers - 2) * layer) < 0.01 * layer, saved / layer
    assert peaks[8, True][0] - peaks[4, True][0] < 0.01 * layer




def test_benchmark_offload_and_a_find_max_search_kept_between_calls(tmp_path):
    """benchmark_train.py --offload on a CPU (the model's no-op, recorded with the host memory), and
    --find_max --find_max_state: one length per call, the search continued by the next call, which
    here predicts its length would outlast --launch_timeout and stops the search by time."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    state, out = tmp_path / "search.json", tmp_path / "train.jsonl"
    cmd = [sys.executable, os.path.join(root, "benchmark", "benchmark_train.py"), "--model", "tiny", "--accelerator",
           "cpu", "--devices", "1", "--strategy", "ulysses_ring", "--warmup", "1", "--steps", "1", "--quiet",
           "--checkpointing", "full", "--offload", "--seq_len", "32", "--find_max", "--find_max_state", str(state),
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bad = subprocess.run([*cmd[:cmd.index("--checkpointing")], "--offload", "--seq_len", "32"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--offload moves the layer inputs" in bad.stderr  # tiny.yaml: no checkpointing
    first = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "find_max: longest completed 32 tokens; next call probes 64" in first.stdout
    second = subprocess.run([*cmd, "--launch_timeout", "0.001"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trained, summary1, skipped, summary2 = [json.loads(line) for line in out.read_text().splitlines()]
    assert trained["completed"] and trained["offload"] is True and trained["checkpointing"] == "full"
    assert trained["peak_host_rss_gib"] > 0.1
    assert trained["peak_host_rss_gib_per_rank"] == [trained["peak_host_rss_gib"]]
    assert trained["offload_host_gib"] == 0.0 and trained["peak_pinned_gib"] is None  # a CPU: nothing moved
    assert summary1["name"] == "train_find_max" and summary1["next_seq_len"] == 64 and summary1["stopped_by"] is None
    assert skipped["seq_len"] == 64 and skipped["completed"] is False and skipped["launched"] is False
    assert skipped["cause"] == "time" and "predicted" in skipped["error"]
    assert (summary2["longest_completed"], summary2["first_failed"], summary2["failure_cause"]) == (32, 64, "time")
    assert summary2["stopped_by"] == "failure" and summary2["tried"] == [32, 64]
    search = json.loads(state.read_text())["searches"]
    assert len(search) == 1 and set(next(iter(search.values()))) == {"32", "64"}
