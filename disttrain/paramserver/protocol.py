"""The wire protocol between workers and parameter servers: ZMQ multipart messages.

    frame 0        a msgpack map, the header: {"v": 1, "op": "push", "seq": 7, "worker": 2, "clock": 41,
                   "keys": [0, 3], "dtypes": ["<f4", "<f4"], "shapes": [[4096], [1200]], ...}
    frames 1..n    one raw array per key, in the order of "keys": C-order bytes, little-endian, exactly
                   prod(shape) * itemsize long; sent with copy=False, read back with np.frombuffer (no copies)

Requests (worker -> server; a DEALER talks to the server's ROUTER, which prepends the connection identity):
    join       worker, clock, fingerprint [, observer, epoch]    -> joined  (the worker's clock on this server,
               the clock of its latest push the server's state holds: last_push, and the server's update count)
    leave      worker                                            -> ok
    heartbeat  worker                                            -> ok
    pull       worker, clock [, keys, versions, ahead]           -> params  (+ one frame per key)
    push       worker, clock, keys, dtypes, shapes [, epoch, pull, ahead, no_grad] + frames -> ok, or params
               when pull is true. ahead: the parameters read are for the step after next (the worker overlaps a
               push with its next step's compute), so ssp answers the read as one made a clock later. no_grad:
               the keys this push holds no gradient for (a frozen or unused parameter): no frame, and the
               optimizer leaves them alone, as a local step leaves a parameter whose .grad is None.
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

NOTE (bounds): nothing a peer sends is walked recursively. Headers nest at most MAX_DEPTH levels (checked with
an explicit stack before any field is read), error messages show values through `show`, which formats
without recursion and stops after a few dozen characters, and a shape's element count is bounded step by step
(zero dimensions counted as one), so neither a deep header nor a shape like [2**31, 2**31, 0] can raise
anything but ProtocolError. `receive` reads a message frame by frame and drops the rest of one with too many
frames or bytes as it reads them: both directions (servers and workers) read through it.
"""
import math

import msgpack
import numpy as np
import zmq

__all__ = ["PROTOCOL_VERSION", "DTYPES", "ProtocolError", "encode", "decode_request", "decode_reply",
           "request", "reply", "error_reply", "peek_seq", "receive", "check_shape", "check_clock", "check_worker",
           "check_depth", "array_nbytes", "show", "MAX_HEADER_BYTES", "MAX_KEYS", "MAX_ARRAY_BYTES", "MAX_DEPTH",
           "MAX_WORKER_ID", "MAX_CLOCK", "FRAME_SLACK", "REQUEST_OPS", "REPLY_OPS"]

PROTOCOL_VERSION = 1
DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}   # wire name -> dtype; nothing else is accepted
MAX_HEADER_BYTES = 1 << 20        # 1 MiB of msgpack is room for ~50,000 keys
MAX_KEYS = 1 << 16
MAX_NDIM = 8
MAX_DEPTH = 8                     # nesting of maps and lists in a header (a stats reply needs 4)
MAX_ARRAY_BYTES = 1 << 32         # 4 GiB per frame; servers lower this to their largest part (zmq MAXMSGSIZE)
FRAME_SLACK = 1024                # bytes allowed on top of what a message's arrays and header may hold
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
            raise ProtocolError("bad_field", f"{name} must be an int in [0, {limit}], got {show(value)}")
        return value
    return check


def _bool(value, name):
    if not isinstance(value, bool):
        raise ProtocolError("bad_field", f"{name} must be a bool, got {show(value)}")
    return value


def _text(limit=MAX_TEXT):
    def check(value, name):
        if not isinstance(value, str) or len(value) > limit:
            raise ProtocolError("bad_field", f"{name} must be a string of at most {limit} characters, "
                                             f"got {show(value)}")
        return value
    return check


def _float(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("bad_field", f"{name} must be a finite number, got {show(value)}")
    return float(value)


def _list(item, limit=MAX_KEYS):
    def check(value, name):
        if not isinstance(value, list) or len(value) > limit:
            raise ProtocolError("bad_field", f"{name} must be a list of at most {limit} items, got {show(value)}")
        return [item(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return check


def _dtype(value, name):
    if not isinstance(value, str) or value not in DTYPES:
        raise ProtocolError("bad_dtype", f"{name} must be one of {sorted(DTYPES)}, got {show(value)}")
    return value


def check_shape(value, name):
    """`value` if it is a list of at most MAX_NDIM ints in [0, MAX_ARRAY_BYTES] (a shape), else ProtocolError."""
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise ProtocolError("bad_shape", f"{name} must be a list of at most {MAX_NDIM} sizes, got {show(value)}")
    for i, n in enumerate(value):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_ARRAY_BYTES:
            raise ProtocolError("bad_shape", f"{name}[{i}] must be an int in [0, {MAX_ARRAY_BYTES}], "
                                             f"got {show(n)}")
    return value


def array_nbytes(shape, itemsize, limit=MAX_ARRAY_BYTES):
    """Bytes of an array of `shape` (checked by check_shape), or None when it could exceed `limit`.

    The bound multiplies the dimensions with zeros counted as one, and stops as soon as it passes `limit`:
    NumPy refuses a shape whose non-zero dimensions overflow even when another one is 0 (so [2**31, 2**31, 0]
    holds no element and still cannot be built), and no product grows past the limit times one dimension.
    """
    bound = itemsize
    for n in shape:
        bound *= max(n, 1)
        if bound > limit:
            return None
    return math.prod(shape) * itemsize


def _fingerprint(value, name):
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ProtocolError("bad_field", f"{name} must be 64 lowercase hex digits, got {show(value)}")
    return value


def _any(value, name):
    return value


_ID, _CLOCK, _SEQ = _uint(MAX_WORKER_ID), _uint(MAX_CLOCK), _uint(MAX_SEQ)
check_clock, check_worker = _CLOCK, _ID         # for other readers of these fields (snapshots)
_KEYS = _list(_uint(MAX_KEYS - 1))
_VERSIONS = _list(_uint(MAX_CLOCK))
_DTYPES = _list(_dtype)
_SHAPES = _list(check_shape)

# op -> (required fields, optional fields, carries arrays); "v", "op" and "seq" are required everywhere
REQUEST_OPS = {
    "join": ({"worker": _ID, "clock": _CLOCK, "fingerprint": _fingerprint},
             {"observer": _bool, "epoch": _CLOCK}, False),
    "leave": ({"worker": _ID}, {}, False),
    "heartbeat": ({"worker": _ID}, {}, False),
    "pull": ({"worker": _ID, "clock": _CLOCK}, {"keys": _KEYS, "versions": _VERSIONS, "ahead": _bool}, False),
    "push": ({"worker": _ID, "clock": _CLOCK, "keys": _KEYS, "dtypes": _DTYPES, "shapes": _SHAPES},
             {"epoch": _CLOCK, "pull": _bool, "ahead": _bool, "no_grad": _KEYS}, True),
    "stats": ({}, {}, False),
}
_SERVER = {"incarnation": _SEQ}
REPLY_OPS = {
    "joined": ({**_SERVER, "worker": _ID, "clock": _CLOCK, "server": _uint(MAX_KEYS), "mode": _text(16),
                "staleness": _CLOCK}, {"last_push": _CLOCK, "updates": _CLOCK}, False),
    "ok": ({**_SERVER}, {"clock": _CLOCK, "lr": _float, "min_clock": _CLOCK}, False),
    "params": ({**_SERVER, "keys": _KEYS, "dtypes": _DTYPES, "shapes": _SHAPES, "versions": _VERSIONS,
                "clock": _CLOCK}, {"lr": _float, "updates": _CLOCK}, True),
    "stats": ({**_SERVER, "stats": _any}, {}, False),
    "error": ({**_SERVER, "code": _text(64), "message": _text()}, {}, False),
}


class _Piece(str):
    """Literal text inside show()'s output (brackets, separators), as opposed to a value to format."""


def _pieces(opening, items, closing, pairs):
    yield _Piece(opening)
    for i, item in enumerate(items):
        if i:
            yield _Piece(", ")
        if pairs:
            yield item[0]
            yield _Piece(": ")
            yield item[1]
        else:
            yield item
    yield _Piece(closing)


_END = object()


def show(value, limit=60):
    """repr-like text of `value`, cut after `limit` characters ("..." appended).

    Built with an explicit stack of generators: no recursion however deep the value nests, and no more work
    than the first `limit` characters need (a list of 65,536 items is not walked to show its first ten).
    """
    out, size = [], 0
    stack = [iter((value,))]
    while stack and size <= limit:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        if isinstance(item, _Piece):
            text = item
        elif isinstance(item, (list, tuple)):
            stack.append(_pieces("[", item, "]", pairs=False))
            continue
        elif isinstance(item, dict):
            stack.append(_pieces("{", item.items(), "}", pairs=True))
            continue
        else:
            text = _scalar_repr(item, limit)
        out.append(text)
        size += len(text)
    text = "".join(out)
    return text if size <= limit and not stack else text[:limit] + "..."


def _scalar_repr(value, limit):
    if isinstance(value, (str, bytes)):
        value = value[:limit + 1]                  # repr of the part shown only, however long the string
    elif isinstance(value, int) and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    return repr(value)[:limit + 1]


def check_depth(value, limit=MAX_DEPTH, code="too_deep"):
    """Raise ProtocolError(code) when maps and lists in `value` nest more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ProtocolError(code, f"maps and lists nest more than {limit} levels deep")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))


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
    check_depth(header)
    if header.get("v") != PROTOCOL_VERSION or isinstance(header.get("v"), bool):
        raise ProtocolError("bad_version", f"protocol version must be {PROTOCOL_VERSION}, got {show(header.get('v'))}")
    op = header.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ProtocolError("unknown_op", f"op must be one of {sorted(ops)}, got {show(op)}")
    required, optional, carries_arrays = ops[op]
    out = {"v": PROTOCOL_VERSION, "op": op}
    unknown = [k for k in header if k not in required and k not in optional and k not in ("v", "op", "seq")]
    if unknown:
        raise ProtocolError("unknown_field", f"{op}: unknown field(s) {show(unknown)}; allowed: "
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
    if "no_grad" in out and len(set(out["no_grad"]) | set(out["keys"])) != len(out["no_grad"]) + len(out["keys"]):
        raise ProtocolError("bad_key", f"{op}: a key of no_grad is listed twice, or also in keys")
    return out, arrays


def _unpack(data):
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=MAX_TEXT, max_bin_len=0, max_ext_len=0, max_array_len=MAX_KEYS,
                               max_map_len=1024)
    except Exception as exc:     # msgpack raises many kinds (ExtraData, FormatError, ValueError, ...) on bad bytes
        raise ProtocolError("malformed", f"header is not valid msgpack ({type(exc).__name__}: {show(str(exc))})") \
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
        declared = array_nbytes(shape, dt.itemsize)
        if declared is None:
            raise ProtocolError("too_large", f"array {i}: shape {show(shape)} of {dtype} may hold more than "
                                             f"{MAX_ARRAY_BYTES} bytes")
        buf = _frame_bytes(frame)
        if len(buf) != declared:
            raise ProtocolError("bad_shape", f"array {i}: shape {show(shape)} of {dtype} is {declared} bytes, "
                                             f"the frame has {len(buf)}")
        arrays.append(np.frombuffer(buf, dtype=dt, count=declared // dt.itemsize).reshape(shape))
    return arrays


# ------------------------------------------------------------------------------------------------ receiving

def receive(socket, max_frames, max_bytes, flags=0):
    """One multipart message from a zmq socket: (frames, None), or (its first two frames, ProtocolError) when it
    has more than `max_frames` frames or `max_bytes` bytes; raises zmq.Again when flags=NOBLOCK finds none.

    Frames are read one at a time (copy=False): those beyond a limit are dropped as they are read, so an
    oversized message costs this process one frame at a time, never the whole list. The two frames kept are
    enough to answer: a ROUTER's routing id and the header (for its seq).
    NOTE: libzmq delivers whole messages only, so it has held the message before the first frame is read;
    what it may hold per message is bounded only per frame (MAXMSGSIZE). docs/PARAMSERVER.md, "Threat model".
    """
    frame = socket.recv(flags, copy=False)
    frames, count, total = [frame], 1, len(frame)
    while frame.more:
        frame = socket.recv(copy=False)          # the rest of the message is already here
        count += 1
        total += len(frame)
        if count <= 2 or (count <= max_frames and total <= max_bytes):
            frames.append(frame)
        elif len(frames) > 2:
            del frames[2:]
    if count > max_frames or total > max_bytes:
        return frames, ProtocolError("too_large", f"message of {count} frames and {total} bytes; at most "
                                                  f"{max_frames} frames and {max_bytes} bytes are accepted")
    return frames, None
