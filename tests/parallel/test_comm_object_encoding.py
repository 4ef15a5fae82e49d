"""Objects between ranks (allgather_object, gather_object, bcast_object) travel as msgpack, never pickle:
bytes from the network must not run code, and plain data comes back as the types it went as."""
import pickle

import msgpack
import numpy as np
import pytest

from disttrain.parallel import comm

RAN = []


class Exploit:
    def __reduce__(self):
        return (RAN.append, ("ran",))


def test_plain_data_round_trips_with_tuples_and_lists_kept_apart():
    value = {"rows": [("param", "w", (2, 3), "float32", True)], 3: None, "list": [1, [2.5, b"x"]], "n": np.int64(7)}
    assert comm._decode(comm._encode(value)) == {"rows": [("param", "w", (2, 3), "float32", True)], 3: None,
                                                 "list": [1, [2.5, b"x"]], "n": 7}


def test_a_pickle_payload_is_never_unpickled():
    payload = pickle.dumps(Exploit())
    with pytest.raises(Exception):
        comm._decode(payload)
    assert RAN == []


def test_an_unknown_extension_type_is_refused():
    with pytest.raises(ValueError, match="extension type 7"):
        comm._decode(msgpack.packb(msgpack.ExtType(7, b"")))


def test_what_is_not_plain_data_is_refused_by_name():
    with pytest.raises(TypeError, match="Exploit is not plain data"):
        comm._encode([Exploit()])
