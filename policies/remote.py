"""A policy served over the network: openpi's policy-server wire format and `RemotePolicy`, its client.

    python serve_policy.py policy=octo              # anywhere, e.g. in Octo's own environment
    python eval_sim.py policy=remote policy.host=<server> steer=true steering.critic=<run dir>

Wire format (openpi's `WebsocketPolicyServer` and openpi-client 0.1, so openpi clients work as is):

- WebSocket, binary frames, no compression; `GET /healthz` answers 200 "OK" (no WebSocket).
- Every message is msgpack. NumPy arrays and scalars travel as maps with bin-type keys (openpi's
  `msgpack_numpy`; `dtype` is `np.dtype.str`, byte order included; `data` is C-order bytes):
      array   {b"__ndarray__": True, b"data": <bytes>, b"dtype": "<f4", b"shape": [2, 7]}
      scalar  {b"__npgeneric__": True, b"data": <msgpack number>, b"dtype": "<i8"}
  Only bool, integer, float, bytes and str dtypes cross the wire, in both directions: object
  arrays would be raw pointers, so they (and void, complex, datetime) are refused.
- On connect the server sends one metadata map (`{"server": "robosteer", "chunk": 4, ...}`).
- A request is an observation map (DESIGN.md's keys; `prompt` is accepted for `instruction`); the
  reply is `{"actions": (chunk, 7) float32, "server_timing": {"infer_ms": .., "prev_total_ms": ..}}`:
  `policy.act` on slot 0, reset first whenever the instruction changes (openpi clients never reset).
- An error is a text frame holding the message (openpi's client raises it). Unlike openpi's server,
  ours keeps the connection open and goes on serving.

robosteer's extension, for steering and for several episodes per connection: a request may carry
`"__robosteer__": {"method": M, "id": n, ...}` (n an integer chosen by the client) next to the
observation keys. Its reply carries `"__robosteer__": {"id": n}`, and its error is a binary map
`{"__robosteer__": {"id": n, "error": "<message>", "kind": "bad_request" | "policy_error"}}`:

    M                     fields              observation part          reply "actions"
    reset                 slot, instruction   -                         - (reply {"instruction": ..})
    act                   slot                the observation keys      (chunk, 7)
    sample_actions        slot, k             the observation keys      (k, chunk, 7)
    act_batch             slots               "observations": [obs..]   (N, chunk, 7)
    sample_actions_batch  slots, k            "observations": [obs..]   (N, k, chunk, 7)

Extension requests never reset a slot implicitly (the client calls `reset`), so a served policy
gives what the local one gives. `RemotePolicy` numbers its requests and discards any reply whose id
is not the one it waits for, so a reply that arrives after its request timed out is never taken as
the answer to the next one. Set-up with Octo's environment, measured overhead: docs/serving.md.

Imports NumPy, msgpack and websockets only (DESIGN.md "light imports").
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from configs.errors import UserError
from policies.base import ACTION_DIM, POLICIES, Observation, Policy

log = logging.getLogger(__name__)

EXTENSION = "__robosteer__"
SERVER_NAME = "robosteer"
PROTOCOL_VERSION = 1
#: The observation keys a client sends and a server reads (DESIGN.md); others stay on the client.
OBS_KEYS = ("image_primary", "image_wrist", "state", "instruction")
#: dtype kinds allowed on the wire: bool, signed, unsigned, float, bytes, str.
WIRE_KINDS = "biufSU"
MAX_NDIM = 32


class WireError(ValueError):
    """A message that does not follow the wire format (or holds a refused dtype)."""


class RemotePolicyError(UserError):
    """The policy server refused a request, failed, or cannot be reached."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class RemotePolicyTimeout(RemotePolicyError, TimeoutError):
    """No reply within `timeout_s` (a late reply is discarded when it comes)."""


# --- the wire format -----------------------------------------------------------------------------


def _wire_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind not in WIRE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"dtype {dtype} cannot cross the wire (allowed: bool, int, uint, float, bytes, str)")
    return dtype


def _encode(obj: Any) -> Any:
    """msgpack `default` hook: NumPy arrays and scalars as openpi's maps."""
    if isinstance(obj, np.ndarray):
        _wire_dtype(obj.dtype)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        _wire_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def _decode(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's array and scalar maps back to NumPy, checked before use."""
    if b"__ndarray__" in obj:
        dtype, shape, data = _parse_dtype(obj.get(b"dtype")), obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM or not all(type(n) is int for n in shape):
            raise WireError(f"bad array shape {shape!r}")
        if any(n < 0 for n in shape):
            raise WireError(f"bad array shape {shape!r}")
        if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise WireError(f"array data ({size} bytes) does not match dtype {dtype.str} and shape {tuple(shape)}")
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))  # read-only view, no copy
    if b"__npgeneric__" in obj:
        return _parse_dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def _parse_dtype(text: Any) -> np.dtype:
    if not isinstance(text, str):
        raise WireError(f"bad dtype {text!r}")
    try:
        dtype = np.dtype(text)
    except TypeError as err:
        raise WireError(f"bad dtype {text!r}: {err}") from None
    if dtype.itemsize == 0:
        raise WireError(f"bad dtype {text!r}: zero item size")
    return _wire_dtype(dtype)


def packb(obj: Any) -> bytes:
    """msgpack bytes of `obj`, arrays in openpi's encoding (byte-for-byte what openpi-client writes)."""
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """The object of a msgpack message; arrays come back as read-only NumPy arrays. Raises `WireError`."""
    try:
        return msgpack.unpackb(data, object_hook=_decode)
    except WireError:
        raise
    except Exception as err:  # msgpack's errors, and dtype.type() refusing a value
        raise WireError(f"not a valid message: {type(err).__name__}: {err}") from None


def observation_payload(obs: Observation) -> dict[str, Any]:
    """The part of an observation that is sent: `OBS_KEYS` present and not None, arrays as NumPy."""
    out: dict[str, Any] = {}
    for key in OBS_KEYS:
        value = obs.get(key)
        if value is not None:
            out[key] = value if isinstance(value, str) else np.asarray(value)
    return out


def no_delay(sock: socket.socket | None) -> None:
    """Send small frames at once (no Nagle delay on request/reply traffic)."""
    try:
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # already closed by the peer (a refused connection): the next receive says why
        pass


# --- the client ----------------------------------------------------------------------------------


class RemotePolicy(Policy):
    """A Policy whose every call is a request to a policy server (`serve_policy.py`); see the module doc.

    The connection is opened (and the metadata read) on construction, waiting up to
    `connect_timeout_s` for the server to come up. Each connection has its own policy on the server,
    so its slots are this client's alone.
    """

    def __init__(
        self, host: str = "localhost", port: int = 8000, timeout_s: float = 30.0, api_key: str | None = None,
        connect_timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}:{port}"
        self.timeout_s, self.connect_timeout_s, self.api_key = float(timeout_s), float(connect_timeout_s), api_key
        self._ids = itertools.count(1)
        self._ws, self.metadata = self._connect()
        self.chunk = int(self.metadata["chunk"])
        self.max_size = int(self.metadata.get("max_size") or 0)

    # The Policy contract -------------------------------------------------------------------------

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        super().reset(instruction, slot, seed)
        request = {"method": "reset", "slot": int(slot), "instruction": instruction}
        self._call(request if seed is None else {**request, "seed": int(seed)})

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        reply = self._call({"method": "sample_actions", "slot": int(slot), "k": int(k)}, observation_payload(obs))
        return self._actions(reply, (k, self.chunk, ACTION_DIM))

    def act(self, obs: Observation, slot: int = 0) -> np.ndarray:
        reply = self._call({"method": "act", "slot": int(slot)}, observation_payload(obs))
        return self._actions(reply, (self.chunk, ACTION_DIM))

    def sample_actions_batch(
        self, observations: Sequence[Observation], k: int, slots: Sequence[int] | None = None
    ) -> np.ndarray:
        slots = [int(s) for s in (range(len(observations)) if slots is None else slots)]
        payload = {"observations": [observation_payload(o) for o in observations]}
        reply = self._call({"method": "sample_actions_batch", "slots": slots, "k": int(k)}, payload)
        return self._actions(reply, (len(slots), k, self.chunk, ACTION_DIM))

    def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
        slots = [int(s) for s in (range(len(observations)) if slots is None else slots)]
        payload = {"observations": [observation_payload(o) for o in observations]}
        reply = self._call({"method": "act_batch", "slots": slots}, payload)
        return self._actions(reply, (len(slots), self.chunk, ACTION_DIM))

    def close(self) -> None:
        self._ws.close()

    # Transport -----------------------------------------------------------------------------------

    def _connect(self) -> tuple[Any, dict[str, Any]]:
        """Open the WebSocket (retrying while the server is not up yet) and read the metadata frame."""
        from websockets.exceptions import ConnectionClosed, InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                # entered as a context manager: websockets >= 17.1 deprecates plain connect()
                ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                             open_timeout=max(self.connect_timeout_s, 1.0), close_timeout=1.0,
                             ).__enter__()  # fmt: skip
                break
            except InvalidStatus as err:
                status = err.response.status_code
                why = "the API key was refused (policy.api_key)" if status == 401 else f"HTTP {status}"
                raise RemotePolicyError(f"The policy server at {self.uri} refused the connection: {why}.") from None
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise RemotePolicyError(
                        f"No policy server answers at {self.uri} ({err}). Start one with "
                        f"`python serve_policy.py policy=<name> port=<port>` and set policy.host / policy.port."
                    ) from None
                time.sleep(0.2)
        no_delay(ws.socket)
        try:
            metadata = unpackb(ws.recv(timeout=max(self.connect_timeout_s, 1.0)))
        except ConnectionClosed as err:
            raise RemotePolicyError(f"The policy server at {self.uri} closed the connection ({err}).") from None
        except (TimeoutError, WireError) as err:
            ws.close()
            raise RemotePolicyError(f"No valid metadata frame from {self.uri} ({err}).") from None
        if not isinstance(metadata, dict) or metadata.get("server") != SERVER_NAME:
            ws.close()
            raise RemotePolicyError(
                f"The server at {self.uri} is not a robosteer policy server (metadata {metadata!r}); "
                "RemotePolicy needs the sample_actions extension of serve_policy.py."
            )
        log.info("connected to %s: %s", self.uri, {k: metadata[k] for k in ("policy", "chunk") if k in metadata})
        return ws, metadata

    def _call(self, control: dict[str, Any], payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one extension request and return its reply; late replies to earlier requests are skipped."""
        from websockets.exceptions import ConnectionClosed

        request_id = next(self._ids)
        message = packb({**(payload or {}), EXTENSION: {**control, "id": request_id}})
        method = control["method"]
        if self.max_size and len(message) > self.max_size:
            raise RemotePolicyError(
                f"A {method} request of {len(message)} bytes exceeds the server's max_size={self.max_size}: "
                "send smaller images, or start the server with a larger max_size."
            )
        deadline = time.monotonic() + self.timeout_s
        try:
            self._ws.send(message)
            while True:
                reply = self._match(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.0)), request_id, method)
                if reply is not None:
                    return reply
        except TimeoutError:
            raise RemotePolicyTimeout(
                f"The policy server at {self.uri} did not answer {method} (request {request_id}) within "
                f"policy.timeout_s={self.timeout_s:g}; a late answer will be discarded."
            ) from None
        except ConnectionClosed as err:
            raise RemotePolicyError(f"The connection to the policy server at {self.uri} is closed ({err}).") from None

    def _match(self, raw: bytes | str, request_id: int, method: str) -> dict[str, Any] | None:
        """The reply to `request_id`, None for a late reply to an earlier request; raises server errors."""
        if isinstance(raw, str):  # an error the server could not tie to a request id
            raise RemotePolicyError(f"The policy server at {self.uri} refused {method}: {raw}")
        reply = unpackb(raw)
        ext = reply.get(EXTENSION) if isinstance(reply, dict) else None
        if not isinstance(ext, dict) or not isinstance(ext.get("id"), int):
            raise RemotePolicyError(f"A reply from {self.uri} has no request id: {str(reply)[:200]}")
        if ext["id"] != request_id:
            log.warning("discarding the late reply to request %s (waiting for %s)", ext["id"], request_id)
            return None
        if "error" in ext:
            kind = str(ext.get("kind", "error"))
            raise RemotePolicyError(f"The policy server refused {method} ({kind}): {ext['error']}", kind)
        return reply

    def _actions(self, reply: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
        actions = reply.get("actions")
        if not isinstance(actions, np.ndarray) or actions.shape != shape:
            got = actions.shape if isinstance(actions, np.ndarray) else type(actions).__name__
            raise RemotePolicyError(f"The policy server at {self.uri} returned actions {got}, expected {shape}.")
        actions = np.array(actions, dtype=np.float32)  # a writable copy in native byte order
        if not np.isfinite(actions).all():
            raise RemotePolicyError(f"The policy server at {self.uri} returned NaN or infinite actions.")
        return actions


@POLICIES.register("remote")
def _remote(cfg: Any) -> Policy:
    return RemotePolicy(cfg.host, cfg.port, cfg.timeout_s, cfg.api_key, cfg.connect_timeout_s)
