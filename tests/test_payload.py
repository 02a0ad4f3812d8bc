"""Payload packing: exact round trip, honest sizes, and clear ValueErrors on damaged bytes."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osfed_hpc.payload import Payload, require


def _sample() -> Payload:
    return Payload(
        meta={"algorithm": "osfed", "round": 3, "client": 7, "factor": 2, "debug": False, "scale": 0.5},
        arrays={
            "snapshot": np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4),
            "labels": np.ones((8, 10), dtype=np.float32),
            "scale": np.array([-0.25], dtype=np.float32),
            "coded": np.arange(13, dtype=np.uint8),
        },
    )


def test_round_trip_is_exact():
    payload = _sample()
    back = Payload.unpack(payload.pack())
    assert back.meta == payload.meta
    assert list(back.arrays) == list(payload.arrays)
    for name, array in payload.arrays.items():
        assert back.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(back.arrays[name], array)


def test_size_is_arrays_plus_small_header():
    payload = _sample()
    data_bytes = sum(a.nbytes for a in payload.arrays.values())
    assert data_bytes < payload.nbytes <= data_bytes + 512


def test_unpack_does_not_copy_arrays():
    buffer = bytearray(_sample().pack())
    back = Payload.unpack(buffer)
    assert np.shares_memory(back.arrays["snapshot"], np.frombuffer(buffer, dtype=np.uint8))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:10], "too short|does not fit"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + struct.pack("<H", 99) + b[6:], "version"),
        (lambda b: b[:-1], "past the end"),
        (lambda b: b + b"\0", "trailing"),
        (lambda b: b[:8] + struct.pack("<I", 2**31) + b[12:], "header length"),
    ],
)
def test_damaged_buffers_raise_value_error(mutate, message):
    with pytest.raises(ValueError, match=message):
        Payload.unpack(mutate(_sample().pack()))


def test_require_names_context_and_array():
    payload = _sample()
    with pytest.raises(ValueError, match=r"client 7, round 3: payload array 'scale'"):
        require(payload, {"snapshot": ("float32", (2, 1, 4, 4)), "labels": ("float32", (8, 10)),
                          "scale": ("float32", (2,)), "coded": ("uint8", (13,))}, "client 7, round 3")


def test_pickle_like_objects_are_refused():
    with pytest.raises(TypeError):
        Payload(arrays={"x": np.array([object()], dtype=object)}).pack()
    with pytest.raises(TypeError):
        Payload(meta={"x": [1, 2]}).pack()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzzed_bytes_only_raise_value_error(data):
    try:
        Payload.unpack(data)
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8))
def test_fuzzed_corruption_of_a_real_payload(position, junk):
    packed = bytearray(_sample().pack())
    position %= len(packed)
    packed[position : position + len(junk)] = junk
    try:
        back = Payload.unpack(bytes(packed))
    except ValueError:
        return
    assert isinstance(back, Payload)


def test_pack_into_a_reused_buffer_gives_the_same_bytes():
    payload = _sample()
    buffer = bytearray(b"\xff" * (payload.packed_size() + 100))
    written = payload.pack_into(buffer)
    assert written == payload.packed_size() == len(payload.pack())
    assert bytes(buffer[:written]) == payload.pack()  # padding zeroed, no stale bytes
    with pytest.raises(ValueError, match="too small"):
        payload.pack_into(bytearray(10))
