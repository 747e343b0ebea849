"""The wire protocol of the WidowX service (rail-berkeley/bridge_data_robot), without ROS or edgeml.

The robot computer runs `widowx_env_service --server` (bridge_data_robot,
`widowx_envs/widowx_envs/widowx_env_service.py`), an `ActionServer` of edgeml (renamed agentlace;
same wire format). Every fact below was read in that public code; the file that states it is named.

Transport (edgeml|agentlace `zmq_wrapper/req_rep.py`): ZMQ REQ (client) / REP (server) on
tcp port 5556; the server also binds a PUB socket on port + 1 that the WidowX service never uses.
Server REP: RCVTIMEO 1500 ms, SNDHWM 5, LINGER 0, single-threaded. Client REQ: RCVTIMEO 800 ms; on
any error the client recreates its socket and reports "no answer" (None).

Framing, both directions (`internal/utils.py` make_compression_method("lz4")):
`lz4.frame.compress(pickle.dumps(message))`. We pickle with protocol 4, the default protocol of
the robot's Python 3.8 (and of 3.8-3.13), so either side reads the other.

Messages (`action.py` ActionServer / ActionClient):
    {"type": "hash"}                          -> {"success": True, "payload": <ActionConfig JSON>}
    {"type": "obs", "keys": set[str]}         -> observation dict (the service ignores `keys`)
    {"type": "act", "key": str, "payload": d} -> {"status": int}  (WidowXStatus)
    anything else                             -> {"success": False, "message": "Invalid payload"}

Handshake (`action.py` ActionClient.__init__): the client compares
`compute_hash(json.dumps(asdict(ActionConfig), separators=(",", ":")))` of its own config with that
of the server's JSON, where `compute_hash(x) = md5(pickle.dumps(x)).hexdigest()`
(`internal/utils.py`). The hash never crosses the wire: only the JSON does.

Observation (`widowx_env_service.py` __observe; `widowx_env.py` BridgeDataRailRLPrivateWidowX):
    image       float32 (ncam, 3*S*S): each camera's RGB frame resized to S x S (skimage, anti-aliased),
                transposed to CHW, flattened, divided by 255
    state       (7,) [x, y, z, roll, pitch, yaw, gripper], metres / radians in `wx250s/base_link`,
                angles relative to DEFAULT_ROTATION, gripper in [0, 1] with 1 = open
    full_image  bytes: camera 0's 480x640 frame, JPEG from cv2.imencode of the *RGB* array. cv2
                takes the array as BGR, so a standard JPEG decoder returns the channels reversed;
                cv2.imdecode (what the reference client uses) returns the RGB array (`decode_full_image`).
Camera frames are RGB because `robot_base_env.py` render() reverses the bgr8 frames of the camera
topics. Before `init`, the service answers obs with a dummy: `image` a uint8 (480, 640, 3) noise
frame, `state` an empty dict.

Not confirmed (no public source found): the numpy version inside the robot's Docker image
(`widowx_envs/requirements.txt` says only numpy>=1.23.4). Our arrays pickle as
`numpy.core.multiarray._reconstruct` because robosteer pins numpy < 2; a numpy 2 client would
write `numpy._core...`, which an older numpy on the robot may fail to load. Whether a REP socket
still delivers requests queued by a REQ peer that has since closed is a ZMQ detail we do not rely
on: a request that timed out may or may not execute, so nothing is ever resent.

Incoming pickles are decoded by a restricted unpickler (`decode`): it admits numpy arrays of plain
numeric/bool/bytes/str dtypes, numpy dtypes and scalars, and plain Python containers and scalars;
any other global is refused before it is looked up, so a pickle from the network never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import pickletools
import re
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import lz4.frame
import numpy as np

from configs.errors import UserError

DEFAULT_PORT = 5556
# WidowXConfigs.DefaultActionConfig (widowx_env_service.py), field order of edgeml's ActionConfig.
ACTION_KEYS = ("init", "move", "gripper", "reset", "step_action", "reboot_motor")
OBSERVATION_KEYS = ("image", "state", "full_image")
CONFIG_VERSION = "0.0.1"
CLIENT_TIMEOUT_MS = 800  # ReqRepClient default
SERVER_RCVTIMEO_MS = 1500  # ReqRepServer.reset
SERVER_SNDHWM = 5  # ReqRepServer.reset
PICKLE_PROTOCOL = 4
FULL_IMAGE_SHAPE = (480, 640, 3)  # IMTopic default width 640, height 480
# The service clips actions to its action_space (robot_base_env.py): +-0.05 m, +-0.25 rad, gripper [0, 1].
SERVICE_ACTION_LOW = (-0.05, -0.05, -0.05, -0.25, -0.25, -0.25, 0.0)
SERVICE_ACTION_HIGH = (0.05, 0.05, 0.05, 0.25, 0.25, 0.25, 1.0)
JOINT_NAMES = (  # reboot_motor's joint names
    "waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate",
    "gripper", "left_finger", "right_finger",
)  # fmt: skip

# WidowXConfigs.DefaultEnvParams (widowx_env_service.py, main branch). `init` sends these; the
# service re-initialises only when they differ from the previous init's (else it only resets).
DEFAULT_ENV_PARAMS: dict[str, Any] = {
    "fix_zangle": 0.1,
    "move_duration": 0.2,
    "adaptive_wait": True,
    "move_to_rand_start_freq": 1,
    # [[x, y, z, zangle, gripper] low, [...] high]; the service clips target xyz to it.
    "override_workspace_boundaries": [[0.1, -0.15, -0.1, -1.57, 0], [0.45, 0.25, 0.18, 1.57, 0]],
    "action_clipping": "xyz",
    "catch_environment_except": False,
    "start_state": [0.3, 0.0, 0.15, 0, 0, 0, 1],  # pose after reset
    "skip_move_to_neutral": False,
    "return_full_image": False,
    "camera_topics": [{"name": "/blue/image_raw"}],
}

# Bounds of what `decode` accepts.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # decompressed; an observation of one 256 px camera is ~0.9 MB
MAX_PICKLE_OPCODES = 100_000  # bounds the number of objects a message can create
MAX_DEPTH = 32  # nesting of containers
MAX_NDIM = 32


class WidowXStatus(IntEnum):
    """Status codes of act replies (widowx_env_service.py WidowXStatus)."""

    NO_CONNECTION = 0  # the client got no (usable) reply
    SUCCESS = 1
    EXECUTION_FAILURE = 2  # unknown action key, move error
    NOT_INITIALIZED = 3  # act before init, or a server started with --test


class ProtocolError(UserError):
    """A message that does not follow the wire protocol: garbage, too large, forbidden pickle content."""


class HandshakeError(UserError):
    """The service runs a different ActionConfig than this client speaks."""


class NotInitializedError(UserError):
    """The service answers, but its robot environment was never initialised (`init`)."""


# ---------------------------------------------------------------------------------------------
# Handshake.


def action_config(port: int = DEFAULT_PORT) -> dict[str, Any]:
    """`asdict(ActionConfig)` of the WidowX service on `port`, keys in dataclass field order."""
    return {
        "port_number": port,
        "action_keys": list(ACTION_KEYS),
        "observation_keys": list(OBSERVATION_KEYS),
        "broadcast_port": port + 1,
        "version": CONFIG_VERSION,
    }


def action_config_json(port: int = DEFAULT_PORT) -> str:
    """The exact JSON string the service sends in its hash reply (compact separators)."""
    return json.dumps(action_config(port), separators=(",", ":"))


def config_hash(config_json: str) -> str:
    """edgeml/agentlace `compute_hash`: MD5 of the pickled string (computed locally on both sides)."""
    return hashlib.md5(pickle.dumps(config_json, protocol=PICKLE_PROTOCOL)).hexdigest()


def check_config(server_json: Any, port: int) -> None:
    """Raise `HandshakeError` unless the service's config JSON hashes like ours."""
    if not isinstance(server_json, str):
        raise ProtocolError(f"the hash reply carries a {type(server_json).__name__}, expected the config JSON string")
    ours = action_config_json(port)
    if config_hash(server_json) != config_hash(ours):
        raise HandshakeError(
            "The WidowX service runs an incompatible ActionConfig (config hash mismatch).\n"
            f"  service: {server_json}\n  robosteer: {ours}\n"
            "Check robot.port (both port fields depend on it) and that the robot runs bridge_data_robot's "
            "`widowx_env_service --server` with the default action/observation keys and version "
            f"{CONFIG_VERSION}."
        )


# ---------------------------------------------------------------------------------------------
# Requests and replies.


def hash_request() -> dict[str, Any]:
    return {"type": "hash"}


def obs_request() -> dict[str, Any]:
    """edgeml's ActionClient.obs(None) sends the set of all observation keys."""
    return {"type": "obs", "keys": set(OBSERVATION_KEYS)}


def act_request(key: str, payload: dict[str, Any]) -> dict[str, Any]:
    if key not in ACTION_KEYS:
        raise ValueError(f"unknown action key {key!r}; the service knows {', '.join(ACTION_KEYS)}")
    return {"type": "act", "key": key, "payload": payload}


def hash_reply(port: int) -> dict[str, Any]:
    return {"success": True, "payload": action_config_json(port)}


def invalid_reply() -> dict[str, Any]:
    return {"success": False, "message": "Invalid payload"}


def status_of(reply: Any) -> WidowXStatus:
    """The status of an act reply; raises `ProtocolError` if the reply has none."""
    status = reply.get("status") if isinstance(reply, dict) else None
    if type(status) is not int or status not in WidowXStatus._value2member_map_:
        raise ProtocolError(f"act reply without a valid status: {_short(reply)}")
    return WidowXStatus(status)


# ---------------------------------------------------------------------------------------------
# Framing.


def encode(message: Any) -> bytes:
    """`lz4.frame.compress(pickle.dumps(message))`, as edgeml frames every message."""
    return lz4.frame.compress(pickle.dumps(message, protocol=PICKLE_PROTOCOL))


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Inverse of `encode` for untrusted bytes: bounded lz4, restricted unpickling.

    Returns plain containers (dict, list, tuple, set, frozenset), str, bytes, bytearray, int, float,
    complex, bool, None, numpy arrays (bool, int, uint, float, complex, bytes or str dtypes), numpy
    scalars and dtypes. Anything else, and any malformed input, raises `ProtocolError`.
    """
    try:
        raw = _decompress(data, max_bytes)
        _scan_opcodes(raw)
        return _resolve(_RestrictedUnpickler(io.BytesIO(raw)).load(), 0, {}, set())
    except ProtocolError:
        raise
    except Exception as err:  # lz4, pickle and numpy errors on malformed input, MemoryError, RecursionError
        raise ProtocolError(f"undecodable message ({type(err).__name__}: {_short(err)})") from None


def _decompress(data: bytes, max_bytes: int) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    decompressor = lz4.frame.LZ4FrameDecompressor()
    raw = decompressor.decompress(data, max_length=max_bytes + 1)
    if len(raw) > max_bytes:
        raise ProtocolError(f"message larger than {max_bytes} bytes decompressed; raise robot.max_message_mb if real")
    if not decompressor.eof:
        raise ProtocolError("truncated lz4 frame")
    if decompressor.unused_data:
        raise ProtocolError("bytes after the end of the lz4 frame")
    return raw


# Opcodes that the edgeml messages never use and that reach code paths we do not want: persistent
# ids, the copyreg extension registry, protocol 0/1 instance creation, out-of-band buffers.
_FORBIDDEN_OPCODES = {"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "INST", "OBJ", "NEXT_BUFFER", "READONLY_BUFFER"}
_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _scan_opcodes(raw: bytes) -> None:
    """Walk the opcodes before unpickling: count, forbidden opcodes, memo indices, trailing bytes.

    A memo index is bounded because the C unpickler grows its memo table to the index (a 6-byte
    pickle could otherwise ask for gigabytes).
    """
    end = -1
    for count, (op, arg, pos) in enumerate(pickletools.genops(raw), 1):
        if count > MAX_PICKLE_OPCODES:
            raise ProtocolError(f"pickle with more than {MAX_PICKLE_OPCODES} opcodes")
        if op.name in _FORBIDDEN_OPCODES:
            raise ProtocolError(f"pickle opcode {op.name} is not admitted")
        if op.name in _MEMO_OPCODES and not (isinstance(arg, int) and 0 <= arg <= MAX_PICKLE_OPCODES):
            raise ProtocolError(f"pickle memo index {arg!r} out of range")
        end = pos
    if end != len(raw) - 1:
        raise ProtocolError("bytes after the end of the pickle")


# ---------------------------------------------------------------------------------------------
# The restricted unpickler. `find_class` hands out only the factories below; none of them calls
# numpy's own pickle hooks on untrusted state: arrays are rebuilt with np.frombuffer from validated
# (shape, dtype, bytes). Every object handed to the unpickler refuses BUILD (`__setstate__`), so a
# pickle cannot set attributes on it.

_DTYPE_SPEC = re.compile(r"b1|[iu][1248]|f[248]|c(8|16)|[SU][1-9][0-9]{0,6}")


class _Sealed:
    """Base of the objects given to the unpickler: no __dict__, no BUILD."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ProtocolError(f"pickle tries to set the state of {self!r}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__.lstrip('_')}>"


class _NdarrayMarker(_Sealed):
    """Stands for `numpy.ndarray` (only as the first argument of `_reconstruct`); not callable."""

    __slots__ = ()


_NDARRAY = _NdarrayMarker()


class _Factory(_Sealed):
    """A callable admitted global (e.g. `numpy.dtype`), routed to a validating function."""

    __slots__ = ("_fn", "_name")

    def __init__(self, name: str, fn: Any) -> None:
        self._name, self._fn = name, fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"<admitted global {self._name}>"


class _DtypeSpec(_Sealed):
    """A dtype under construction: `numpy.dtype(spec, align, copy)` then BUILD with its state."""

    __slots__ = ("built", "dtype", "spec")

    def __init__(self, spec: str) -> None:
        self.spec, self.dtype, self.built = spec, np.dtype(spec), False

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (3, byteorder, subarray, names, fields, elsize, alignment, flags).
        if self.built or not isinstance(state, tuple) or len(state) != 8 or state[0] != 3:
            raise ProtocolError(f"unexpected dtype state {_short(state)}")
        _, order, subarray, names, fields, elsize, alignment, flags = state
        if order not in ("<", ">", "|", "=") or (subarray, names, fields) != (None, None, None):
            raise ProtocolError(f"dtype state {_short(state)} is not a plain dtype")
        if not all(type(v) is int for v in (elsize, alignment, flags)):
            raise ProtocolError(f"dtype state {_short(state)} has non-integer sizes")
        dtype = np.dtype(self.spec if order in "|=" else order + self.spec)
        if elsize not in (-1, dtype.itemsize):
            raise ProtocolError(f"dtype {self.spec} with element size {elsize}")
        self.dtype, self.built = dtype, True


class _ArrayPlaceholder(_Sealed):
    """An array under construction: `_reconstruct(ndarray, (0,), b"b")` then BUILD with its state."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        # ndarray state: (version 1, shape, dtype, is_fortran, raw bytes), or the legacy form without version.
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ProtocolError(f"unexpected array state {_short(state)}")
        if len(state) == 5:
            if state[0] != 1:
                raise ProtocolError(f"array state version {_short(state[0])}")
            state = state[1:]
        shape, dtype, is_fortran, data = state
        if type(is_fortran) is not bool:
            raise ProtocolError("array state with a non-bool order flag")
        self.array = _array_from_bytes(data, _dtype_of(dtype), shape, "F" if is_fortran else "C")


def _array_from_bytes(data: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    """A fresh, writeable array of `shape` from exactly prod(shape) * itemsize bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"array data of type {type(data).__name__} (object arrays are not admitted)")
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"invalid array shape {_short(shape)}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise ProtocolError(f"array of shape {shape} and dtype {dtype} with {len(data)} bytes of data")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()


def _dtype_of(obj: Any) -> np.dtype:
    if not isinstance(obj, _DtypeSpec):
        raise ProtocolError(f"expected a numpy dtype, got {_short(obj)}")
    return obj.dtype


def _make_dtype(spec: Any, align: Any = False, copy: Any = True) -> _DtypeSpec:
    if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
        raise ProtocolError(f"numpy dtype {_short(spec)} is not admitted (plain numeric, bool, bytes, str only)")
    return _DtypeSpec(spec)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayPlaceholder:
    if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise ProtocolError("numpy _reconstruct with unexpected arguments")
    return _ArrayPlaceholder()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArrayPlaceholder:
    """numpy's in-band pickle protocol 5 form of an array."""
    if order not in ("C", "F"):
        raise ProtocolError(f"array order {_short(order)}")
    return _ArrayPlaceholder(_array_from_bytes(buffer, _dtype_of(dtype), shape, order))


def _scalar(dtype: Any, data: Any) -> np.generic:
    dtype = _dtype_of(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ProtocolError(f"numpy scalar of dtype {dtype} with {_short(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _make_set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple)):
        raise ProtocolError(f"set built from a {type(items).__name__}")
    return set(items)


def _make_frozenset(items: Any = ()) -> frozenset:
    return frozenset(_make_set(items))


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """Protocol 2 pickles bytes as `_codecs.encode(text, "latin1")`; no other codec is admitted."""
    if not isinstance(text, str) or encoding != "latin1":
        raise ProtocolError(f"_codecs.encode with {_short(encoding)} is not admitted")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """Protocol 2 pickles b"" as `bytes()`; any argument (e.g. a size to allocate) is refused."""
    if args:
        raise ProtocolError("bytes() with arguments is not admitted")
    return b""


def _admitted_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NDARRAY}
    table[("numpy", "dtype")] = _Factory("numpy.dtype", _make_dtype)
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names
        table[(f"{core}.multiarray", "_reconstruct")] = _Factory(f"{core}.multiarray._reconstruct", _reconstruct)
        table[(f"{core}.multiarray", "scalar")] = _Factory(f"{core}.multiarray.scalar", _scalar)
        table[(f"{core}.numeric", "_frombuffer")] = _Factory(f"{core}.numeric._frombuffer", _frombuffer)
    table[("_codecs", "encode")] = _Factory("_codecs.encode", _latin1_bytes)
    for builtins in ("builtins", "__builtin__"):  # protocol 2 pickles name Python 2's module
        table[(builtins, "set")] = _Factory("set", _make_set)
        table[(builtins, "frozenset")] = _Factory("frozenset", _make_frozenset)
        table[(builtins, "bytes")] = _Factory("bytes", _empty_bytes)
    return table


_ADMITTED = _admitted_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ADMITTED[(module, name)]
        except (KeyError, TypeError):
            raise ProtocolError(
                f"forbidden global {module}.{name} in a pickled message: only numpy arrays, dtypes and plain "
                "containers are admitted (is something other than the WidowX service answering?)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ProtocolError("persistent ids are not admitted")


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic)
_CONTAINERS = (dict, list, tuple, set, frozenset)


def _resolve(obj: Any, depth: int, memo: dict[int, Any], active: set[int]) -> Any:
    """Replace placeholders by arrays/dtypes and check that only admitted types remain.

    Shared sub-structures are resolved once (`memo`), cycles are refused (`active`).
    """
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, _ArrayPlaceholder):
        if obj.array is None:
            raise ProtocolError("numpy array without its data")
        return obj.array
    if isinstance(obj, _DtypeSpec):
        return obj.dtype
    if type(obj) not in _CONTAINERS:
        raise ProtocolError(f"a pickled {obj!r} is not admitted in a message")
    if depth >= MAX_DEPTH:
        raise ProtocolError(f"containers nested deeper than {MAX_DEPTH}")
    key = id(obj)
    if key in memo:
        return memo[key]
    if key in active:
        raise ProtocolError("recursive containers are not admitted")
    active.add(key)
    items = obj.items() if type(obj) is dict else obj
    if type(obj) is dict:
        out: Any = {_resolve(k, depth + 1, memo, active): _resolve(v, depth + 1, memo, active) for k, v in items}
    else:
        out = type(obj)(_resolve(v, depth + 1, memo, active) for v in items)
    active.discard(key)
    memo[key] = out
    return out


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Observation layout.


def images_to_wire(images: np.ndarray) -> np.ndarray:
    """(ncam, S, S, 3) uint8 RGB -> the service's `image`: (ncam, 3*S*S) float32 in [0, 1], CHW flattened."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (ncam, S, S, 3) uint8 images, got {images.shape} {images.dtype}")
    chw = images.transpose(0, 3, 1, 2)  # (ncam, 3, S, S)
    return chw.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def wire_to_images(image: np.ndarray, size: int) -> np.ndarray:
    """The service's `image` (ncam, 3*S*S) float32 -> (ncam, S, S, 3) uint8 RGB (exact round trip)."""
    chw = image.reshape(len(image), 3, size, size)
    return np.rint(chw.transpose(0, 2, 3, 1) * 255.0).clip(0, 255).astype(np.uint8)


def encode_full_image(rgb: np.ndarray, quality: int = 95) -> bytes:
    """(480, 640, 3) uint8 RGB -> JPEG bytes as the service makes them (cv2.imencode, default quality 95)."""
    from PIL import Image  # lazy: only the simulated service encodes

    buf = io.BytesIO()
    # cv2 reads the array as BGR; a standard encoder reproduces that by encoding the reversed channels.
    Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_full_image(jpeg: bytes) -> np.ndarray:
    """The service's `full_image` JPEG -> (H, W, 3) uint8 RGB (what the reference's cv2.imdecode returns)."""
    from PIL import Image  # lazy: the control loop never needs the full image

    with Image.open(io.BytesIO(jpeg)) as img:
        return np.asarray(img.convert("RGB"))[..., ::-1].copy()


@dataclass
class RobotObservation:
    """One decoded observation of the WidowX service."""

    images: np.ndarray  # (ncam, S, S, 3) uint8 RGB, camera 0 = the primary camera
    state: np.ndarray  # (7,) float32 [x, y, z, roll, pitch, yaw, gripper], metres / radians, 1 = open
    full_image: bytes | None  # camera 0 at 480x640 as JPEG (see decode_full_image), if sent
    stamp: float  # time.monotonic() when the reply arrived


def parse_observation(reply: Any, image_size: int | None = None, stamp: float | None = None) -> RobotObservation:
    """Check and convert an obs reply; `image_size` None infers S from the array length."""
    if not isinstance(reply, dict) or "image" not in reply or "state" not in reply:
        raise ProtocolError(f"observation reply without image/state: {_short(reply)}")
    image, state = reply["image"], reply["state"]
    if isinstance(state, dict) and not state:
        raise NotInitializedError(
            "The WidowX service answers but its environment is not initialised (its observation is the "
            "dummy noise frame): robosteer sends `init` at the start of a session, unless dry_run=true."
        )
    if not isinstance(image, np.ndarray) or image.dtype != np.float32 or image.ndim != 2 or len(image) == 0:
        raise ProtocolError(f"observation image must be float32 (ncam, 3*S*S), got {_describe(image)}")
    size = image_size or _size_of(image.shape[1])
    if image.shape[1] != 3 * size * size:
        raise ProtocolError(
            f"observation image has {image.shape[1]} values per camera, expected 3*{size}*{size}: "
            "the service was initialised with another image_size (set robot.image_size to match)"
        )
    state = np.asarray(state) if isinstance(state, (np.ndarray, list, tuple)) else None
    if state is None or state.shape != (7,) or state.dtype.kind not in "fiu" or not np.isfinite(state).all():
        raise ProtocolError(f"observation state must be 7 finite numbers, got {_describe(reply['state'])}")
    full = reply.get("full_image")
    return RobotObservation(
        images=wire_to_images(image, size),
        state=state.astype(np.float32),
        full_image=full if isinstance(full, bytes) else None,
        stamp=time.monotonic() if stamp is None else stamp,
    )


def _size_of(values_per_camera: int) -> int:
    size = math.isqrt(values_per_camera // 3)
    if 3 * size * size != values_per_camera:
        raise ProtocolError(f"observation image with {values_per_camera} values per camera is not 3*S*S")
    return size


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    return _short(value, 60)
