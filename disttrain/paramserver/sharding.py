"""How the parameters are cut into parts ("keys") and spread over S servers, the same way on every process.

Every parameter is flattened (C order). One larger than `limit` elements is cut into ceil(n / limit) parts of
near-equal length; then the parts, largest first, each go to the server with the least load so far (ties: the
lower server index). With limit = ceil(total / (4 S)) no server holds more than total / S + limit elements,
i.e. at most 1.25x the even share, however lopsided the parameter sizes (one 16 MB matrix and a few biases
still spread over all servers). With one server nothing is cut.

Keys number the parts in (parameter, offset) order. The `fingerprint` hashes the names, shapes, dtypes and the
whole assignment; a worker joins only a server that computed the same one (same model, same S).

    layout = Layout.from_named_arrays(model.named_parameters(), num_servers=2)
    layout.parts_of(server=0)          # the Parts server 0 owns
"""
import hashlib
import heapq
import math
from dataclasses import dataclass

import msgpack
import numpy as np

__all__ = ["ParamSpec", "Part", "Layout", "LAYOUT_VERSION"]

LAYOUT_VERSION = 1


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple
    dtype: str          # wire name, "<f4" or "<f8"

    @property
    def size(self):
        return math.prod(self.shape)


@dataclass(frozen=True)
class Part:
    key: int            # the part's id on the wire
    param: int          # index of its parameter in the layout's list
    offset: int         # first element of the part in the flattened parameter
    length: int         # elements
    server: int         # the server that owns it


class Layout:
    """The parameter list, its parts and their servers. `limit`: the largest part, in elements (None: automatic)."""

    def __init__(self, params, num_servers, limit=None):
        if num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {num_servers}")
        self.params = tuple(params)
        if not self.params:
            raise ValueError("a layout needs at least one parameter")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        self.num_servers = int(num_servers)
        total = sum(p.size for p in self.params)
        if limit is None:
            limit = total if num_servers == 1 else max(1, -(-total // (4 * num_servers)))
        self.limit = int(limit)
        self.parts = _assign(_cut(self.params, self.limit), num_servers)
        self._by_server = [[p for p in self.parts if p.server == s] for s in range(num_servers)]
        self.fingerprint = self._fingerprint()

    @classmethod
    def from_named_arrays(cls, named, num_servers, limit=None):
        """From (name, array or Tensor) pairs, e.g. model.named_parameters()."""
        specs = []
        for name, value in named:
            data = value if isinstance(value, np.ndarray) else value.data
            specs.append(ParamSpec(name, tuple(data.shape), np.dtype(data.dtype).str))
        return cls(specs, num_servers, limit)

    def parts_of(self, server):
        return self._by_server[server]

    def loads(self):
        """Elements held by each server."""
        return [sum(p.length for p in parts) for parts in self._by_server]

    @property
    def total(self):
        return sum(p.size for p in self.params)

    def dtype_of(self, part):
        return self.params[part.param].dtype

    def _fingerprint(self):
        data = [LAYOUT_VERSION, self.num_servers,
                [[p.name, list(p.shape), p.dtype] for p in self.params],
                [[q.key, q.param, q.offset, q.length, q.server] for q in self.parts]]
        return hashlib.sha256(msgpack.packb(data)).hexdigest()

    def __repr__(self):
        return (f"Layout({len(self.params)} params, {self.total:,} elements, {len(self.parts)} parts on "
                f"{self.num_servers} servers, loads {self.loads()})")


def _cut(params, limit):
    pieces = []                        # (param index, offset, length) in key order
    for i, p in enumerate(params):
        n = p.size
        count = max(1, -(-n // limit))
        base, extra = divmod(n, count)
        offset = 0
        for j in range(count):
            length = base + (1 if j < extra else 0)
            pieces.append((i, offset, length))
            offset += length
    return pieces


def _assign(pieces, num_servers):
    order = sorted(range(len(pieces)), key=lambda k: (-pieces[k][2], k))
    heap = [(0, s) for s in range(num_servers)]          # (load, server): least loaded, then lowest index
    server_of = [0] * len(pieces)
    for k in order:
        load, s = heapq.heappop(heap)
        server_of[k] = s
        heapq.heappush(heap, (load + pieces[k][2], s))
    return tuple(Part(k, i, off, n, server_of[k]) for k, (i, off, n) in enumerate(pieces))
