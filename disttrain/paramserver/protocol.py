"""The wire protocol between workers and parameter servers: ZMQ multipart messages.

    frame 0        a msgpack map, the header: {"v": 1, "op": "push", "seq": 7, "worker": 2, "clock": 41,
                   "keys": [0, 3], "dtypes": ["<f4", "<f4"], "shapes": [[4096], [1200]], ...}
    frames 1..n    one raw array per key, in the order of "keys": C-order bytes, little-endian, exactly
                   prod(shape) * itemsize long; sent with copy=False, read back with np.frombuffer (no copies)

Requests (worker -> server; a DEALER talks to the server's ROUTER, which prepends the connection identity):
    join       worker, clock, fingerprint [, observer, epoch]    -> joined  (the worker's clock on this server)
    leave      worker                                            -> ok
    heartbeat  worker                                            -> ok
    pull       worker, clock [, keys, versions, ahead]           -> params  (+ one frame per key)
    push       worker, clock, keys, dtypes, shapes [, epoch, pull, ahead] + frames -> ok, or params when pull
               is true. ahead: the parameters read are for the step after next (the worker overlaps a push
               with its next step's compute), so ssp answers the read as one made a clock later.
    stats      (no worker)                                       -> stats
Every reply echoes the request's "seq" and names the server's "incarnation" (a random id drawn at start-up,
so a client sees when a server restarted); any request can be answered by
    error      code, message   (seq is nil when the header could not be read at all)

NOTE (validation): `decode_request` checks everything that can be checked without the server's state —
header size, msgpack limits, that it is a map with only the fields its op allows, every field's type and
range, that keys are unique, dtypes allowed, shapes sane and each frame's byte length equal to what its
shape and dtype declare — before one array is built. The server then checks what needs its state (keys
it owns, shapes and dtypes equal to its own, the worker's clock, finiteness) before it changes anything.
Every failure is a ProtocolError whose `code` goes back to the sender in an error reply.
Only msgpack's plain types cross the wire (maps, arrays, strings, ints, floats, bools, nil): no ext
types, no binary blobs in headers, no Python objects.
"""
import math

import msgpack
import numpy as np

__all__ = ["PROTOCOL_VERSION", "DTYPES", "ProtocolError", "encode", "decode_request", "decode_reply",
           "request", "reply", "error_reply", "peek_seq", "MAX_HEADER_BYTES", "MAX_KEYS", "MAX_ARRAY_BYTES",
           "MAX_WORKER_ID", "MAX_CLOCK", "REQUEST_OPS", "REPLY_OPS"]

PROTOCOL_VERSION = 1
DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}   # wire name -> dtype; nothing else is accepted
MAX_HEADER_BYTES = 1 << 20        # 1 MiB of msgpack is room for ~50,000 keys
MAX_KEYS = 1 << 16
MAX_NDIM = 8
MAX_ARRAY_BYTES = 1 << 32         # 4 GiB per frame; servers lower this to their largest part (zmq MAXMSGSIZE)
MAX_WORKER_ID = (1 << 16) - 1
MAX_CLOCK = (1 << 53) - 1         # integers a double still holds exactly (clients in other languages)
MAX_SEQ = (1 << 63) - 1
MAX_TEXT = 4096


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is a short machine-readable reason for the error reply."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------- field validators

def _uint(limit):
    def check(value, name):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ProtocolError("bad_field", f"{name} must be an int in [0, {limit}], got {_show(value)}")
        return value
    return check


def _bool(value, name):
    if not isinstance(value, bool):
        raise ProtocolError("bad_field", f"{name} must be a bool, got {_show(value)}")
    return value


def _text(limit=MAX_TEXT):
    def check(value, name):
        if not isinstance(value, str) or len(value) > limit:
            raise ProtocolError("bad_field", f"{name} must be a string of at most {limit} characters, "
                                             f"got {_show(value)}")
        return value
    return check


def _float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("bad_field", f"{name} must be a finite number, got {_show(value)}")
    return float(value)


def _list(item, limit=MAX_KEYS):
    def check(value, name):
        if not isinstance(value, list) or len(value) > limit:
            raise ProtocolError("bad_field", f"{name} must be a list of at most {limit} items, got {_show(value)}")
        return [item(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return check


def _dtype(value, name):
    if not isinstance(value, str) or value not in DTYPES:
        raise ProtocolError("bad_dtype", f"{name} must be one of {sorted(DTYPES)}, got {_show(value)}")
    return value


def _shape(value, name):
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise ProtocolError("bad_shape", f"{name} must be a list of at most {MAX_NDIM} sizes, got {_show(value)}")
    for i, n in enumerate(value):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_ARRAY_BYTES:
            raise ProtocolError("bad_shape", f"{name}[{i}] must be an int in [0, {MAX_ARRAY_BYTES}], "
                                             f"got {_show(n)}")
    return value


def _fingerprint(value, name):
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ProtocolError("bad_field", f"{name} must be 64 lowercase hex digits, got {_show(value)}")
    return value


def _any(value, name):
    return value


_ID, _CLOCK, _SEQ = _uint(MAX_WORKER_ID), _uint(MAX_CLOCK), _uint(MAX_SEQ)
_KEYS = _list(_uint(MAX_KEYS - 1))
_VERSIONS = _list(_uint(MAX_CLOCK))
_DTYPES = _list(_dtype)
_SHAPES = _list(_shape)

# op -> (required fields, optional fields, carries arrays); "v", "op" and "seq" are required everywhere
REQUEST_OPS = {
    "join": ({"worker": _ID, "clock": _CLOCK, "fingerprint": _fingerprint},
             {"observer": _bool, "epoch": _CLOCK}, False),
    "leave": ({"worker": _ID}, {}, False),
    "heartbeat": ({"worker": _ID}, {}, False),
    "pull": ({"worker": _ID, "clock": _CLOCK}, {"keys": _KEYS, "versions": _VERSIONS, "ahead": _bool}, False),
    "push": ({"worker": _ID, "clock": _CLOCK, "keys": _KEYS, "dtypes": _DTYPES, "shapes": _SHAPES},
             {"epoch": _CLOCK, "pull": _bool, "ahead": _bool}, True),
    "stats": ({}, {}, False),
}
_SERVER = {"incarnation": _SEQ}
REPLY_OPS = {
    "joined": ({**_SERVER, "worker": _ID, "clock": _CLOCK, "server": _uint(MAX_KEYS), "mode": _text(16),
                "staleness": _CLOCK}, {}, False),
    "ok": ({**_SERVER}, {"clock": _CLOCK, "lr": _float, "min_clock": _CLOCK}, False),
    "params": ({**_SERVER, "keys": _KEYS, "dtypes": _DTYPES, "shapes": _SHAPES, "versions": _VERSIONS,
                "clock": _CLOCK}, {"lr": _float, "updates": _CLOCK}, True),
    "stats": ({**_SERVER, "stats": _any}, {}, False),
    "error": ({**_SERVER, "code": _text(64), "message": _text()}, {}, False),
}


def _show(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------ encoding

def encode(header, arrays=None):
    """Frames for one message: the packed header, then each array's memory (no copies).

    For a message with arrays (a list, maybe empty), "dtypes" and "shapes" are filled in from the arrays
    themselves, so the header cannot disagree with the frames. Arrays must be C-contiguous, of a dtype in DTYPES.
    """
    arrays = None if arrays is None else list(arrays)
    if arrays is not None:
        header = dict(header)
        header["dtypes"] = [_wire_dtype(a) for a in arrays]
        header["shapes"] = [list(a.shape) for a in arrays]
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}")
    frames = [packed]
    for a in arrays or ():
        if not a.flags.c_contiguous:
            raise ValueError(f"array of shape {a.shape} is not C-contiguous; send np.ascontiguousarray(a)")
        frames.append(a.reshape(-1).view(np.uint8) if a.size else b"")
    return frames


def _wire_dtype(array):
    name = array.dtype.str
    if name not in DTYPES:
        raise ValueError(f"dtype {array.dtype} cannot be sent; allowed: {sorted(DTYPES)}")
    return name


def request(op, seq, **fields):
    return {"v": PROTOCOL_VERSION, "op": op, "seq": seq, **fields}


def reply(op, seq, incarnation, **fields):
    return {"v": PROTOCOL_VERSION, "op": op, "seq": seq, "incarnation": incarnation, **fields}


def error_reply(seq, incarnation, code, message):
    return encode(reply("error", seq, incarnation, code=code, message=str(message)[:MAX_TEXT]))


# ------------------------------------------------------------------------------------------------ decoding

def decode_request(frames):
    """(header, arrays) of a request's frames (bytes or zmq Frames); raises ProtocolError.

    arrays are read-only np.frombuffer views of the frames, reshaped to their declared shapes.
    """
    return _decode(frames, REQUEST_OPS)


def decode_reply(frames):
    """(header, arrays) of a server's reply; raises ProtocolError (a server is checked like anyone else)."""
    return _decode(frames, REPLY_OPS)


def peek_seq(frames):
    """The "seq" of a message if its header can be read at all, else None (for error replies)."""
    try:
        header = _unpack(_frame_bytes(frames[0]))
    except (ProtocolError, IndexError):
        return None
    seq = header.get("seq") if isinstance(header, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ else None


def _decode(frames, ops):
    if not frames:
        raise ProtocolError("malformed", "empty message")
    header = _unpack(_frame_bytes(frames[0]))
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"header must be a msgpack map, got {type(header).__name__}")
    if header.get("v") != PROTOCOL_VERSION or isinstance(header.get("v"), bool):
        raise ProtocolError("bad_version", f"protocol version must be {PROTOCOL_VERSION}, got {_show(header.get('v'))}")
    op = header.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError("unknown_op", f"op must be one of {sorted(ops)}, got {_show(op)}")
    required, optional, carries_arrays = ops[op]
    out = {"v": PROTOCOL_VERSION, "op": op}
    unknown = [k for k in header if k not in required and k not in optional and k not in ("v", "op", "seq")]
    if unknown:
        raise ProtocolError("unknown_field", f"{op}: unknown field(s) {_show(unknown)}; allowed: "
                                             f"{sorted(set(required) | set(optional) | {'v', 'op', 'seq'})}")
    if "seq" not in header:
        raise ProtocolError("missing_field", f"{op}: missing field 'seq'")
    if header["seq"] is None and ops is REPLY_OPS and op == "error":
        out["seq"] = None                    # the error reply to a message whose seq could not be read
    else:
        out["seq"] = _SEQ(header["seq"], "seq")
    for name, check in required.items():
        if name not in header:
            raise ProtocolError("missing_field", f"{op}: missing field {name!r}")
        out[name] = check(header[name], name)
    for name, check in optional.items():
        if name in header:
            out[name] = check(header[name], name)
    arrays = _arrays(out, frames[1:]) if carries_arrays else None
    if not carries_arrays and len(frames) != 1:
        raise ProtocolError("malformed", f"{op} carries no arrays, got {len(frames) - 1} extra frame(s)")
    if "versions" in out and len(out["versions"]) != len(out.get("keys", ())):
        raise ProtocolError("bad_field", f"{op}: {len(out['versions'])} versions for {len(out.get('keys', ()))} keys")
    if "keys" in out and len(set(out["keys"])) != len(out["keys"]):
        raise ProtocolError("bad_key", f"{op}: a key is listed twice")
    return out, arrays


def _unpack(data):
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=MAX_TEXT, max_bin_len=0, max_ext_len=0, max_array_len=MAX_KEYS,
                               max_map_len=1024)
    except Exception as exc:     # msgpack raises many kinds (ExtraData, FormatError, ValueError, ...) on bad bytes
        raise ProtocolError("malformed", f"header is not valid msgpack ({type(exc).__name__}: {_show(str(exc))})") \
            from None


def _frame_bytes(frame):
    """The bytes of a frame without copying: bytes, a zmq.Frame (its .buffer) or any buffer (e.g. an array)."""
    if isinstance(frame, bytes):
        return frame
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _arrays(header, frames):
    keys, dtypes, shapes = header["keys"], header["dtypes"], header["shapes"]
    if not len(keys) == len(dtypes) == len(shapes) == len(frames):
        raise ProtocolError("malformed", f"{len(keys)} keys, {len(dtypes)} dtypes, {len(shapes)} shapes and "
                                         f"{len(frames)} array frames; all four must be equal")
    arrays = []
    for i, (dtype, shape, frame) in enumerate(zip(dtypes, shapes, frames)):
        dt = DTYPES[dtype]
        size = 1
        for n in shape:
            size *= n
        declared = size * dt.itemsize
        if declared > MAX_ARRAY_BYTES:
            raise ProtocolError("too_large", f"array {i} declares {declared} bytes, more than {MAX_ARRAY_BYTES}")
        buf = _frame_bytes(frame)
        if len(buf) != declared:
            raise ProtocolError("bad_shape", f"array {i}: shape {shape} of {dtype} is {declared} bytes, "
                                             f"the frame has {len(buf)}")
        arrays.append(np.frombuffer(buf, dtype=dt, count=size).reshape(shape))
    return arrays
