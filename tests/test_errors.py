"""Bad input fails fast, identically on every rank, with a message that names the value and the fix."""
import pytest
import torch

import attention_cases as C
import lightning_sp
from lightning_sp import SPConfigError

DIST_ERRORS = {
    "degrees": r"ulysses_degree x ring_degree = 3 x 1 = 3 does not divide the world size 4",
    "heads": r"5 query heads are not divisible by the ulysses degree 2; choose a ulysses degree that divides 5",
    "unbound": r"LongContextAttention has no mesh in a world of 4 ranks; pass mesh=lightning_sp.init_sp_mesh",
    "odd_zigzag": r"zigzag layout needs an even number of tokens per ring rank; got 3 .* multiple of 8",
    "cu_seqlens": r"cu_seqlens ends at 8 but this rank holds 8 tokens x ulysses degree 2 = 16",
    "ulysses_on_ring": r"UlyssesAttention needs ring degree 1, the mesh has 2",
    "head_groups": r"head_groups=4 does not split the 3 query and 3 key/value heads .* choose one of \[1, 3\]",
}


@pytest.mark.parametrize("case", DIST_ERRORS)
def test_distributed_errors_are_identical_on_every_rank(worlds, case):
    messages = worlds(4).run(C.error_message, case, timeout=60)
    assert len(set(messages)) == 1, messages
    import re
    assert re.search(DIST_ERRORS[case], messages[0]), messages[0]


def test_degrees_single_process():
    with pytest.raises(SPConfigError, match="does not divide the world size 1"):
        lightning_sp.init_sp_mesh(ulysses_degree=2)
    with pytest.raises(SPConfigError, match="ring_degree must be a positive int, got 0"):
        lightning_sp.init_sp_mesh(ring_degree=0)


def test_unsupported_options_of_seed_functions():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(SPConfigError, match="dropout_p=0.1 is not supported.*pass dropout_p=0.0"):
        lightning_sp.zigzag_ring_flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(SPConfigError, match="alibi_slopes are not supported; pass alibi_slopes=None"):
        lightning_sp.ring_flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))


def test_bad_window_and_backend():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(SPConfigError, match=r"window_size entries must be ints >= -1 \(-1 = unbounded\), got \(-3, 0\)"):
        lightning_sp.LongContextAttention()(q, q, q, window_size=(-3, 0))
    with pytest.raises(lightning_sp.KernelError, match="unknown attention backend 'xformers'; supported: auto"):
        lightning_sp.LongContextAttention(backend="xformers")
    with pytest.raises(lightning_sp.KernelError, match="backend 'cpu_flash' cannot run this attention block: "
                                                       "cpu_flash has no sliding-window support"):
        lightning_sp.LongContextAttention(backend="cpu_flash")(q, q, q, causal=True, window_size=(2, 0))


def test_shape_errors():
    q = torch.randn(1, 8, 4, 4)
    with pytest.raises(SPConfigError, match=r"q, k, v must be \(batch, seq, heads, head_dim\)"):
        lightning_sp.LongContextAttention()(q[0], q[0], q[0])
    with pytest.raises(SPConfigError, match="4 query heads are not a multiple of 3 key/value heads"):
        lightning_sp.LongContextAttention()(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(SPConfigError, match=r"qkv must stack 3 tensors along dim -3, .* got shape \(1, 8, 4, 4, 4\)"):
        lightning_sp.LongContextAttentionQKVPacked()(torch.randn(1, 8, 4, 4, 4))
    with pytest.raises(SPConfigError, match=r"kv must stack 2 tensors along dim -3, .* got shape \(1, 8, 4, 4\)"):
        lightning_sp.zigzag_ring_flash_attn_kvpacked_func(q, q)


def test_return_attn_probs_gives_lse():
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    out, lse, probs = lightning_sp.ring_flash_attn_func(q, q, q, causal=True, return_attn_probs=True)
    ref = torch.logsumexp((q.transpose(1, 2) @ q.permute(0, 2, 3, 1)) * 0.5
                          + torch.full((8, 8), float("-inf")).triu(1), -1)
    assert probs is None and lse.shape == (1, 2, 8) and torch.allclose(lse, ref)


def test_transport_choices(monkeypatch):
    from lightning_sp import comm
    from lightning_sp.core.config import SPConfig
    with pytest.raises(SPConfigError, match="unknown transport 'ib'; choose one of auto, nccl, copy_engine"):
        comm.set_transport("ib")
    with pytest.raises(SPConfigError, match="unknown transport 'ib'; choose one of auto, nccl, copy_engine"):
        SPConfig(transport="ib")
    with pytest.raises(SPConfigError, match="unknown transport 'shm'; choose one of auto, nccl, copy_engine"):
        lightning_sp.UlyssesRingStrategy(transport="shm")
    # the copy engines move CUDA memory only: asking for them with CPU tensors is an error, not a fallback
    with pytest.raises(SPConfigError, match="transport 'copy_engine' needs CUDA tensors, got cpu"):
        comm.start_all_to_all(torch.zeros(1, 4), None, "copy_engine")
    mesh = lightning_sp.init_sp_mesh().with_config(transport="copy_engine")
    with pytest.raises(SPConfigError, match="transport 'copy_engine' needs CUDA tensors, got cpu"):
        comm.RingExchange(mesh).start([torch.zeros(4)])


def test_transport_default_is_read_once_per_config(monkeypatch):
    """set_transport and LIGHTNING_SP_TRANSPORT set only the default a new config takes; a config
    (and its mesh) keeps the transport it was built with."""
    from lightning_sp import comm
    from lightning_sp.core.config import SPConfig
    monkeypatch.setattr(comm, "_default_transport", None)
    monkeypatch.setenv("LIGHTNING_SP_TRANSPORT", "nccl")
    before = SPConfig()
    assert before.transport == "nccl" == comm.current_transport()
    monkeypatch.setenv("LIGHTNING_SP_TRANSPORT", "ib")
    with pytest.raises(SPConfigError, match="LIGHTNING_SP_TRANSPORT='ib' is not a transport; set it to one of auto"):
        SPConfig()
    comm.set_transport("copy_engine")  # takes precedence over the environment
    assert SPConfig().transport == "copy_engine" and SPConfig(transport="auto").transport == "auto"
    assert before.transport == "nccl"
    mesh = lightning_sp.init_sp_mesh()
    assert mesh.config.transport == "copy_engine"
    comm.set_transport("auto")
    assert mesh.config.transport == "copy_engine" and lightning_sp.init_sp_mesh().config.transport == "auto"
