"""openpi's msgpack encoding of NumPy data: round trips, byte-exact format, refusals."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from policies.remote import WireError, observation_payload, packb, unpackb


@pytest.mark.parametrize(
    "dtype", ["|u1", "|b1", "<i2", ">i4", "<i8", "<u4", "<f2", "<f4", ">f4", "<f8", ">f8", "|S5", "<U3"]
)
def test_arrays_round_trip_with_dtype_and_byte_order(dtype: str) -> None:
    rng = np.random.default_rng(0)
    if dtype[1] in "SU":
        array = np.array([["ab", "cde"], ["f", ""]], dtype=dtype)
    else:
        array = (rng.normal(size=(2, 3, 4)) * 50).astype(dtype)
    out = unpackb(packb({"x": array}))["x"]
    assert out.dtype == np.dtype(dtype) and out.dtype.str == dtype  # byte order kept, not normalised
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_non_contiguous_empty_and_zero_dim_arrays() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for array in (base[:, ::2], base.T, np.zeros((0, 7), np.float32), np.array(3.5, np.float64)):
        out = unpackb(packb(array))
        assert out.shape == array.shape and out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_scalars_nested_containers_and_plain_values() -> None:
    message = {
        "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(200)],
        "nested": {"a": [np.ones(2, np.int16), {"b": np.zeros((1, 1), np.float64)}]},
        "text": "hi", "n": 3, "f": 0.25, "none": None, "raw": b"\x00\x01",
    }  # fmt: skip
    out = unpackb(packb(message))
    assert [type(s) for s in out["scalars"]] == [np.float32, np.int64, np.bool_, np.uint8]
    assert out["scalars"] == [1.5, -3, True, 200]
    np.testing.assert_array_equal(out["nested"]["a"][0], np.ones(2, np.int16))
    assert out["nested"]["a"][1]["b"].shape == (1, 1)
    assert (out["text"], out["n"], out["f"], out["none"], out["raw"]) == ("hi", 3, 0.25, None, b"\x00\x01")


def test_encoding_is_openpis_byte_for_byte() -> None:
    """{"a": uint16 [1, 2]} as openpi-client's msgpack_numpy writes it, built by hand from the msgpack spec."""
    expected = (
        b"\x81"  # map of 1
        b"\xa1a"  # str "a"
        b"\x84"  # map of 4, in openpi's key order: __ndarray__, data, dtype, shape
        b"\xc4\x0b__ndarray__" b"\xc3"  # bin key, True
        b"\xc4\x04data" b"\xc4\x04\x01\x00\x02\x00"  # bin key, bin little-endian bytes
        b"\xc4\x05dtype" b"\xa3<u2"  # bin key, str dtype.str
        b"\xc4\x05shape" b"\x91\x02"  # bin key, array [2]
    )  # fmt: skip
    assert packb({"a": np.array([1, 2], dtype="<u2")}) == expected
    scalar = b"\x83\xc4\x0d__npgeneric__\xc3\xc4\x04data\x07\xc4\x05dtype\xa3<i8"
    assert packb(np.int64(7)) == scalar
    # and what openpi writes, we read
    np.testing.assert_array_equal(unpackb(expected)["a"], [1, 2])
    assert unpackb(scalar) == 7 and isinstance(unpackb(scalar), np.int64)


@pytest.mark.parametrize(
    "value", [np.array([object()], dtype=object), np.zeros(2, np.complex64), np.zeros(2, "V4"),
              np.zeros(1, [("a", "<f4")]), np.array(["2020-01-01"], "datetime64[D]")],
)  # fmt: skip
def test_refused_dtypes_are_not_encoded(value: np.ndarray) -> None:
    with pytest.raises(WireError, match="cannot cross the wire"):
        packb({"x": value})


def _array_map(dtype: object, shape: object, data: object) -> bytes:
    return msgpack.packb({b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape})


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (_array_map("|O", [1], b"\x00" * 8), "cannot cross the wire"),  # raw pointers: never
        (_array_map("<c8", [1], b"\x00" * 8), "cannot cross the wire"),
        (_array_map("|V8", [1], b"\x00" * 8), "cannot cross the wire"),
        (_array_map("nonsense", [1], b"\x00"), "bad dtype"),
        (_array_map(5, [1], b"\x00"), "bad dtype"),
        (_array_map("<f4", [3], b"\x00" * 8), "does not match"),  # too short
        (_array_map("<f4", [1], b"\x00" * 8), "does not match"),  # too long
        (_array_map("<f4", [-1], b""), "bad array shape"),
        (_array_map("<f4", "12", b""), "bad array shape"),
        (_array_map("<f4", [1], "text"), "does not match"),
        (msgpack.packb({b"__npgeneric__": True, b"data": "x", b"dtype": "<f4"}), "not a valid message"),
        (b"\xc1garbage", "not a valid message"),
        (b"\x92\x01", "not a valid message"),  # truncated
        (packb(1) + b"\x00", "not a valid message"),  # extra data
    ],
)
def test_malformed_messages_raise_wire_errors(message: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        unpackb(message)


def test_decoded_arrays_are_read_only_views() -> None:
    out = unpackb(packb(np.arange(4, dtype=np.int32)))
    assert not out.flags.writeable  # the policy must not write into a request's buffer


def test_the_payload_keeps_the_observation_keys_only() -> None:
    obs = {"image_primary": [[[1, 2, 3]]], "state": np.zeros(7), "instruction": "go", "privileged": {"x": object()},
           "image_wrist": None}  # fmt: skip
    payload = observation_payload(obs)
    assert set(payload) == {"image_primary", "state", "instruction"}
    assert isinstance(payload["image_primary"], np.ndarray)
