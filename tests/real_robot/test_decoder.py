"""The restricted decoder: what it admits, what it refuses, and a fuzz run over >= 10,000 inputs."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lz4.frame
import numpy as np
import pytest

from real_robot import protocol
from real_robot.protocol import ProtocolError, decode, encode


def _compress(raw: bytes) -> bytes:
    return lz4.frame.compress(raw)


def _sample_messages() -> list[object]:
    """Messages of every shape the protocol carries (requests and replies)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    return [
        protocol.hash_request(),
        protocol.hash_reply(5556),
        protocol.obs_request(),
        protocol.invalid_reply(),
        {"status": 1},
        protocol.act_request("step_action", {"action": rng.normal(size=7), "blocking": False}),
        protocol.act_request("move", {"pose": np.eye(4), "duration": 1.0, "blocking": True}),
        protocol.act_request("init", {"env_params": protocol.DEFAULT_ENV_PARAMS, "image_size": 256}),
        {"image": protocol.images_to_wire(images), "state": rng.normal(size=7), "full_image": b"\xff\xd8jpeg"},
        {"image": images[0], "state": {}, "full_image": images[0]},  # the service's dummy before init
    ]


def _admitted_only(obj: object, depth: int = 0) -> bool:
    """True if `obj` holds only types the decoder is allowed to return."""
    assert depth < 64
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind in "biufcSU" and not obj.dtype.hasobject
    if isinstance(obj, (np.generic, np.dtype, str, bytes, bytearray, int, float, complex, bool, type(None))):
        return True
    if type(obj) is dict:
        return all(_admitted_only(k, depth + 1) and _admitted_only(v, depth + 1) for k, v in obj.items())
    if type(obj) in (list, tuple, set, frozenset):
        return all(_admitted_only(v, depth + 1) for v in obj)
    return False


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("pickle_protocol", [2, 3, 4, 5])
def test_round_trip_of_every_message_kind(pickle_protocol: int) -> None:
    for message in _sample_messages():
        data = _compress(pickle.dumps(message, protocol=pickle_protocol))
        assert _equal(decode(data), message), message


def test_numpy_variants_are_rebuilt_exactly() -> None:
    fortran = np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4))
    values = [
        fortran,
        np.array(["ab", "c"], dtype="U3"),
        np.array([b"x"], dtype="S2"),
        np.array(True),
        np.zeros((0, 3), np.float32),
        np.float64(1.5),
        np.int8(-3),
        np.dtype("<f8"),
        np.complex64(1 + 2j),
    ]
    for protocol_version in (2, 4, 5):
        got = decode(_compress(pickle.dumps(values, protocol=protocol_version)))
        for want, have in zip(values, got, strict=True):
            assert type(have) is type(want) and (have.dtype if hasattr(have, "dtype") else have) == (
                want.dtype if hasattr(want, "dtype") else want
            )
            np.testing.assert_array_equal(have, want)
    arr = decode(encode({"a": fortran}))["a"]
    assert arr.flags.writeable and arr.dtype == np.dtype(">i4")


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('os').system('true')",))


def test_malicious_pickles_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = [
        pickle.dumps({"status": _Evil(f"touch {marker}")}),
        pickle.dumps([_CallsEval()]),
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",  # protocol 0 GLOBAL + REDUCE
        b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93\x8c\x04pass\x85R.",  # STACK_GLOBAL builtins.exec
        pickle.dumps(io.BytesIO(b"x")),  # any other class instance
        pickle.dumps(np.array([object()], dtype=object)[:0]),  # object arrays
        pickle.dumps(np.dtype([("a", "f4")])),  # structured dtypes
        pickle.dumps(np.datetime64("2020-01-01")),
    ]
    for raw in evil:
        with pytest.raises(ProtocolError):
            decode(_compress(raw))
    assert not marker.exists()
    with pytest.raises(ProtocolError, match=r"forbidden global (posix|os)\.system"):
        decode(_compress(evil[0]))


def test_malicious_pickle_does_not_run_in_a_fresh_process(tmp_path: Path) -> None:
    """The same check where nothing is imported beforehand (a pickle could import modules)."""
    marker = tmp_path / "pwned"
    data = _compress(pickle.dumps(_Evil(f"touch {marker}")))
    code = (
        "import sys\nfrom real_robot.protocol import decode, ProtocolError\n"
        "try:\n    decode(sys.stdin.buffer.read())\nexcept ProtocolError as e:\n    print('refused', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith(b"refused"), out.stderr
    assert not marker.exists()


def test_resource_bombs_are_refused() -> None:
    bombs = [
        b"\x80\x04r\xff\xff\xff\x7fN.",  # LONG_BINPUT at index 2**31 - 1: a huge memo table
        b"\x80\x04N",  # no STOP
        b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.",  # BINBYTES8 claiming 2**63 bytes
        pickle.dumps(_nested(100)),  # nesting deeper than MAX_DEPTH
        b"\x80\x04N." + b"junk",  # bytes after STOP
    ]
    for raw in bombs:
        with pytest.raises(ProtocolError):
            decode(_compress(raw))
    recursive: list = []
    recursive.append(recursive)
    with pytest.raises(ProtocolError, match="recursive"):
        decode(_compress(pickle.dumps(recursive)))
    with pytest.raises(ProtocolError, match="larger than"):
        decode(encode(b"\0" * 5000), max_bytes=4096)
    with pytest.raises(ProtocolError, match="opcodes"):
        decode(_compress(pickle.dumps(list(range(protocol.MAX_PICKLE_OPCODES + 10)), protocol=0)))
    shared = [0]
    for _ in range(30):  # a DAG with 2**30 paths: must resolve in linear time
        shared = [shared, shared]
    assert decode(encode(shared))[0] is not None


def _nested(depth: int) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


def test_lz4_framing_errors() -> None:
    good = encode({"status": 1})
    for bad in (good[:-3], good + b"extra", b"", b"\x04\x22\x4d\x18garbage", "not bytes"):
        with pytest.raises(ProtocolError):
            decode(bad)


def _mutations(rng: np.random.Generator, raw: bytes) -> bytes:
    """One random mutation of `raw`: flip, insert, delete, splice, truncate or duplicate a slice."""
    data = bytearray(raw)
    kind = rng.integers(0, 6)
    pos = int(rng.integers(0, max(len(data), 1)))
    if kind == 0 and data:
        data[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8).tobytes()
    elif kind == 2:
        del data[pos : pos + int(rng.integers(1, 8))]
    elif kind == 3:  # splice in an opcode sequence that names a forbidden global
        data[pos:pos] = rng.choice([b"cos\nsystem\n", b"\x8c\x02os\x8c\x06system\x93", b"R", b"b", b"\x81"])
    elif kind == 4:
        data = data[:pos]
    else:
        data[pos:pos] = data[pos : pos + int(rng.integers(1, 32))]
    return bytes(data)


def test_fuzz_decoder_never_crashes_nor_admits_other_types() -> None:
    """>= 10,000 random and mutated inputs: each decodes to admitted types or raises ProtocolError."""
    rng = np.random.default_rng(1234)
    seeds = [pickle.dumps(m, protocol=p) for m in _sample_messages() for p in (2, 4, 5)]
    outcomes = {"refused": 0, "decoded": 0}
    inputs = 0
    for i in range(12_000):
        if i % 6 == 0:  # random bytes, raw or inside a valid lz4 frame
            blob = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
            data = blob if i % 12 == 0 else _compress(blob)
        elif i % 6 == 1:  # a valid message with its compressed bytes mutated
            data = _mutations(rng, _compress(seeds[i % len(seeds)]))
        else:  # a valid pickle mutated (one to three times), then framed correctly
            raw = seeds[int(rng.integers(0, len(seeds)))]
            for _ in range(int(rng.integers(1, 4))):
                raw = _mutations(rng, raw)
            data = _compress(raw)
        inputs += 1
        try:
            result = decode(data)
        except ProtocolError:
            outcomes["refused"] += 1
            continue
        assert _admitted_only(result), (i, type(result))
        outcomes["decoded"] += 1
    assert inputs >= 10_000
    assert outcomes["refused"] > 5_000 and outcomes["decoded"] > 100, outcomes  # both paths exercised


def test_admitted_globals_cannot_be_altered_or_leaked() -> None:
    """BUILD (state / slot state) on an admitted global is refused, and none can be returned bare."""
    factory = protocol._ADMITTED[("numpy", "dtype")]
    attacks = {
        "state": b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93}\x8c\x03_fn\x8c\x01xsb.",
        "slot state": b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93N}\x8c\x03_fn\x8c\x01xs\x86b.",
        "call ndarray": b"\x80\x04\x8c\x05numpy\x8c\x07ndarray\x93K\x05\x85R.",
        "bare global": b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93.",
        "dtype built twice": pickle.dumps(np.dtype("f4"))[:-1]
        + b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
    }
    for name, raw in attacks.items():
        with pytest.raises(ProtocolError):
            decode(_compress(raw))
            pytest.fail(name)
    assert factory._fn is protocol._make_dtype
    assert decode(encode(np.dtype("f4"))) == np.dtype("f4")  # still works afterwards
