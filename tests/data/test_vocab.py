import json

import numpy as np
import pytest

from disttrain.data import EOS, Vocabulary


def test_order_is_frequency_desc_then_token():
    vocab = Vocabulary.build("b a c a b d a".split())
    assert vocab.tokens == ["a", "b", "c", "d"]  # a:3, b:2, then c and d tied at 1 -> by token


def test_specials_come_first_even_when_absent():
    vocab = Vocabulary.build(["x", "y", "y"], specials=(EOS,))
    assert vocab.tokens == [EOS, "y", "x"]
    assert vocab.eos_id == 0


def test_build_is_independent_of_stream_order():
    tokens = "the cat sat on the mat and the dog sat".split()
    assert Vocabulary.build(tokens) == Vocabulary.build(tokens[::-1])


def test_encode_decode_roundtrip():
    tokens = "a b c a".split()
    vocab = Vocabulary.build(tokens)
    ids = vocab.encode(tokens)
    assert ids.dtype == np.int64 and ids.shape == (4,)
    assert vocab.decode(ids) == tokens
    assert vocab.decode(ids.reshape(2, 2)) == tokens


def test_unknown_token_is_an_error_without_unk():
    vocab = Vocabulary.build(["a"])
    with pytest.raises(KeyError, match="'zzz'"):
        vocab.encode(["a", "zzz"])


def test_unknown_token_maps_to_unk():
    vocab = Vocabulary.build(["a", "a", "b"], unk="<unk>", max_size=2)
    assert vocab.tokens == ["<unk>", "a"]
    assert vocab.decode(vocab.encode(["a", "b", "q"])) == ["a", "<unk>", "<unk>"]


def test_max_size_without_unk_is_rejected():
    with pytest.raises(ValueError, match="unk"):
        Vocabulary.build(["a", "b", "c"], max_size=2)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        Vocabulary(["a", "b"]).decode([0, 2])


def test_duplicate_tokens_are_rejected():
    with pytest.raises(ValueError, match="duplicated"):
        Vocabulary(["a", "b", "a"])


def test_dict_roundtrip_through_json():
    vocab = Vocabulary.build("x y z y".split(), specials=(EOS,), unk="<unk>")
    restored = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab
    assert restored.unk == "<unk>"


def test_from_dict_rejects_garbage():
    with pytest.raises(ValueError, match="tokens"):
        Vocabulary.from_dict({"words": []})
