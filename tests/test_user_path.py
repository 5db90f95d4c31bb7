"""A user's own LightningModule: Hugging Face habits work and are exact, mistakes fail on every rank.

On 4 gloo ranks (one world for the module, every job with a timeout): a tiny Hugging Face Llama
trained with its own loss, ``self.model(**batch).loss``, against a single-process float64 reference;
a model whose attention was not swapped, or is called without ``position_ids``, fails on every rank
naming the fix. Without a world: the errors that come before any process starts.
"""
from __future__ import annotations

import re

import pytest
import torch

import lightning_sp
import strategy_cases as C
import user_cases as U

pytest.importorskip("transformers")

TIMEOUT = 300
# Hugging Face's causal-LM loss computes in float32 (``logits.float()``), the reference in float64:
# the parameters after three steps agree to float32 accuracy. A wrong normalisation (the local token
# mean, the world's count without the world size) is off by far more: the ranks hold different
# numbers of valid labels.
HF_TOL = 1e-5


def _same_error_everywhere(results, match):
    errors = [r[0] if isinstance(r, tuple) else r for r in results]
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert re.search(match, errors[0]), errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------- 4 ranks


@pytest.mark.parametrize("ulysses,ring,layout,data", [
    (2, 2, "zigzag", "dense"), (4, 1, "contiguous", "dense"), (1, 4, "stripe", "dense"),
    (1, 2, "zigzag", "dense"),  # data parallel 2
    (2, 2, "zigzag", "packed"), (1, 2, "stripe", "packed"),
])
def test_hugging_face_loss_is_the_exact_token_mean(world4, ulysses, ring, layout, data):
    """``self.model(**batch).loss`` on every rank (the batch's shift_labels and num_items_in_batch,
    its extra entries passed as keyword arguments): after 3 SGD steps the parameters are those of
    one process training on the token mean of the global batch."""
    dp = 4 // (ulysses * ring)
    n, batch = (6, 1) if data == "packed" else (4 * dp, 2)
    results = world4.run(U.hf_loss_job, ulysses, ring, layout, data=data, n=n, batch=batch, max_steps=3,
                         timeout=TIMEOUT)
    order = [sum(step, []) for step in C.expected_order(n, dp, batch)]
    ref = U.reference_params(data, order, 3)
    start = U.hf_llama().state_dict()
    for rank, params in enumerate(results):
        for k, v in ref.items():
            assert not torch.equal(v, start[k]) or "norm" in k, f"{k} did not train"
            err = C.rel_err(params[k], v)
            assert err < HF_TOL, f"rank {rank}: {k} differs from the single-process run by {err:.3g}"


@pytest.mark.parametrize("case,match", [
    ("no_swap", r"^SPConfigError: call lightning_sp\.swap_attention\(model\) .*HFUserLM has no "
                r"LongContextAttention.*4 ranks \(ulysses 2 x ring 2\).*require_sp_attention=False"),
    ("no_position_ids", r"^SPConfigError: pass position_ids=batch\['position_ids'\] to LlamaForCausalLM \(or call "
                        r"it as model\(\*\*batch\)\): its attention is split over 4 ranks"),
    ("cuda_backend", r"^SPConfigError: backend 'flash' runs on cuda only, but this run's device is cpu; choose one "
                     r"of auto, .*cpu_flash"),
])
def test_a_users_mistake_fails_on_every_rank(world4, case, match):
    """No swap_attention: every rank fails at setup, before a step. No position_ids: at the first
    forward, the fix on the error's first line. A CUDA-only backend on CPU: at setup."""
    if case == "cuda_backend" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    results = world4.run(U.error_job, case, timeout=TIMEOUT)
    error = _same_error_everywhere(results, match)
    assert "\n" not in error
    assert [steps for _, steps in results] == [0 if case != "no_position_ids" else 1] * 4


def test_attention_free_models_opt_out(world4):
    """require_sp_attention=False lets a model without attention layers train (each token on its
    own, so splitting the sequence changes nothing); with the default it fails at setup."""
    _same_error_everywhere(world4.run(U.attention_free_job, True, timeout=TIMEOUT), "^SPConfigError: call lightning_sp.swap_attention")
    weights = world4.run(U.attention_free_job, False, timeout=TIMEOUT)
    assert all(torch.equal(w, weights[0]) for w in weights) and not torch.equal(weights[0], U.AttentionFree().head.weight)


def test_a_module_written_for_ulysses_ring_trains_the_same_under_ddp(world4):
    """Under Lightning's plain ``strategy="ddp"`` nothing shifts the labels: a module that relied on
    the strategy learns to copy its input; with ``lightning_sp.prepared_batch`` at the top of its step
    it trains as one process does on the global batch (labels shifted, exact token mean)."""
    order = [sum(step, []) for step in C.expected_order(8, 4, 1)]
    _, _, ref = C.reference_run(C.make_data("dense", 8), order[:2])
    helped = world4.run(U.ddp_job, True, timeout=TIMEOUT)
    unhelped = world4.run(U.ddp_job, False, timeout=TIMEOUT)
    for params in helped:
        assert all(C.rel_err(params[k], ref[k]) < 1e-9 for k in ref)
    assert max(C.rel_err(unhelped[0][k], ref[k]) for k in ref) > 1e-3


# ---------------------------------------------------------------------------------------------- no world


def test_unknown_backends_and_layouts_fail_when_the_strategy_is_made():
    with pytest.raises(lightning_sp.KernelError, match="unknown attention backend 'flahs'; supported: auto, "):
        lightning_sp.UlyssesRingStrategy(backend="flahs")
    with pytest.raises(lightning_sp.SPConfigError, match="unknown layout 'ziggzag'"):
        lightning_sp.UlyssesRingStrategy(ring_impl="ziggzag")
    with pytest.raises(lightning_sp.SPConfigError, match="unknown layout"):
        lightning_sp.UlyssesRingFSDPStrategy(ring_impl="spiral")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "fa4"])
def test_a_cuda_only_backend_says_so_on_cpu(backend):
    q = torch.zeros(1, 8, 2, 8)
    with pytest.raises(lightning_sp.KernelError, match=f"backend '{backend}' cannot run this attention block: "
                                                       f"{backend} runs on CUDA GPUs only and this process sees none"):
        lightning_sp.kernels.select_kernel(backend, q, q)
    from lightning_sp.integration.binding import check_backend_device
    with pytest.raises(lightning_sp.SPConfigError, match=f"backend '{backend}' runs on cuda only"):
        check_backend_device(backend, torch.device("cpu"))
    check_backend_device(backend, torch.device("cuda"))  # fine there
    check_backend_device("cpu_flash", torch.device("cpu"))


def test_labels_that_do_not_match_the_logits_name_shard_keys():
    with pytest.raises(ValueError, match=r"logits \(4, 32, 64\) do not match labels \(4, 128\).*shard_keys"):
        lightning_sp.loss.cross_entropy(torch.zeros(4, 32, 64), torch.zeros(4, 128, dtype=torch.long))


def test_init_sp_mesh_under_torchrun_without_a_process_group_says_so(monkeypatch):
    import torch.distributed as dist

    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(lightning_sp.SPConfigError, match=r"^call torch\.distributed\.init_process_group\(\) before "
                                                         r"init_sp_mesh: this process is rank 1 of WORLD_SIZE=4"):
        lightning_sp.init_sp_mesh(ulysses_degree=2, ring_degree=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lightning_sp.init_sp_mesh().world_size == 1


def test_the_position_ids_check_in_one_process():
    """The hook is registered once; in one process (nothing split) a call without positions is fine,
    and calls with positional arguments are read by the forward's signature."""
    model = U.hf_llama(layers=1)
    lightning_sp.swap_attention(model)
    lightning_sp.swap_attention(model)
    from lightning_sp.app.models.swap import require_position_ids
    assert list(model._forward_pre_hooks.values()).count(require_position_ids) == 1
    ids = torch.randint(0, C.VOCAB, (1, 6))
    assert model(ids).logits.shape == (1, 6, C.VOCAB)


# ---------------------------------------------------------------------------------------------- the README


def _readme_block(heading: str) -> str:
    """The first ```python block under a README heading."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(heading):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _run(args, tmp_path, timeout):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_the_readmes_own_module_trains(tmp_path):
    """The README's example, as written, run as a script: Lightning starts the 4 CPU processes."""
    code = _readme_block("## Your own LightningModule")
    assert 25 <= len(code.splitlines()) <= 30
    script = tmp_path / "my_lm.py"
    # after the fit, rank 0 reports the logged loss, which must be the token mean (about ln 256 at the start)
    script.write_text(code + "    if trainer.is_global_zero:\n"
                             "        print('README LOSS', float(trainer.callback_metrics['loss']))\n")
    out = _run([str(script)], tmp_path, timeout=600)
    loss = float(re.search(r"README LOSS (\S+)", out).group(1))
    assert 4.0 < loss < 6.5, out[-2000:]
    assert "ulysses 4, ring 1" in out


@pytest.mark.slow
def test_the_readmes_attention_snippet_runs_under_torchrun(tmp_path):
    """The three-line snippet under torchrun with 4 processes; each rank's rows against float64
    attention over the whole sequence."""
    from dist_harness import _free_port

    check = ("full = layout.unshard(out, mesh, 'zigzag').double()\n"
             "ref = torch.nn.functional.scaled_dot_product_attention(\n"
             "    *(t.transpose(1, 2).double() for t in (q_full, k_full, v_full)), is_causal=True).transpose(1, 2)\n"
             "err = ((full - ref).norm() / ref.norm()).item()\n"
             "assert err < 1e-5, err\n"
             "print('SNIPPET OK', dist.get_rank(), q.shape[1], err)\n")
    script = tmp_path / "attention.py"
    script.write_text(_readme_block("## Attention in three lines") + check)
    out = _run(["-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(script)], tmp_path, timeout=600)
    assert sorted(re.findall(r"SNIPPET OK (\d) (\d+)", out)) == [(str(r), "256") for r in range(4)], out[-2000:]
