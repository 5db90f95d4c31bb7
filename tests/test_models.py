"""The decoder and swap_attention: swapped models match the originals (float64), in one process and
sequence-parallel over 4 gloo ranks (ulysses 2 x ring 2), outputs and gradients; errors say why."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lightning_sp
from lightning_sp import layout as L
from lightning_sp.loss import exact_token_loss
from lightning_sp.models import LlamaConfig, LlamaForCausalLM, LocalAttention, swap_attention
from lightning_sp.models.hf import causal_lm_logits

TOL = 1e-10
VOCAB = 64


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def tiny(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, init_std=0.2)
    return LlamaForCausalLM(config, **kw).double()


def tiny_mixed(seed=0, **kw) -> LlamaForCausalLM:
    """A sliding-window layer (window 5) before a global one, as Gemma and GPT-OSS alternate them."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, init_std=0.2, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention"])
    return LlamaForCausalLM(config, **kw).double()


def hf_tiny(seed=0, kind="llama"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "qwen_mixed":  # layer 0 global, layer 1 sliding (window 5): config.layer_types
        config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                          use_sliding_window=True, sliding_window=5, max_window_layers=1)
        assert list(config.layer_types) == ["full_attention", "sliding_attention"]
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "qwen":
        config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
        model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.double()


def logits_of(model, batch):
    if isinstance(model, LlamaForCausalLM):
        return model.logits(model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"),
                                  batch.get("max_seqlen")))
    return causal_lm_logits(model, batch)


def shifted(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)


def reference(model, batch):
    """Logits and parameter gradients of the token-mean loss, one process, whole sequences."""
    model.zero_grad()
    logits = logits_of(model, batch)
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ one process


@pytest.mark.parametrize("kind", ["ours", "llama", "qwen"])
def test_swapped_model_matches_original_in_one_process(kind):
    model = tiny() if kind == "ours" else hf_tiny(kind=kind)
    swapped = swap_attention(copy.deepcopy(model))
    n_core = sum(isinstance(m, lightning_sp.LongContextAttention) for m in swapped.modules())
    assert n_core == 2, "every attention layer must get a LongContextAttention"
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": shifted(ids)}
    want, want_grads = reference(model, batch)
    got, got_grads = reference(swapped, batch)
    assert rel(got, want) < TOL
    assert max(rel(got_grads[n], g) for n, g in want_grads.items()) < TOL


def test_chunked_loss_equals_full_cross_entropy_and_its_gradient():
    model = tiny(loss_chunk_size=5)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(2))
    labels = shifted(ids)
    labels[0, :4] = -100
    want, want_grads = reference(model, {"input_ids": ids, "labels": labels})
    model.zero_grad()
    total, count = model.loss_sum(model(ids), labels)
    (total / count).backward()
    assert int(count) == int((labels != -100).sum())
    want_loss = F.cross_entropy(want.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs((total / count).item() - want_loss.item()) < 1e-12
    assert max(rel(p.grad, want_grads[n]) for n, p in model.named_parameters()) < TOL
    with torch.no_grad():  # evaluation: the same chunked sum, no gradient made
        total_eval, _ = model.loss_sum(model(ids), labels)
    assert abs(total_eval.item() - total.item()) < 1e-12 * total.item()


def _linear_ce_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(23, 16, generator=g, dtype=dtype)
    weight = (torch.randn(40, 16, generator=g, dtype=dtype) * 0.5)
    labels = torch.randint(0, 40, (23,), generator=g)
    labels[3:7] = -100
    return hidden, weight, labels


def test_linear_cross_entropy_gradients_computed_in_the_forward_pass():
    """Chunks of 5 of 23 rows, ignored labels, an upstream gradient of 3: the sum and both gradients
    are those of F.cross_entropy on the whole logits, in float64."""
    from lightning_sp.models.llama import _cross_entropy_and_grad, _LinearCrossEntropy

    hidden, weight, labels = _linear_ce_case()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = F.cross_entropy(h1 @ w1.T, labels, ignore_index=-100, reduction="sum")
    (3 * want).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = _LinearCrossEntropy.apply(h2, w2, labels, 5, -100, _cross_entropy_and_grad)
    (3 * got).backward()
    assert abs(got.item() - want.item()) < 1e-12 * want.item()
    assert rel(h2.grad, h1.grad) < 1e-12 and rel(w2.grad, w1.grad) < 1e-12
    h3 = hidden.clone().requires_grad_()  # a frozen LM head: no weight gradient is made
    _LinearCrossEntropy.apply(h3, weight, labels, 5, -100, _cross_entropy_and_grad).backward()
    assert rel(h3.grad, h1.grad / 3) < 1e-12


def test_linear_cross_entropy_under_autocast_matches_the_autograd_path():
    """bf16 autocast, float32 hidden states and weight (as under bf16-mixed): the matmuls in bf16,
    gradients back in float32, equal to the chunked F.linear + F.cross_entropy path to bf16 accuracy."""
    from lightning_sp.models.llama import _cross_entropy_and_grad, _LinearCrossEntropy

    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in _linear_ce_case())
    grads = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                total = _LinearCrossEntropy.apply(h, w, labels, 5, -100, _cross_entropy_and_grad)
            else:
                total = sum(F.cross_entropy(F.linear(h[i:i + 5], w).float(), labels[i:i + 5], ignore_index=-100,
                                            reduction="sum") for i in range(0, 23, 5))
        total.backward()
        grads.append((total.detach(), h.grad, w.grad))
    (want, dh, dw), (got, gh, gw) = grads
    assert gh.dtype == gw.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-3 * want.item()
    assert rel(gh, dh) < 1e-2 and rel(gw, dw) < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")])])
def test_weight_gradient_accumulates_bf16_products_in_float32(device):
    """The LM head's gradient sums the chunks' bf16 products into float32: on CUDA in one addmm that
    writes into the sum (its product never rounded to bf16), elsewhere a product and an add. Three
    accumulations against float64, to float32 accuracy on CUDA, to bf16 rounding of each product
    elsewhere."""
    from lightning_sp.models.llama import _add_product

    g = torch.Generator().manual_seed(5)
    acc = torch.randn(96, 64, generator=g).to(device)
    want = acc.double()
    for _ in range(3):
        a, b = (torch.randn(*shape, generator=g).to(device, torch.bfloat16) for shape in ((96, 200), (200, 64)))
        _add_product(acc, a, b)
        want += a.double() @ b.double()
    assert acc.dtype == torch.float32
    assert rel(acc, want) < (1e-6 if device == "cuda" else 1e-2)


def test_packed_documents_do_not_attend_to_each_other():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 14, 5)]
    cu = torch.tensor([0, 9, 23, 28])
    pos = torch.cat([torch.arange(len(d)) for d in docs])
    packed = model.logits(model(torch.cat(docs)[None], pos, cu, 14))[0]
    alone = torch.cat([model.logits(model(d[None]))[0] for d in docs])
    assert rel(packed, alone) < TOL


CHECKPOINTING = [True, "full", "except_attention", False, "none"]


@pytest.mark.parametrize("core", ["local", "long_context"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", CHECKPOINTING, ids=str)
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(mode, packed, core):
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": shifted(ids)}
    if packed:
        batch.update(position_ids=torch.cat([torch.arange(6), torch.arange(10)])[None],
                     cu_seqlens=torch.tensor([0, 6, 16]), max_seqlen=10)  # even lengths: zigzag's rule
    want_logits, want = reference(tiny(), batch)
    model = tiny(activation_checkpointing=mode)
    assert model.activation_checkpointing == {True: "full", False: "none"}.get(mode, mode)
    if core == "long_context":
        swap_attention(model)  # one process: the block kernel on the whole sequence
    got_logits, got = reference(model, batch)
    assert rel(got_logits, want_logits) < TOL
    assert set(got) == set(want) and all(rel(got[n], g) < TOL for n, g in want.items())


@pytest.mark.parametrize("core", ["local", "long_context"])
@pytest.mark.parametrize("mode, runs_per_layer", [("none", 1), ("except_attention", 1), ("full", 2)])
def test_except_attention_does_not_rerun_the_core_attention(mode, runs_per_layer, core):
    """"full" recomputes each layer's core attention in the backward pass; "except_attention"
    recomputes the projections (checked) but not the core, whose autograd kept what it needs."""
    _count_recomputation(tiny(activation_checkpointing=mode), mode, runs_per_layer, core, checkpointed=2)


@pytest.mark.parametrize("mode, runs_per_layer", [("except_attention", 1), ("full", 2)])
def test_checkpointed_layers_recompute_only_the_first_layers(mode, runs_per_layer):
    model = tiny(activation_checkpointing=mode, checkpointed_layers=1)
    assert len(model.layers) == 2
    _count_recomputation(model, mode, runs_per_layer, "long_context", checkpointed=1)


@pytest.mark.parametrize("mode", ["full", "except_attention"])
def test_checkpointed_layers_give_the_same_outputs_and_gradients(mode):
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": shifted(ids)}
    want_logits, want = reference(tiny(), batch)
    got_logits, got = reference(swap_attention(tiny(activation_checkpointing=mode, checkpointed_layers=1)), batch)
    assert rel(got_logits, want_logits) < TOL
    assert set(got) == set(want) and all(rel(got[n], g) < TOL for n, g in want.items())


def _count_recomputation(model, mode, runs_per_layer, core, checkpointed):
    """Forward, backward and a no-grad forward of ``model``, whose first ``checkpointed`` layers use
    ``mode``: count the core attention's and q_proj's runs."""
    if core == "long_context":
        swap_attention(model)
    cores = [layer.attn.core for layer in model.layers]
    assert all(isinstance(c, lightning_sp.LongContextAttention if core == "long_context" else LocalAttention)
               for c in cores)
    calls = {"core": 0, "q_proj": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    for layer in model.layers:
        layer.attn.core.register_forward_hook(count("core"))
        layer.attn.q_proj.register_forward_hook(count("q_proj"))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    hidden = model(ids)
    n = len(model.layers)
    assert calls == {"core": n, "q_proj": n}  # the forward pass runs each once
    model.logits(hidden).sum().backward()
    recomputing = 0 if mode == "none" else checkpointed
    assert calls["core"] == n + (runs_per_layer - 1) * recomputing
    assert calls["q_proj"] == n + recomputing  # the cheap parts are recomputed
    with torch.no_grad():  # no checkpointing without gradients
        model(ids)
    assert calls["core"] == 2 * n + (runs_per_layer - 1) * recomputing


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", ["none", "full", "except_attention"])
def test_chunked_mlp_gives_the_same_outputs_and_gradients(mode, packed):
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "labels": shifted(ids)}
    if packed:
        batch.update(position_ids=torch.cat([torch.arange(6), torch.arange(10)])[None],
                     cu_seqlens=torch.tensor([0, 6, 16]), max_seqlen=10)
    want_logits, want = reference(tiny(), batch)
    model = tiny(activation_checkpointing=mode, mlp_chunk_size=5)  # 16 tokens: chunks of 5, 5, 5, 1
    widest = []
    for layer in model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda m, args, out: widest.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"), batch.get("max_seqlen"))
    assert widest == [5, 5, 5, 1] * len(model.layers)
    got_logits, got = reference(model, batch)
    assert rel(got_logits, want_logits) < TOL
    assert set(got) == set(want) and all(rel(got[n], g) < TOL for n, g in want.items())
    assert max(widest) == 5  # recomputations included


def test_unknown_checkpointing_mode_says_which_exist():
    with pytest.raises(lightning_sp.SPConfigError, match="none, full, except_attention"):
        LlamaForCausalLM(activation_checkpointing="selective")
    with pytest.raises(lightning_sp.SPConfigError, match="checkpointed_layers must be None .* num_layers=2, got 3"):
        LlamaForCausalLM(activation_checkpointing="full", checkpointed_layers=3)


def test_large_shapes_build_on_the_meta_device():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                             num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=5e5))
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == model.config.num_params() == 8_030_261_248  # Llama-3-8B


def test_bad_inputs_raise_errors_that_say_why():
    with pytest.raises(lightning_sp.SPConfigError, match="cannot swap the attention of Sequential"):
        swap_attention(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(lightning_sp.SPConfigError, match="num_kv_heads=3"):
        LlamaConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(lightning_sp.SPConfigError, match="loss_chunk_size"):
        LlamaForCausalLM(loss_chunk_size=0)
    with pytest.raises(lightning_sp.SPConfigError, match="mlp_chunk_size"):
        LlamaForCausalLM(mlp_chunk_size=0)
    with pytest.raises(lightning_sp.SPConfigError, match="one packed row"):
        tiny()(torch.zeros(2, 8, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(lightning_sp.SPConfigError, match="window_size entries must be ints >= -1"):
        LocalAttention()(*torch.zeros(3, 1, 4, 2, 8), window_size=(-2, 0))
    with pytest.raises(lightning_sp.SPConfigError, match="sliding_window is None"):
        LlamaConfig(num_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(lightning_sp.SPConfigError, match="for each of the 2 layers"):
        LlamaConfig(num_layers=2, sliding_window=4, layer_types=["sliding_attention"])


def test_hf_model_errors_say_why():
    transformers = pytest.importorskip("transformers")
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(lightning_sp.SPConfigError, match="encoder-decoder"):
        swap_attention(t5)
    model = swap_attention(hf_tiny())
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(lightning_sp.SPConfigError, match="padding attention_mask"):
        model(input_ids=ids, attention_mask=torch.tensor([[1] * 6 + [0] * 2]))


# ------------------------------------------------------------------------------- sequence parallel


def _sp_case(kind: str, packed: bool, ulysses: int, ring: int, layout: str, checkpointing: str = "none") -> dict:
    """On every rank: the swapped model on this rank's shard vs the whole-sequence reference (which
    never checkpoints activations)."""
    mesh = lightning_sp.init_sp_mesh(ulysses_degree=ulysses, ring_degree=ring)
    model = {"ours": tiny, "ours_mixed": tiny_mixed}.get(kind, lambda: hf_tiny(kind=kind))()
    g = torch.Generator().manual_seed(5)
    if packed:
        lengths = [13, 7, 12]  # uneven, not multiples of the layout's 8: padded per document
        cu = torch.tensor([0, *lengths]).cumsum(0)
        ids = torch.randint(0, VOCAB, (1, int(cu[-1])), generator=g)
        labels = shifted(ids)
        labels[0, cu[1:] - 1] = -100  # no label crosses a document boundary
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        ref_batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, "max_seqlen": 13}
        shard = L.shard_documents(cu, mesh, layout)
        local = {"input_ids": shard.shard(ids, dim=1), "labels": shard.shard(labels, dim=1, pad_value=-100),
                 "position_ids": shard.position_ids[None], "cu_seqlens": shard.cu_seqlens,
                 "max_seqlen": shard.max_seqlen}

        def gather(x):
            return shard.unshard(x, mesh, dim=1)
    else:
        ids = torch.randint(0, VOCAB, (2, 32), generator=g)
        labels = shifted(ids)
        ref_batch = {"input_ids": ids, "labels": labels}
        local = {"input_ids": L.shard(ids, mesh, layout), "labels": L.shard(labels, mesh, layout),
                 "position_ids": L.position_ids(32, mesh, layout)[None]}

        def gather(x):
            return L.unshard(x, mesh, layout)
    want, want_grads = reference(copy.deepcopy(model), ref_batch)
    swapped = swap_attention(model, mesh, ring_impl=layout)
    if checkpointing != "none":
        swapped.activation_checkpointing = checkpointing
    logits = logits_of(swapped, local)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), ignore_index=-100, reduction="sum")
    exact_token_loss(loss_sum, (local["labels"] != -100).sum()).loss.backward()
    errs = {"logits": rel(gather(logits.detach()), want)}
    for n, p in swapped.named_parameters():  # gradients averaged over the world, as DDP does
        dist.all_reduce(p.grad)
        errs[n] = rel(p.grad / dist.get_world_size(), want_grads[n])
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, f"{worst}: {errs[worst]}"
    return errs[worst]


@pytest.mark.parametrize("kind,packed", [("ours", False), ("ours", True), ("llama", False), ("qwen", True)])
def test_swapped_model_matches_one_process_when_sequence_parallel(worlds, kind, packed):
    if kind != "ours":
        pytest.importorskip("transformers")
    worlds(4).run(_sp_case, kind, packed, 2, 2, "zigzag", timeout=120)


@pytest.mark.parametrize("kind", ["ours_mixed", "qwen_mixed"])
@pytest.mark.parametrize("packed,ulysses,ring,layout", [(False, 2, 2, "zigzag"), (True, 1, 4, "stripe"),
                                                        (False, 4, 1, "contiguous"), (True, 2, 2, "contiguous")])
def test_mixed_sliding_and_global_layers_match_one_process(worlds, kind, packed, ulysses, ring, layout):
    """Each layer gets its own window through the swapped attention (ours from LlamaConfig.layer_types,
    Hugging Face's from config.layer_types), against the one-process model's own attention."""
    if kind != "ours_mixed":
        pytest.importorskip("transformers")
    worlds(4).run(_sp_case, kind, packed, ulysses, ring, layout, timeout=120)


def test_sliding_layers_in_one_process_see_only_their_window():
    """LocalAttention's window: a token beyond the window changes nothing on a sliding layer."""
    model = tiny_mixed()
    model.layers = model.layers[:1]  # the sliding layer only
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % VOCAB
    out, out_other = model(ids), model(other)
    assert torch.equal(out[0, 5:], out_other[0, 5:]) and not torch.equal(out[0, :5], out_other[0, :5])


def test_swapped_model_matches_one_process_ring_only_stripe(worlds):
    worlds(4).run(_sp_case, "ours", False, 1, 4, "stripe", timeout=120)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_except_attention_checkpointing_matches_one_process_when_sequence_parallel(worlds, packed):
    worlds(4).run(_sp_case, "ours", packed, 2, 2, "zigzag", "except_attention", timeout=120)


# --------------------------------------------------------------------------------- compile_blocks


def _loss_and_grads(model, batch):
    """The token-mean loss through the model's chunked loss and every parameter's gradient."""
    model.zero_grad()
    hidden = model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"), batch.get("max_seqlen"))
    total, count = model.loss_sum(hidden, batch["labels"])
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compile_case(packed):
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "labels": shifted(ids)}
    if packed:
        batch.update(position_ids=torch.cat([torch.arange(6), torch.arange(10)])[None],
                     cu_seqlens=torch.tensor([0, 6, 16]), max_seqlen=10)
    return batch


@pytest.fixture
def compile_backend(monkeypatch):
    """compile_blocks with a given torch.compile backend, from a clean dynamo cache (so the counters
    see this test's compilations only)."""
    from torch._dynamo.utils import counters

    from lightning_sp.models import llama

    def use(backend):
        monkeypatch.setattr(llama, "_compiled_parts", lambda: parts(backend))
        return counters

    parts = llama._compiled_parts
    torch._dynamo.reset()
    parts.cache_clear()
    counters.clear()
    yield use
    torch._dynamo.reset()
    parts.cache_clear()


def _check_compiled_matches_eager(mode, packed, mlp_chunk_size, tol=1e-12):
    batch = _compile_case(packed)
    want_loss, want = _loss_and_grads(tiny(activation_checkpointing=mode, mlp_chunk_size=mlp_chunk_size), batch)
    model = tiny(activation_checkpointing=mode, mlp_chunk_size=mlp_chunk_size, compile_blocks=True)
    for _ in range(2):  # the second step runs the cached compilation
        got_loss, got = _loss_and_grads(model, batch)
        assert abs(got_loss.item() - want_loss.item()) <= tol * abs(want_loss.item())
        assert set(got) == set(want) and all(rel(got[n], g) < tol for n, g in want.items())


@pytest.mark.parametrize("mode, packed, mlp_chunk_size", [("none", False, None), ("full", True, 5),
                                                      ("except_attention", True, None), ("except_attention", False, 5)])
def test_compile_blocks_matches_eager_aot(compile_backend, mode, packed, mlp_chunk_size):
    """The compiled layers' parts (traced and differentiated by AOTAutograd, run eagerly: fast)
    give the eager model's loss and gradients, under every checkpointing mode."""
    compile_backend("aot_eager")
    _check_compiled_matches_eager(mode, packed, mlp_chunk_size)


@pytest.mark.slow
@pytest.mark.parametrize("mlp_chunk_size", [None, 5])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", ["none", "full", "except_attention"])
def test_compile_blocks_matches_eager_inductor(compile_backend, mode, packed, mlp_chunk_size):
    """The same with inductor, the default backend (C++ kernels on the CPU): float64, to 1e-12."""
    compile_backend("inductor")
    _check_compiled_matches_eager(mode, packed, mlp_chunk_size)


@pytest.mark.parametrize("mode", ["none", "except_attention"])
def test_compile_blocks_compiles_once_for_every_layer(compile_backend, mode):
    """Four layers, two training steps (the recomputation in the backward pass included): one graph
    per part, the parts before and after the core attention and the loss's cross entropy; evaluation
    (no gradients, no loss) adds one for each layer part."""
    counters = compile_backend("aot_eager")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                         num_kv_heads=2)
    model = LlamaForCausalLM(config, activation_checkpointing=mode, compile_blocks=True).double()
    batch = _compile_case(packed=False)
    for _ in range(2):
        _loss_and_grads(model, batch)
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    with torch.no_grad():
        model(batch["input_ids"])
    assert counters["stats"]["unique_graphs"] == 5


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_except_attention_recomputes_only_what_the_gradients_need(compile_backend, compiled):
    """Counted matmuls of one backward pass (one layer, the loss's gradients made in its forward):
    14 for the layer's seven projections, plus the recomputation. A checkpoint around the eager parts
    re-runs all seven; compiled, the checkpoint is in the graph and its backward recomputes only
    o_proj, gate and up (RMSNorm's output feeds the q/k/v weight gradients; down_proj's output
    feeds nothing)."""
    from torch.profiler import ProfilerActivity, profile
    compile_backend("aot_eager")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                         num_kv_heads=2)
    model = LlamaForCausalLM(config, activation_checkpointing="except_attention", compile_blocks=compiled)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # the second step runs the cached compilation
        total, _ = model.loss_sum(model(ids), shifted(ids))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            total.backward()
    matmuls = sum(e.count for e in prof.key_averages() if e.key == "aten::mm")
    assert matmuls == 14 + (3 if compiled else 7)


def test_compile_blocks_says_why_when_it_recompiles_too_often(compile_backend):
    compile_backend("aot_eager")
    model = tiny(compile_blocks=True)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch._dynamo.config.patch(recompile_limit=1):
        model(ids).sum().backward()
        with torch.no_grad(), pytest.raises(lightning_sp.SPConfigError, match="compile_blocks.*TORCH_LOGS=recompiles"):
            model(ids)  # no gradients: a second compilation, over the limit
    with pytest.raises(lightning_sp.SPConfigError, match="compile_blocks must be a bool"):
        LlamaForCausalLM(compile_blocks="yes")


def _fsdp_compile_case(mode: str, backend: str) -> float:
    """On every rank of 2: the tiny model under Ulysses 2 with every layer and the root wrapped in
    FSDP2 (as the ulysses_ring_fsdp strategy wraps them), compiled vs eager: loss and full gradients."""
    from torch.distributed.fsdp import fully_shard

    from lightning_sp.models import llama

    mesh = lightning_sp.init_sp_mesh(ulysses_degree=2)
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(8))
    batch = {"input_ids": L.shard(ids, mesh, "zigzag"), "labels": L.shard(shifted(ids), mesh, "zigzag"),
             "position_ids": L.position_ids(32, mesh, "zigzag")[None]}
    results = []
    parts = llama._compiled_parts
    llama._compiled_parts = lambda: parts(backend)
    try:
        for compiled in (False, True):
            model = swap_attention(tiny(activation_checkpointing=mode, compile_blocks=compiled), mesh)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh.device_mesh["ulysses"])
            fully_shard(model, mesh=mesh.device_mesh["ulysses"])
            for _ in range(2):  # the second step runs the cached compilation
                loss, grads = _loss_and_grads(model, batch)
            results.append((loss, {n: g.full_tensor() for n, g in grads.items()}))
    finally:
        llama._compiled_parts = parts
        torch._dynamo.reset()
    (want_loss, want), (got_loss, got) = results
    errs = {n: rel(got[n], g) for n, g in want.items()}
    errs["loss"] = rel(got_loss, want_loss)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-12, f"{worst}: {errs[worst]}"
    return errs[worst]


@pytest.mark.parametrize("mode", ["none", "full", "except_attention"])
def test_compile_blocks_under_fsdp_matches_eager(worlds, mode):
    """FSDP's hooks are on the layers, outside the compiled functions: they gather the parameters the
    compiled parts then read, and the sequence-parallel attention's collectives stay eager."""
    worlds(2).run(_fsdp_compile_case, mode, "aot_eager", timeout=180)


def test_mfu_of_a_packed_row_counts_attention_document_by_document():
    """Two packed documents of 6 and 10 tokens: the logged FLOPs per token (MFU x peak / tokens per s)
    hold attention over 6^2 + 10^2 pairs' worth, not 16^2."""
    from lightning_sp.app.lm import CausalLM

    model = tiny()
    module, logged = CausalLM(model, peak_tflops=1.0), {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    ids = torch.randint(1, 50, (1, 16))
    batch = {"input_ids": ids, "labels": ids, "cu_seqlens": torch.tensor([0, 6, 16])}
    module.on_train_batch_start(batch, 0)
    module.training_step(batch, 0)
    module.on_train_batch_end(None, batch, 0)
    c = model.config
    flops = logged["train/mfu"] * 1e12 / logged["train/tokens_per_s"]
    dense = 6 * (c.num_params() - c.vocab_size * c.hidden_size)
    attention = 12 * c.num_heads * c.head_dim * c.num_layers * (6 ** 2 + 10 ** 2) / 2 / 16
    assert flops == pytest.approx(dense + attention, rel=1e-9)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_hugging_face_flops_count_each_layers_window(family):
    """A Hugging Face model's FLOPs per token count each layer's attention as the model runs it: global
    (Llama), every layer within the sliding window of 4 (Mistral), sliding and global layers alternating
    (Gemma 2, whose heads x head_dim, 24, differs from hidden_size)."""
    transformers = pytest.importorskip("transformers")
    from lightning_sp.app.lm import _flops_per_token

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1)
    # keys per query of one layer: global causal s/2; window w < s: w - w^2 / (2s)
    glob, slid = {16: 8.0, 6: 3.0, 10: 5.0}, {16: 3.5, 6: 4 - 16 / 12, 10: 3.2}
    if family == "llama":
        model, layers, width = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)), [glob] * 4, 16
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=4, **common)
        model, layers, width = transformers.MistralForCausalLM(config), [slid] * 4, 16
    else:
        config = transformers.Gemma2Config(sliding_window=4, head_dim=12, **common)
        model, layers, width = transformers.Gemma2ForCausalLM(config), [slid, glob, slid, glob], 24
    dense = 6 * (sum(p.numel() for p in model.parameters()) - 64 * 16)
    for lengths in ([16], [6, 10]):  # a packed row: each document's per-token FLOPs, weighted by its tokens
        keys = sum(n * sum(layer[n] for layer in layers) for n in lengths) / sum(lengths)
        assert _flops_per_token(model, lengths) == pytest.approx(dense + 12 * width * keys, rel=1e-12)
