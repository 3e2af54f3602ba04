"""The collective weight channel of server mode: weights broadcast over a dedicated two-rank process group.

The HTTP channel sends every sync as one safetensors blob through the server's request handler, which costs a
serialisation and two copies. The collective channel moves the same canonical float32 tensors with a broadcast
instead: NCCL between GPUs (the fast path), gloo over TCP otherwise, and it is the same code path either way, so
the gloo form that runs on a CPU machine tests what runs on GPUs. Only the data plane changes: names, shapes and
the version still travel over HTTP as JSON (a manifest), and the version check is the HTTP channel's.

The group is private to the pair. The trainer (rank 0, the source) hosts a TCP store of its own on a free port
and tells the server where it is over HTTP; neither side touches ``torch.distributed``'s default group, so a
trainer that is itself a ``torchrun`` job keeps its own. On CPU the group is a bare ``ProcessGroupGloo`` on a
``PrefixStore``; on GPU it is vLLM's ``StatelessProcessGroup`` with a ``PyNcclCommunicator`` (vLLM's own
stateless NCCL path, which also needs no default group).

Tensors are packed into flat buckets (``plan_buckets``) so a model of hundreds of tensors costs a few broadcasts;
both sides derive the same buckets from the manifest, so no bucket layout crosses the wire.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diptych.rollout.base import RolloutEngineError

CHANNELS: tuple[str, ...] = ("http", "collective")
"""The values of ``vllm.weight_channel``."""
BUCKET_BYTES = 256 << 20
"""The largest flat buffer one broadcast carries (a tensor larger than this goes alone)."""
_DTYPES = {"float32": 4}
_STORE_PREFIX = "diptych-weights"


def manifest(weights: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """What the receiver must allocate: each tensor's name, shape and dtype, in send order."""
    return [{"name": k, "shape": [int(d) for d in np.shape(v)], "dtype": "float32"} for k, v in weights.items()]


def check_manifest(man: Any, expected: Mapping[str, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """A manifest from the wire, checked before anything is received (a refused one never starts a broadcast)."""
    if not isinstance(man, list) or not man:
        raise RolloutEngineError("a collective weight sync needs a non-empty manifest: a list of "
                                 "{name, shape, dtype} entries.")
    seen: set[str] = set()
    for entry in man:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])):
            raise RolloutEngineError(f"bad manifest entry {str(entry)[:80]!r}: want {{name: str, shape: [int, ...], "
                                     "dtype: 'float32'}.")
        if entry.get("dtype") not in _DTYPES:
            raise RolloutEngineError(f"manifest entry {entry['name']!r} has dtype {entry.get('dtype')!r}; the "
                                     f"collective channel carries {', '.join(_DTYPES)} (canonical weights).")
        if entry["name"] in seen:
            raise RolloutEngineError(f"manifest names {entry['name']!r} twice.")
        seen.add(entry["name"])
    if expected is not None:
        missing, unknown = sorted(set(expected) - seen), sorted(seen - set(expected))
        if missing or unknown:
            raise RolloutEngineError(f"the weight manifest does not match the served model: missing {missing[:3]}, "
                                     f"unknown {unknown[:3]}; send backend.export_weights(state) (all weights).")
        for entry in man:
            if tuple(entry["shape"]) != tuple(expected[entry["name"]]):
                raise RolloutEngineError(f"weight {entry['name']!r} has shape {tuple(entry['shape'])}, the served "
                                         f"model's is {tuple(expected[entry['name']])}.")
    return man


def plan_buckets(man: Sequence[Mapping[str, Any]], limit: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive manifest entries packed into buckets of at most ``limit`` bytes (an oversized tensor alone)."""
    if int(limit) < 1:
        raise RolloutEngineError(f"bucket size must be >= 1 byte, got {limit}.")
    buckets: list[list[int]] = []
    size = 0
    for i, entry in enumerate(man):
        nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * _DTYPES[entry["dtype"]]
        if buckets and size + nbytes <= limit:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def local_address(peer_host: str) -> str:
    """This machine's address as ``peer_host`` reaches it (loopback for a loopback peer): where the server finds
    the trainer's store. A UDP 'connect' sends nothing; it only picks the route."""
    if peer_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer_host, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def cuda_uuid() -> str | None:
    """This process's current CUDA device's UUID, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def choose_backend(server_device: str, server_uuid: str | None = None) -> str:
    """NCCL when both ends are on CUDA, on different GPUs (NCCL refuses two ranks on one device), gloo otherwise:
    the same channel, slower, and what the CPU tests run."""
    mine = cuda_uuid() if server_device == "cuda" else None
    return "nccl" if mine is not None and mine != (server_uuid or None) else "gloo"


class WeightGroup:
    """One end of the trainer-server pair: rank 0 (the trainer) sends, rank 1 (the server) receives.

    Build the trainer's end with :meth:`host` (it binds the store) and the server's with :meth:`join`; both
    constructors block until the other end has joined, so the two must run at the same time (the server joins on
    a thread of its own while the trainer waits in :meth:`host`'s ``connect``)."""

    def __init__(self, rank: int, backend: str, comm: Any, device: Any, timeout_s: float) -> None:
        self.rank, self.backend, self._comm, self.device = rank, backend, comm, device
        self.timeout_s = float(timeout_s)

    # -- construction ------------------------------------------------------------------------------
    @staticmethod
    def open_store(host: str, backend: str, timeout_s: float) -> tuple[Any, int]:
        """The trainer's side of the rendezvous: a listening store on a free port (returned), before any peer."""
        if backend not in ("gloo", "nccl"):
            raise RolloutEngineError(f"collective backend must be gloo or nccl, got {backend!r}.")
        if backend == "nccl":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen()
            return sock, int(sock.getsockname()[1])
        from torch.distributed import TCPStore

        store = TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        return store, int(store.port)

    @classmethod
    def host(cls, pending: Any, host: str, port: int, backend: str, timeout_s: float) -> WeightGroup:
        """Rank 0 on the store of :meth:`open_store` (``pending``); blocks until the server joins."""
        return cls._build(0, pending, host, port, backend, timeout_s)

    @classmethod
    def join(cls, host: str, port: int, backend: str, timeout_s: float) -> WeightGroup:
        """Rank 1: connect to the trainer's store at ``host:port``; blocks until the group is formed."""
        if backend == "gloo":
            from torch.distributed import TCPStore

            store = TCPStore(host, int(port), 2, False, timeout=datetime.timedelta(seconds=timeout_s))
            return cls._build(1, store, host, port, backend, timeout_s)
        return cls._build(1, None, host, port, backend, timeout_s)

    @classmethod
    def _build(cls, rank: int, store: Any, host: str, port: int, backend: str, timeout_s: float) -> WeightGroup:
        import torch

        if backend == "gloo":
            from torch.distributed import PrefixStore
            from torch.distributed.distributed_c10d import ProcessGroupGloo

            pg = ProcessGroupGloo(PrefixStore(_STORE_PREFIX, store), rank, 2,
                                  datetime.timedelta(seconds=timeout_s))
            return cls(rank, backend, pg, torch.device("cpu"), timeout_s)
        try:  # GPU: vLLM's stateless NCCL, as its own RL examples pair a trainer with an engine
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
        except ImportError as e:
            raise RolloutEngineError("the collective weight channel over NCCL needs vLLM in this process too "
                                     f"({e}); install it or set vllm.weight_channel: http.") from e
        group = StatelessProcessGroup.create(host, int(port), rank, 2, store_timeout=int(timeout_s),
                                             listen_socket=store)
        device = torch.device("cuda", torch.cuda.current_device())
        return cls(rank, backend, PyNcclCommunicator(group, device=device), device, timeout_s)

    # -- data plane --------------------------------------------------------------------------------
    def _broadcast(self, flat: Any) -> None:
        if self.backend == "gloo":
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self._comm.broadcast([flat], opts).wait()
        else:
            import torch

            self._comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())

    def send(self, weights: Mapping[str, np.ndarray], man: Sequence[Mapping[str, Any]],
             bucket_bytes: int = BUCKET_BYTES) -> None:
        """Broadcast ``weights`` (float32 numpy, in manifest order) bucket by bucket."""
        import torch

        if self.rank != 0:
            raise RolloutEngineError("only the trainer's end (rank 0) sends weights.")
        for bucket in plan_buckets(man, bucket_bytes):
            arrays = [np.ravel(weights[man[i]["name"]]) for i in bucket]
            flat = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else np.ascontiguousarray(arrays[0]))
            self._broadcast(flat.to(self.device) if self.device.type != "cpu" else flat)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive(self, man: Sequence[Mapping[str, Any]], bucket_bytes: int = BUCKET_BYTES) -> dict[str, Any]:
        """Receive the tensors of ``man`` (views of the received buckets, on this end's device)."""
        import torch

        if self.rank != 1:
            raise RolloutEngineError("only the server's end (rank 1) receives weights.")
        out: dict[str, Any] = {}
        for bucket in plan_buckets(man, bucket_bytes):
            sizes = [int(np.prod(man[i]["shape"], dtype=np.int64)) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=self.device)
            self._broadcast(flat)
            for i, part in zip(bucket, torch.split(flat, sizes)):
                out[man[i]["name"]] = part.view(tuple(man[i]["shape"]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def close(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None and self.backend == "gloo":
            shutdown = getattr(comm, "shutdown", None)
            if callable(shutdown):
                with contextlib.suppress(Exception):  # a peer that already left
                    shutdown()
