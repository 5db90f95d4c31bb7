"""Point-to-point transfers between the GPUs of one node by their copy engines.

NCCL moves data with kernels, which take SMs from the attention kernels they run beside (and, from a
normal-priority stream, wait behind the attention kernel's remaining blocks: ``mesh`` gives the
ring and Ulysses groups high-priority streams for that). Here the data
moves with cudaMemcpy over NVLink (the copy engines, no SMs) and ranks synchronize through flags
in GPU memory written and awaited by stream memory operations (no SMs, no host round trip).

Protocol (pull): each rank of a group owns a symmetric "outbox" of ``SLOTS`` message slots and a
flag array. Message n (every rank of the group sends its n-th message together, as collectives
do) is staged in slot n % SLOTS of the sender's outbox; the sender then writes ``ready = n + 1``
into each receiver's flags; a receiver waits for that flag, copies its part out of the sender's
outbox into an ordinary tensor and writes ``consumed = n + 1`` into the sender's flags, which the
sender waits for before it stages message n + SLOTS in that slot. All of it runs on one side stream
per group; the caller's stream waits for an event only when it needs the data.

The transfers overlap the kernels completely, but the copies' memory traffic slows the attention
kernels by about what they hide, and the staging copy makes an un-overlapped all-to-all slower than
NCCL's (benchmark/RESULTS.md), so the transport is opt-in.
A rank that dies mid-exchange leaves its peers' streams waiting on a flag (as NCCL without its
watchdog would): the launcher must end the job.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.distributed as dist

SLOTS = 2
READY, CONSUMED = 0, 1


@functools.cache
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    fns = []
    for name in ("cuStreamWaitValue32", "cuStreamWriteValue32"):
        fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        fns.append(fn)
    return fns


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")


def wait_value_geq(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """The stream waits (on the GPU) until the uint32 at ``address`` is >= value."""
    _check(_driver()[0](stream.cuda_stream, address, value, 0), "cuStreamWaitValue32")  # 0: GEQ


def write_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """The stream writes ``value`` at ``address`` after its earlier work, with a memory fence."""
    _check(_driver()[1](stream.cuda_stream, address, value, 0), "cuStreamWriteValue32")


def unavailable_reason(group) -> str | None:
    """Why the copy-engine transport cannot serve ``group`` (None: it can). Collective over the group."""
    if not torch.cuda.is_available():
        return "no CUDA"
    if "nccl" not in str(dist.get_backend(group)):
        return f"the group's backend is {dist.get_backend(group)}, not nccl"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
        _driver()
    except (ImportError, OSError, AttributeError) as err:
        return f"no symmetric memory or stream memory operations ({err})"
    import socket
    here = (socket.gethostname(), torch.cuda.current_device())
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, here, group=group)
    if len({host for host, _ in everyone}) > 1:
        return "the group spans several hosts"
    me = torch.cuda.current_device()
    for _, dev in everyone:
        if dev != me and not torch.cuda.can_device_access_peer(me, dev):
            return f"GPU {me} cannot access GPU {dev} directly"
    return None


class CopyEngineTransport:
    """The copy-engine transport of one process group (see the module doc). Collective to build."""

    def __init__(self, group):
        from torch.distributed import _symmetric_memory as symm_mem
        self._symm_mem, self.group = symm_mem, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.seq = 0
        self._receivers = [() for _ in range(SLOTS)]  # who must consume a slot before it is reused
        self._flags, self._flags_hdl = self._symmetric(2 * self.size * SLOTS, torch.int32)
        self._flags.zero_()
        self._outbox = self._outbox_hdl = None
        self.slot_bytes = 0
        torch.cuda.synchronize(self.device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone writes a peer's

    def _symmetric(self, numel, dtype):
        before = torch.cuda.memory_allocated(self.device)
        t = self._symm_mem.empty(numel, dtype=dtype, device=self.device)
        # whether torch's allocator statistics (max_memory_allocated) include this memory
        self.counted_by_allocator = torch.cuda.memory_allocated(self.device) - before >= t.nbytes
        return t, self._symm_mem.rendezvous(t, self.group)

    @property
    def buffer_bytes(self) -> int:
        """GPU memory this transport's outbox holds."""
        return SLOTS * self.slot_bytes

    def _flag_address(self, owner: int, kind: int, about: int, slot: int) -> int:
        index = (kind * self.size + about) * SLOTS + slot
        return self._flags_hdl.buffer_ptrs[owner] + 4 * index

    def _grow(self, nbytes: int) -> None:
        # Collective: every rank stages messages of the same size in the same order, so all grow at
        # the same message. Nobody may still read an old outbox when it is freed.
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self.slot_bytes = max(nbytes, 2 * self.slot_bytes)
        self.slot_bytes = -(-self.slot_bytes // 2**20) * 2**20
        self._outbox = self._outbox_hdl = None
        self._outbox, self._outbox_hdl = self._symmetric(SLOTS * self.slot_bytes, torch.uint8)

    def _slot_view(self, owner: int, slot: int, nbytes: int) -> torch.Tensor:
        offset = slot * self.slot_bytes
        if owner == self.rank:
            return self._outbox[offset:offset + nbytes]
        return self._outbox_hdl.get_buffer(owner, (nbytes,), torch.uint8, storage_offset=offset)

    def _claim(self, nbytes: int, receivers) -> tuple[int, int]:
        """Message number and slot for the next message, on the side stream, once the slot is free."""
        if nbytes > self.slot_bytes:
            self._grow(nbytes)
        n, slot = self.seq, self.seq % SLOTS
        self.seq += 1
        if n >= SLOTS:
            for peer in self._receivers[slot]:
                wait_value_geq(self.stream, self._flag_address(self.rank, CONSUMED, peer, slot), n - SLOTS + 1)
        self._receivers[slot] = tuple(receivers)
        return n, slot

    def send_recv(self, tensors: list[torch.Tensor], dst: int, src: int) -> "Transfer":
        """Send ``tensors`` to group rank ``dst`` while receiving the same shapes from ``src``."""
        received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        offsets = _offsets(tensors)
        return self._exchange(tensors, [dst], [(src, off, r) for off, r in zip(offsets, received)], received)

    def all_to_all(self, x: torch.Tensor) -> "Transfer":
        """x is (group size, ...): slice i goes to group rank i; slice i of the result came from rank i."""
        x = x.contiguous()
        out = torch.empty_like(x)
        peers = [p for p in range(self.size) if p != self.rank]
        chunk = x[0].nbytes
        # the payload holds the slices for the other ranks, in rank order: rank r's slice sits at
        # position r (or r - 1 past the sender's own rank) of the sender's payload
        pulls = [(p, (self.rank - (self.rank > p)) * chunk, out[p]) for p in peers]
        return self._exchange([x[p] for p in peers], peers, pulls, [out], local=(x[self.rank], out[self.rank]))

    def _exchange(self, payload, receivers, pulls, results, local=None) -> "Transfer":
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        for t in payload:
            t.record_stream(self.stream)
        total = sum(t.nbytes for t in payload)
        with torch.cuda.stream(self.stream):
            n, slot = self._claim(total, receivers)
            box = self._slot_view(self.rank, slot, total)
            for t, start in zip(payload, _offsets(payload)):
                box[start:start + t.nbytes].copy_(_bytes(t))
            for peer in receivers:
                write_value(self.stream, self._flag_address(peer, READY, self.rank, slot), n + 1)
            if local is not None:
                _bytes(local[1]).copy_(_bytes(local[0]))
            for peer in dict.fromkeys(p for p, _, _ in pulls):
                wait_value_geq(self.stream, self._flag_address(self.rank, READY, peer, slot), n + 1)
                remote = self._slot_view(peer, slot, total)
                for _, start, out in (x for x in pulls if x[0] == peer):
                    _bytes(out).copy_(remote[start:start + out.nbytes])
                write_value(self.stream, self._flag_address(peer, CONSUMED, self.rank, slot), n + 1)
            done = torch.cuda.Event()
            done.record(self.stream)
        return Transfer(done, results)


def _offsets(tensors) -> list[int]:
    starts, at = [], 0
    for t in tensors:
        starts.append(at)
        at += t.nbytes
    return starts


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a flat uint8 view (copies between such views are
    cudaMemcpy calls: the copy engines, no SMs)."""
    assert t.is_contiguous(), "copy-engine transfers need contiguous tensors"
    return t.view(-1).view(torch.uint8)


class Transfer:
    """A started copy-engine exchange; ``wait()`` makes the caller's stream wait for it."""

    def __init__(self, done: torch.cuda.Event, received: list[torch.Tensor]):
        self._done, self._received = done, received

    def wait(self) -> list[torch.Tensor]:
        torch.cuda.current_stream().wait_event(self._done)
        return self._received
