"""Distributed attention against a float64 single-process reference: every split, layout, mask,
head grouping and API, in gloo worlds of 2, 4 and 8 processes (and one process)."""
import itertools

import pytest
import torch

import lightning_sp

import attention_cases as C

LAYOUTS = ("contiguous", "zigzag", "stripe")
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
SPLITS = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 4: [(2, 2), (1, 4), (4, 1)], 8: [(2, 4), (4, 2)]}


def _dense_params(world):
    for (u, r), layout, causal, heads in itertools.product(SPLITS[world], LAYOUTS, (False, True), HEADS):
        yield pytest.param(world, u, r, layout, causal, heads, id=f"w{world}-u{u}r{r}-{layout}-"
                           f"{'causal' if causal else 'full'}-{heads}")


def _run(worlds, world, fn, *args, **kwargs):
    if world == 1:
        return [fn(*args, **kwargs)]
    return worlds(world).run(fn, *args, timeout=180, **kwargs)


@pytest.mark.parametrize("world,u,r,layout,causal,heads", [p for w in (1, 2, 4) for p in _dense_params(w)])
def test_dense_float64(worlds, world, u, r, layout, causal, heads):
    errs = _run(worlds, world, C.dense_case, u, r, layout, causal, *HEADS[heads])
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("u,r,layout,causal,heads", [
    (2, 4, "zigzag", True, "gqa"), (4, 2, "stripe", True, "mqa"), (2, 4, "contiguous", False, "mha"),
    (4, 2, "zigzag", False, "gqa"), (2, 4, "stripe", True, "mha"), (4, 2, "contiguous", True, "mqa")])
def test_dense_float64_world8(worlds, u, r, layout, causal, heads):
    errs = _run(worlds, 8, C.dense_case, u, r, layout, causal, *HEADS[heads])
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("world,u,r,layout", [(2, 1, 2, "zigzag"), (4, 2, 2, "zigzag"), (4, 2, 2, "stripe"),
                                              (4, 1, 4, "contiguous"), (8, 2, 4, "zigzag")])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_float32(worlds, world, u, r, layout, causal):
    errs = _run(worlds, world, C.dense_case, u, r, layout, causal, 4, 2, dtype=torch.float32)
    assert max(max(e.values()) for e in errs) < 1e-5


WINDOWS = [(True, (5, -1)), (True, (1, -1)), (False, (3, 2)), (False, (-1, 4))]


WINDOW_CASES = [(w, u, r, layout, c, win) for (w, u, r) in [(2, 1, 2), (4, 2, 2), (4, 1, 4)]
                for layout in LAYOUTS for c, win in WINDOWS]
WINDOW_CASES += [(8, 2, 4, "zigzag", c, win) for c, win in WINDOWS]


@pytest.mark.parametrize("world,u,r,layout,causal,window", WINDOW_CASES)
def test_sliding_window(worlds, world, u, r, layout, causal, window):
    errs = _run(worlds, world, C.dense_case, u, r, layout, causal, 4, 2, window=window,
                seq=3 * C.L.layout_multiple(layout, _mesh_shape(u, r)))
    assert max(max(e.values()) for e in errs) < 1e-10


def _mesh_shape(u, r):
    from lightning_sp.core.mesh import rank_coordinates
    return rank_coordinates(ring_size=r, ulysses_size=u)


DOCS_CAUSAL = [13, 30, 7, 21]  # uneven: every layout pads them
DOCS_EXACT = [8, 24, 16]       # multiples of every layout's multiple up to 8 ranks of a ring x 2


MASKS = {"causal": (True, (-1, -1)), "full": (False, (-1, -1)), "causal-window": (True, (5, -1)),
         "window": (False, (3, 2))}
PACKED_CASES = [(w, u, r, layout, mask) for (w, u, r) in [(1, 1, 1), (2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 1, 4),
                                                          (4, 4, 1)]
                for layout in LAYOUTS for mask in MASKS]
PACKED_CASES += [(8, u, r, layout, mask) for (u, r) in [(2, 4), (4, 2)] for layout in ("zigzag", "stripe")
                 for mask in ("causal", "full")]


@pytest.mark.parametrize("world,u,r,layout,mask", PACKED_CASES)
def test_packed_documents(worlds, world, u, r, layout, mask):
    causal, window = MASKS[mask]
    docs = DOCS_CAUSAL if causal else DOCS_EXACT
    errs = _run(worlds, world, C.varlen_case, u, r, layout, causal, 4, 1 if u > 1 else 2, docs, window=window)
    assert max(max(e.values()) for e in errs) < 1e-10


SEED_FUNCS = ["ring_flash_attn_func", "zigzag_ring_flash_attn_func", "stripe_flash_attn_func"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("func", SEED_FUNCS)
@pytest.mark.parametrize("causal", [False, True])
def test_seed_functions(worlds, world, func, causal):
    layout = {"ring": "contiguous", "zigzag": "zigzag", "stripe": "stripe"}[func.split("_")[0]]
    errs = _run(worlds, world, C.dense_case, 1, world, layout, causal, 4, 2, api=func)
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("func", ["ring_flash_attn_varlen_func", "zigzag_ring_flash_attn_varlen_func"])
@pytest.mark.parametrize("causal", [False, True])
def test_seed_varlen_functions(worlds, func, causal):
    layout = "zigzag" if func.startswith("zigzag") else "contiguous"
    errs = _run(worlds, 4, C.varlen_case, 1, 4, layout, causal, 4, 2, DOCS_CAUSAL if causal else DOCS_EXACT,
                api=func)
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("func", [f"{family}_{packing}_func" for family in ("ring_flash_attn", "zigzag_ring_flash_attn",
                                                                           "stripe_flash_attn")
                                  for packing in ("kvpacked", "qkvpacked")])
def test_seed_packed_functions(worlds, func):
    """kv/qkv packed: the ring sends the packed tensor whole, the gradient is written in it."""
    layout = {"ring": "contiguous", "zigzag": "zigzag", "stripe": "stripe"}[func.split("_")[0]]
    kv_heads = 2 if "_kvpacked_" in func else 4  # a packed kv may be GQA
    errs = _run(worlds, 2, C.dense_case, 1, 2, layout, True, 4, kv_heads, api=func)
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("world,u,r,kv", [(4, 2, 2, 1), (2, 2, 1, 2)])
def test_kv_packed_under_ulysses(worlds, world, u, r, kv):
    """(q, kv) through the Ulysses all-to-all, its gradient gathered into the packed kv; one KV head
    under Ulysses 2 is first replicated (the packing then ends before the attention)."""
    errs = _run(worlds, world, C.dense_case, u, r, "zigzag", True, 4, kv, api="kvpacked")
    assert max(max(e.values()) for e in errs) < 1e-10


def test_seed_packed_varlen_function(worlds):
    errs = _run(worlds, 2, C.varlen_case, 1, 2, "zigzag", True, 4, 4, DOCS_CAUSAL,
                api="zigzag_ring_flash_attn_varlen_qkvpacked_func")
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("world,layout,api", [(2, "zigzag", "zigzag_ring_flash_attn_qkvpacked_func"),
                                              (2, "contiguous", "ring_flash_attn_kvpacked_func"),
                                              (4, "zigzag", "zigzag_ring_flash_attn_qkvpacked_func")])
def test_packed_bf16_bits_match_separate(worlds, world, layout, api):
    _run(worlds, world, C.packed_matches_separate_case, layout, api)


@pytest.mark.parametrize("world,u,r", [(1, 1, 1), (2, 1, 2), (4, 2, 2)])
def test_qkv_packed_module(worlds, world, u, r):
    errs = _run(worlds, world, C.dense_case, u, r, "zigzag", True, 4, 4, api="qkvpacked")
    assert max(max(e.values()) for e in errs) < 1e-10


# head groups: the Ulysses all-to-all in 1, 2 or 4 pieces overlapping attention; the result is the same
@pytest.mark.parametrize("world,u,r,layout,causal,heads,kv,groups", [
    (2, 2, 1, "contiguous", True, 8, 8, 4), (2, 2, 1, "contiguous", False, 8, 2, 1),
    (4, 2, 2, "zigzag", True, 8, 4, 2), (4, 4, 1, "contiguous", True, 8, 8, 2), (4, 2, 2, "stripe", False, 8, 4, 2)])
def test_head_groups(worlds, world, u, r, layout, causal, heads, kv, groups):
    errs = _run(worlds, world, C.dense_case, u, r, layout, causal, heads, kv, head_groups=groups)
    assert max(max(e.values()) for e in errs) < 1e-10


def test_head_groups_packed_documents(worlds):
    errs = _run(worlds, 4, C.varlen_case, 2, 2, "zigzag", True, 8, 4, DOCS_CAUSAL, head_groups=2)
    assert max(max(e.values()) for e in errs) < 1e-10


@pytest.mark.parametrize("world,u,r,layout,packed,backend,heads,groups", [
    (1, 1, 1, "zigzag", False, "cpu_flash", (4, 2), "auto"), (1, 1, 1, "contiguous", True, "cpu_flash", (4, 2), "auto"),
    (1, 1, 1, "stripe", False, "auto", (4, 2), "auto"), (2, 1, 2, "stripe", False, "cpu_flash", (4, 2), "auto"),
    (2, 1, 2, "zigzag", True, "auto", (4, 2), "auto"), (4, 2, 2, "zigzag", False, "cpu_flash", (4, 4), 2)])
def test_kernel_chosen_once_blocks_cut_to_fit(worlds, world, u, r, layout, packed, backend, heads, groups):
    """A schedule with causal blocks of fewer queries than keys runs exactly on cpu_flash, which
    aligns causal masks top-left: the plan cuts those blocks to fit the kernel, chosen once per
    attention call (forward, backward and every head group), not per block; ``auto`` picks it too."""
    results = _run(worlds, world, C.kernel_choice_case, u, r, layout, packed, backend, heads, groups)
    for res in results:
        assert res["chosen"] == ["cpu_flash"], res["chosen"]
        assert res["unequal_in"] > 0 and res["unequal_out"] == 0, res


@pytest.mark.parametrize("dtype,head_dim,offset,wide", [
    (torch.bfloat16, 64, 0, True),    # the layout copies of Ulysses: 8-byte views
    (torch.float32, 2, 0, True),
    (torch.float16, 6, 0, False),     # 12-byte rows
    (torch.bfloat16, 64, 1, False),   # starts 2 bytes into an 8-byte word
    (torch.float64, 8, 0, False),     # already 8 bytes
])
def test_layout_copies_move_the_same_bits(dtype, head_dim, offset, wide):
    """copy_rows copies a head-group slice into an all-to-all buffer (and back) on int64 views where
    both sides allow it, else as it is; either way dst ends equal to src, bit for bit."""
    from lightning_sp.attention.ulysses import copy_rows, wide_views
    x = torch.randn(2, 16, 8, head_dim, dtype=torch.float64).to(dtype)
    src = x.unflatten(2, (2, 2, -1))[:, :, :, 1].permute(2, 0, 1, 3, 4)  # group 1 of 2, (U, b, s, h, d)
    buf = torch.zeros(2 * 2 * 16 * 6 * head_dim + offset, dtype=dtype)[offset:].view(2, 2, 16, 6, head_dim)
    dst = buf.split([2, 4], dim=3)[0]
    assert all((t.dtype == torch.int64) == wide for t in wide_views(dst, src))
    copy_rows(dst, src)
    assert torch.equal(dst, src)
    assert buf[:, :, :, 2:].abs().sum() == 0  # the other tensor's heads untouched
    back = torch.zeros_like(x)
    copy_rows(back.unflatten(2, (2, 2, -1))[:, :, :, 1], dst.permute(1, 2, 0, 3, 4))
    assert torch.equal(back.unflatten(2, (2, 2, -1))[:, :, :, 1], x.unflatten(2, (2, 2, -1))[:, :, :, 1])


def test_head_groups_choice():
    from lightning_sp.attention.ulysses import choose_head_groups
    assert choose_head_groups(8, 8, 2, "auto") == 2 and choose_head_groups(8, 8, 2, 4) == 4
    assert choose_head_groups(6, 2, 2, "auto") == 1  # one KV head per rank: no split in two
    assert choose_head_groups(8, 8, 1, "auto") == 1  # no Ulysses
    assert choose_head_groups(8, 2, 2, 1) == 1  # GQA: one KV head per rank allows no split
    assert choose_head_groups(8, 8, 1, 2) == 1  # no Ulysses: nothing to overlap, one pass over all heads


@pytest.mark.parametrize("layout", ["zigzag", "stripe", "contiguous"])
@pytest.mark.parametrize("window", [(-1, -1), (1, 0)])
def test_odd_documents_in_one_process_with_every_layout(layout, window):
    """Over one ring rank every layout holds the tokens in order: odd document lengths are fine
    (a single-device or DDP run of a model swapped with the default zigzag layout)."""
    from lightning_sp.core import kernels

    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = lightning_sp.LongContextAttention(ring_impl=layout)(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=5,
                                                              window_size=window)
    bounds = (None, 0) if window == (-1, -1) else window
    want, _ = kernels.get_kernel("reference").forward_varlen(q, k, v, cu, cu, causal=True, window=bounds)
    assert (out - want).abs().max() < 1e-12
