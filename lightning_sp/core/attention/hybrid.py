"""LongContextAttention: Ulysses over the ulysses group, Ring over the ring group."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..kernels import check_backend
from ..layout import canonical_layout
from ..errors import SPConfigError
from ..mesh import SPMesh, single_process_mesh
from ..packing import PaddedDocuments, recorded_packing, same_tensor
from ..placement import DocumentPlacement
from .ring import RingSpec, ring_backward, ring_forward
from .ulysses import HeadGather, HeadScatter, check_heads, choose_head_groups, replicated_kv_heads


def normalize_window(window_size) -> tuple:
    """flash-attn's (left, right) with -1 for unbounded -> (left, right) with None for unbounded."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise SPConfigError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    for w in (left, right):
        if not isinstance(w, int) or w < -1:
            raise SPConfigError(f"window_size entries must be ints >= -1 (-1 = unbounded), got {window_size!r}")
    return (None if left < 0 else left, None if right < 0 else right)


def reject_unsupported(dropout_p=0.0, alibi_slopes=None) -> None:
    """flash-attn options the exact attention does not have: an error naming the fix where one is set."""
    if dropout_p:
        raise SPConfigError(f"dropout_p={dropout_p} is not supported by sequence-parallel attention; "
                            f"pass dropout_p=0.0 and apply dropout outside the attention")
    if alibi_slopes is not None:
        raise SPConfigError("alibi_slopes are not supported; pass alibi_slopes=None "
                            "(use RoPE with global position_ids instead)")


def unpack(inputs):
    """q, k, v from (q, k, v), (q, kv) or (qkv,): a packed tensor holds k, v (or q, k, v) along dim -3."""
    if len(inputs) == 3:
        return tuple(inputs)
    packed, name, size = (inputs[1], "kv", 2) if len(inputs) == 2 else (inputs[0], "qkv", 3)
    if packed.dim() < 3 or packed.shape[-3] != size:
        raise SPConfigError(f"{name} must stack {size} tensors along dim -3, (batch, seq, {size}, heads, head_dim) "
                            f"or (tokens, {size}, heads, head_dim) with cu_seqlens; got shape {tuple(packed.shape)}")
    return (*inputs[:-1], *packed.unbind(-3))


class _HybridAttention(torch.autograd.Function):
    """Ulysses around the ring, head group by head group: (b, s, H, d) sequence shards in and out
    (packed documents as (1, t, H, d)); the ring sees whole-sequence head shards. The inputs are
    (q, k, v), (q, kv) or (qkv,) (see ``unpack``); a packed input gets its gradient in its own
    layout, written in place rather than stacked, and without Ulysses the ring sends it whole
    rather than copying its strided k and v."""

    @staticmethod
    def forward(ctx, spec: RingSpec, groups: int, *inputs):
        varlen = spec.cu_seqlens is not None
        packed = inputs[-1] if len(inputs) < 3 else None
        kv_packed = packed if packed is not None and spec.mesh.ulysses_size == 1 else None
        scatter, gather = HeadScatter(unpack(inputs), spec.mesh, groups), HeadGather(spec.mesh, groups)
        saved, plan, lses = [], None, []
        for g in range(groups):
            qg, kg, vg = (x[0] if varlen else x for x in scatter[g])
            message_in = kv_packed[0] if varlen and kv_packed is not None else kv_packed
            out, lse, plan, message = ring_forward(spec, qg, kg, vg, message_in, plan)  # one plan for all groups
            gather.send(g, [out.unsqueeze(0) if varlen else out])
            saved += [qg, kg, vg, out, lse, *message]
            lses.append(lse)
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.groups, ctx.plan = spec, groups, plan
        ctx.packed_shapes = [x.shape for x in inputs] if packed is not None else None
        lse = torch.cat(lses, dim=-1) if groups > 1 else lses[0]
        ctx.mark_non_differentiable(lse)
        return gather.result()[0], lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        spec, varlen = ctx.spec, ctx.spec.cu_seqlens is not None
        U = spec.mesh.ulysses_size
        scatter, gather = HeadScatter([dout.contiguous()], spec.mesh, ctx.groups), HeadGather(spec.mesh, ctx.groups)
        packed_grads = into = None
        if ctx.packed_shapes is not None:
            packed_grads = [dout.new_empty(shape) for shape in ctx.packed_shapes]
            into = unpack(packed_grads)
        ring_into = into if U == 1 else None  # with Ulysses, the gather writes into them
        if ring_into is not None and varlen:
            ring_into = [x[0] for x in ring_into]
        saved = ctx.saved_tensors  # once: under non-reentrant checkpointing a second read fails
        per_group = len(saved) // ctx.groups
        for g in range(ctx.groups):
            dout_g = scatter[g][0]
            q, k, v, out, lse, *message = saved[per_group * g:per_group * (g + 1)]
            grads = ring_backward(spec, ctx.plan, dout_g[0] if varlen else dout_g, q, k, v, out, lse, message,
                                  into=ring_into)
            gather.send(g, [x.unsqueeze(0) for x in grads] if varlen else grads)
        grads = gather.result(into=into if U > 1 else None)
        return (None, None, *(packed_grads if packed_grads is not None else grads))


def long_context_attention(q, k, v, mesh: SPMesh, layout: str, **options):
    """Functional hybrid attention on this rank's tokens (see :class:`LongContextAttention` and
    :func:`packed_long_context_attention` for ``options``)."""
    return packed_long_context_attention((q, k, v), mesh, layout, **options)


def packed_long_context_attention(inputs, mesh: SPMesh, layout: str, *, causal=False, softmax_scale=None,
                                  window_size=(-1, -1), cu_seqlens=None, max_seqlen=None, backend="auto",
                                  head_groups="auto", return_lse=False, placement=None):
    """Functional hybrid attention on this rank's tokens, given as (q, k, v), (q, kv) or (qkv,)
    (kv: (b, s, 2, Hk, d), qkv: (b, s, 3, H, d); with ``cu_seqlens`` without the batch dimension).
    With ``return_lse`` also the log-sum-exp in float32, (b, S/R, H/U) or (t*U, H/U) for packed
    documents: the rows and heads this rank attended (the ring's sequence shard, its Ulysses heads).
    ``placement``: packed documents placed by work (a ``placement.DocumentPlacement``, instead of
    ``cu_seqlens``; see :mod:`lightning_sp.core.attention.placed`). The ``cu_seqlens`` of a batch
    prepared by ``prepare_batch`` carry its layout (:mod:`lightning_sp.core.packing`): those of a
    batch placed by work attend over its placement."""
    if cu_seqlens is not None and placement is None:
        placement = _check_recorded_packing(cu_seqlens, causal, window_size)
        if placement is not None:
            cu_seqlens = max_seqlen = None
    if placement is not None:
        if cu_seqlens is not None:
            raise SPConfigError("pass either cu_seqlens or placement, not both (a placement has its own)")
        if not causal:
            raise SPConfigError(
                "attention that is not causal over a batch whose documents are placed by work "
                "(document_placement='work', the default): the placement pads split documents at their ends, "
                "which only causal attention hides; give the strategy (or prepare_batch) document_placement='spread' "
                "(documents whose lengths need no padding), or call with causal=True")
        from .placed import placed_long_context_attention
        return placed_long_context_attention(inputs, mesh, placement, causal=causal, softmax_scale=softmax_scale,
                                             window=normalize_window(window_size), backend=backend,
                                             head_groups=head_groups, return_lse=return_lse)
    # over one ring rank every layout holds the tokens in their order: the zigzag's even-length
    # rule (two chunks per rank) does not apply
    layout = canonical_layout(layout) if mesh.ring_size > 1 else "contiguous"
    window = normalize_window(window_size)
    varlen = cu_seqlens is not None
    q, k, v = unpack(inputs)
    expected_dim = 3 if varlen else 4
    if q.dim() != expected_dim or k.dim() != expected_dim or v.dim() != expected_dim:
        shape = "(tokens, heads, head_dim) with cu_seqlens" if varlen else "(batch, seq, heads, head_dim)"
        raise SPConfigError(f"q, k, v must be {shape}; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise SPConfigError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:  # e.g. fp32 RoPE output next to a bf16 value
        inputs = q, k.to(q.dtype), v.to(q.dtype)
    U, R = mesh.ulysses_size, mesh.ring_size
    check_heads(q.shape[-2], k.shape[-2], U)
    groups = choose_head_groups(q.shape[-2], k.shape[-2], U, head_groups)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if varlen:
        cu = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
        _check_varlen(cu, q.shape[0], layout, mesh)
    else:
        cu = None
        n_ring = q.shape[1] * U
        if layout == "zigzag" and n_ring % 2:
            raise SPConfigError(f"the zigzag layout needs an even number of tokens per ring rank; got "
                                f"{n_ring} ({q.shape[1]} local x ulysses {U}); pad the sequence to a multiple "
                                f"of {2 * R * U}")
    rep = replicated_kv_heads(k.shape[-2], U) // k.shape[-2]
    if rep > 1:  # every Ulysses rank needs whole KV heads; autograd sums the replicas' gradients
        q, k, v = unpack(inputs)
        inputs = q, k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
    if varlen:
        inputs = [x.unsqueeze(0) for x in inputs]
    spec = RingSpec(mesh, layout, causal, scale, window, check_backend(backend), tuple(cu) if varlen else None)
    out, lse = _HybridAttention.apply(spec, groups, *inputs)
    if varlen:
        out = out[0]
    return (out, lse) if return_lse else out


def _check_recorded_packing(cu_seqlens, causal, window_size) -> DocumentPlacement | None:
    """The placement that prepared ``cu_seqlens`` carry, if any; an error where they describe padded
    documents that the call's attention would see."""
    packing = recorded_packing(cu_seqlens)
    if isinstance(packing, PaddedDocuments) and not causal and normalize_window(window_size)[1] != 0:
        raise SPConfigError(
            f"attention that is not causal over packed documents of lengths {list(packing.lengths[:8])}"
            f"{'...' if len(packing.lengths) > 8 else ''}, which batch preparation padded at their ends to a "
            f"multiple of {packing.multiple} (the layout's) where this attention sees the padding; make every "
            f"document's length a multiple of {packing.multiple}, or call with causal=True")
    return packing if isinstance(packing, DocumentPlacement) else None


def _check_varlen(cu, local_tokens, layout, mesh):
    U = mesh.ulysses_size
    if cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise SPConfigError(f"cu_seqlens must start at 0 and not decrease, got {cu}")
    if cu[-1] != local_tokens * U:
        raise SPConfigError(
            f"cu_seqlens ends at {cu[-1]} but this rank holds {local_tokens} tokens x ulysses degree {U} = "
            f"{local_tokens * U}; pass the local cu_seqlens that lightning_sp.layout.shard_documents returns")
    if layout == "zigzag":
        odd = [b - a for a, b in zip(cu[:-1], cu[1:]) if (b - a) % 2]
        if odd:
            raise SPConfigError(f"the zigzag layout needs every document's local length to be even, got {odd}; "
                                f"pad documents with lightning_sp.layout.shard_documents")


class SequenceContext:
    """The packing of the batch being trained on, shared by the attention layers a strategy binds.

    A model called as ``model(input_ids=..., position_ids=...)`` on packed documents (Hugging Face's
    convention: positions restart at 0 for each document) passes its attention layers no
    ``cu_seqlens``; they read this rank's packing here instead. The strategy updates it (:meth:`set`)
    for every batch it prepares (a dense batch clears it). A layer called with ``position_ids`` checks
    that they are the prepared batch's (the same tensor, or equal values agreed on by every rank of
    the sequence-parallel group) and otherwise raises on every rank, naming the fix: the packing
    belongs to that batch only. Where the batch's documents were placed by work (``placement``, see
    :mod:`lightning_sp.core.placement`), every layer attends over the placement, and one called with
    ``cu_seqlens`` must pass the prepared batch's (checked the same way).
    """

    def __init__(self):
        self.set(None)

    def set(self, position_ids, cu_seqlens=None, max_seqlen=None, placement=None) -> None:
        """This rank's prepared ``position_ids``, local ``cu_seqlens`` / ``max_seqlen`` (None: dense)
        and the batch's document placement (None: documents spread with the layout)."""
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self.placement = placement if cu_seqlens is not None else None
        self.position_ids = position_ids if cu_seqlens is not None else None
        self._checked = self.position_ids  # the positions tensor known to be the prepared batch's
        self._checked_cu = cu_seqlens  # the cu_seqlens tensor known to be the prepared batch's

    def packing(self, position_ids, mesh: SPMesh) -> tuple:
        """``(cu_seqlens, max_seqlen)`` for a layer called without ``cu_seqlens`` (``(None, None)``
        for a dense batch); collective over ``mesh.sp_group`` where ``position_ids`` are not the
        prepared tensor itself."""
        if self.cu_seqlens is None:
            return None, None
        if position_ids is not None and not same_tensor(position_ids, self._checked):
            prepared = self.position_ids
            same = (position_ids.numel() == prepared.numel()
                    and torch.equal(position_ids.reshape(-1), prepared.reshape(-1).to(position_ids.device)))
            if not _agreed(same, position_ids.device, mesh):
                raise SPConfigError(
                    f"attention was called with position_ids {tuple(position_ids.shape)} that are not those of the "
                    f"batch the strategy prepared ({tuple(prepared.shape)}, packed documents); pass "
                    f"position_ids=batch['position_ids'] of that batch (or call model(**batch), which also passes "
                    f"cu_seq_lens_q): the layers take its document boundaries, which hold for its tokens only")
            self._checked = position_ids
        return self.cu_seqlens, self.max_seqlen

    def placed(self, cu_seqlens, position_ids, mesh: SPMesh):
        """The batch's document placement for a call with ``cu_seqlens`` (None: positions only), or
        None where the documents are not placed by work. Collective over ``mesh.sp_group`` where
        ``cu_seqlens`` or ``position_ids`` are not the prepared tensors themselves."""
        if self.placement is None:
            return None
        if cu_seqlens is None:
            self.packing(position_ids, mesh)
        elif not same_tensor(cu_seqlens, self._checked_cu):
            given = torch.as_tensor(cu_seqlens).reshape(-1).to("cpu", torch.int64)
            prepared = self.cu_seqlens.reshape(-1).to("cpu", torch.int64)
            same = given.shape == prepared.shape and torch.equal(given, prepared)
            if not _agreed(same, self.cu_seqlens.device, mesh):
                raise SPConfigError(
                    "attention was called with cu_seqlens that are not those of the batch the strategy prepared "
                    "(on some rank of the sequence-parallel group), whose documents are placed on the ring ranks by "
                    "work (document_placement='work'); pass cu_seqlens=batch['cu_seqlens'] of that batch (or none), "
                    "or give the strategy document_placement='spread' to attend over other packings")
            self._checked_cu = cu_seqlens
        return self.placement


def _agreed(same: bool, device, mesh: SPMesh) -> bool:
    """``same`` on every rank of the sequence-parallel group (collective where it has several)."""
    if mesh.sp_size > 1 and dist.is_available() and dist.is_initialized():
        verdict = torch.tensor([int(same)], device=device)
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=mesh.sp_group)
        return bool(verdict.item())
    return same


class LongContextAttention(nn.Module):
    """Exact attention over a sequence split across the ranks of a dp x ring x ulysses mesh.

    q, k, v are this rank's tokens, ``(batch, local_seq, heads, head_dim)`` in the layout named by
    ``ring_impl`` (``lightning_sp.layout.shard`` makes them); with ``cu_seqlens``, packed documents
    ``(local_tokens, heads, head_dim)`` with the local ``cu_seqlens`` of
    ``lightning_sp.layout.shard_documents``. Constructing it touches no process group; ``mesh=None``
    means "bound later" (``bind``, which the Lightning strategy calls). Unbound in a world of one
    process it attends locally; unbound in a larger world it raises. ``head_groups`` splits the
    Ulysses all-to-all into that many head groups so that one group's communication can overlap
    another's attention (``auto``: 2 where the heads split in two, see ``ulysses.choose_head_groups``);
    the result does not depend on it.
    """

    def __init__(self, mesh: SPMesh | None = None, ring_impl: str = "zigzag", backend: str = "auto",
                 head_groups: int | str = "auto"):
        super().__init__()
        self.mesh = mesh
        self.ring_impl = canonical_layout(ring_impl)
        self.backend = check_backend(backend)
        self.head_groups = head_groups
        self.sequence_context: SequenceContext | None = None

    def bind(self, mesh: SPMesh, ring_impl: str | None = None, backend: str | None = None,
             head_groups: int | str | None = None, sequence_context: SequenceContext | None = None):
        """Attach ``mesh``; the other arguments, where not None, replace this layer's own."""
        self.mesh = mesh
        if sequence_context is not None:
            self.sequence_context = sequence_context
        if ring_impl is not None:
            self.ring_impl = canonical_layout(ring_impl)
        if backend is not None:
            self.backend = check_backend(backend)
        if head_groups is not None:
            self.head_groups = head_groups
        return self

    def resolved_mesh(self) -> SPMesh:
        if self.mesh is not None:
            return self.mesh
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise SPConfigError(
                f"{type(self).__name__} has no mesh in a world of {dist.get_world_size()} ranks; pass "
                f"mesh=lightning_sp.init_sp_mesh(...) or train with strategy='ulysses_ring', which binds it")
        return single_process_mesh()

    def forward(self, q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), cu_seqlens=None,
                max_seqlen=None, position_ids=None):
        """Attention on this rank's tokens. Without ``cu_seqlens``, a layer bound to a
        :class:`SequenceContext` that holds packed documents attends within them (one row
        ``(1, local_seq, heads, head_dim)`` in and out); ``position_ids``, where given, must be the
        prepared batch's. Where the context holds the batch's document placement (documents placed
        by work), the layer attends over it, causally, and ``cu_seqlens``, where given, must be the
        prepared batch's. The ``cu_seqlens`` of a batch that ``prepare_batch`` placed by work carry
        the placement: a layer given them attends over it with or without a context."""
        return self._attend((q, k, v), causal, softmax_scale, window_size, cu_seqlens, max_seqlen, position_ids)

    def _attend(self, inputs, causal, softmax_scale, window_size, cu_seqlens, max_seqlen, position_ids=None):
        mesh, row, placement, context = self.resolved_mesh(), False, None, self.sequence_context
        if context is not None:
            placement = context.placed(cu_seqlens, position_ids, mesh)
            if cu_seqlens is None:
                if placement is None:
                    cu_seqlens, max_seqlen = context.packing(position_ids, mesh)
                packed = cu_seqlens is not None or placement is not None
                row = packed and inputs[0].dim() == (4 if len(inputs) > 1 else 5)
            if row:  # the packed documents as one batched row
                if inputs[0].shape[0] != 1:
                    raise SPConfigError(f"the batch holds packed documents (one row) but attention got a batch of "
                                        f"{inputs[0].shape[0]} rows; call the model on the prepared batch")
                inputs = [x[0] for x in inputs]
        if placement is not None:
            cu_seqlens = max_seqlen = None  # the placement has its own
        out = packed_long_context_attention(
            inputs, mesh, self.ring_impl, causal=causal, softmax_scale=softmax_scale,
            window_size=window_size, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.backend,
            head_groups=self.head_groups, placement=placement)
        return out[None] if row else out

    def extra_repr(self) -> str:
        mesh = "unbound" if self.mesh is None else self.mesh.describe()
        return (f"ring_impl={self.ring_impl!r}, backend={self.backend!r}, head_groups={self.head_groups!r}, "
                f"mesh={mesh}")


class LongContextAttentionQKVPacked(LongContextAttention):
    """LongContextAttention on one packed ``(batch, local_seq, 3, heads, head_dim)`` input; its
    gradient comes packed the same way, written in place."""

    def forward(self, qkv, causal=False, softmax_scale=None, window_size=(-1, -1), cu_seqlens=None,
                max_seqlen=None, position_ids=None):
        return self._attend((qkv,), causal, softmax_scale, window_size, cu_seqlens, max_seqlen, position_ids)


class UlyssesAttention(LongContextAttention):
    """Pure Ulysses: the ring degree of its mesh must be 1 (on a hybrid mesh use LongContextAttention)."""

    def __init__(self, mesh: SPMesh | None = None, backend: str = "auto", head_groups: int | str = "auto"):
        super().__init__(mesh, ring_impl="contiguous", backend=backend, head_groups=head_groups)

    def resolved_mesh(self) -> SPMesh:
        mesh = super().resolved_mesh()
        if mesh.ring_size != 1:
            raise SPConfigError(f"UlyssesAttention needs ring degree 1, the mesh has {mesh.ring_size}; "
                                f"use LongContextAttention for hybrid meshes")
        return mesh
