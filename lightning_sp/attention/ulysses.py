"""Ulysses: an all-to-all that trades sequence shards for head shards, and back."""
from __future__ import annotations

import math

import torch

from ..comm import all_to_all
from ..mesh import SPConfigError


def _seq_to_heads(xs, group, U):
    """(b, s, h_i, d) per rank -> (b, U*s, h_i/U, d): gather the sequence, scatter the heads."""
    b, s, _, d = xs[0].shape
    heads = [x.shape[2] // U for x in xs]
    buf = xs[0].new_empty(U, b, s, sum(heads), d)
    start = 0
    for x, h in zip(xs, heads):
        buf[..., start:start + h, :].copy_(x.reshape(b, s, U, h, d).permute(2, 0, 1, 3, 4))
        start += h
    recv = all_to_all(buf, group)  # dim 0 now indexes the sequence chunk
    outs, start = [], 0
    for h in heads:
        outs.append(recv[..., start:start + h, :].permute(1, 0, 2, 3, 4).reshape(b, U * s, h, d))
        start += h
    return outs


def _heads_to_seq(ys, group, U):
    """(b, U*s, h_i, d) -> (b, s, U*h_i, d): the inverse of _seq_to_heads."""
    b, S, _, d = ys[0].shape
    s = S // U
    heads = [y.shape[2] for y in ys]
    buf = ys[0].new_empty(U, b, s, sum(heads), d)
    start = 0
    for y, h in zip(ys, heads):
        buf[..., start:start + h, :].copy_(y.reshape(b, U, s, h, d).permute(1, 0, 2, 3, 4))
        start += h
    recv = all_to_all(buf, group)  # dim 0 now indexes the head group
    outs, start = [], 0
    for h in heads:
        outs.append(recv[..., start:start + h, :].permute(1, 2, 0, 3, 4).reshape(b, s, U * h, d))
        start += h
    return outs


class _AllToAll(torch.autograd.Function):
    """_seq_to_heads when ``to_heads``, else _heads_to_seq; each one's backward is the other."""

    @staticmethod
    def forward(ctx, group, U, to_heads, *xs):
        ctx.group, ctx.U, ctx.to_heads = group, U, to_heads
        return tuple(_REDISTRIBUTE[to_heads](xs, group, U))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.contiguous() for g in grads]
        return (None, None, None, *_REDISTRIBUTE[not ctx.to_heads](grads, ctx.group, ctx.U))


_REDISTRIBUTE = {True: _seq_to_heads, False: _heads_to_seq}


def check_heads(q_heads: int, kv_heads: int, ulysses_size: int) -> None:
    if q_heads % ulysses_size:
        raise SPConfigError(
            f"{q_heads} query heads are not divisible by the ulysses degree {ulysses_size}; choose a "
            f"ulysses degree that divides {q_heads} and put the rest of the parallelism into the ring degree")
    if q_heads % kv_heads:
        raise SPConfigError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")


def seq_to_heads(q, k, v, group, U):
    """q, k, v in one all-to-all. When the ulysses degree does not divide the KV heads (GQA/MQA),
    KV heads are first replicated (autograd sums their gradients back)."""
    check_heads(q.shape[2], k.shape[2], U)
    rep = math.lcm(k.shape[2], U) // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    return _AllToAll.apply(group, U, True, q, k, v)


def heads_to_seq(out, group, U):
    return _AllToAll.apply(group, U, False, out)[0]
