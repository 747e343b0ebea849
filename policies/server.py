"""The policy server behind `serve_policy.py`: any robosteer Policy over openpi's wire format.

The wire format and robosteer's `__robosteer__` extension are described in `policies/remote.py`.
Here, how the server behaves:

- One thread per connection (websockets' threaded server). Each connection gets its own policy,
  built by the factory when it connects (the first from the one built at start-up), so history
  windows, chunk queues and RNG streams never mix between clients; a factory may share heavy
  weights between its policies (Octo's model is loaded once per process). Inference is serialised
  by one lock: one accelerator runs one request at a time.
- Every request is checked before the policy sees it. A bad request (not msgpack, a text frame, a
  message over `max_size`, a missing or malformed observation key, an unknown method, a refused
  dtype) or a policy that raises gets an error reply, and the connection goes on serving. Messages
  over twice `max_size` are not read at all: websockets closes that connection (code 1009).
- Plain openpi requests act on slot 0; when their instruction (`instruction` or `prompt`) changes,
  the slot is reset with it first, since openpi clients never call reset. Extension requests leave
  resets to the client, so a served policy behaves exactly as the local one.
- `max_clients` connections at once (more are closed with code 1013, "try again later");
  `api_key` (optional) is checked against openpi's `Authorization: Api-Key <key>` header;
  `GET /healthz` answers 200 "OK" without a key.

Imports NumPy, msgpack and websockets only (DESIGN.md "light imports"); the policy's own module
is imported by `make_policy` when the server is built.
"""

from __future__ import annotations

import hmac
import http
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from configs.errors import UserError
from policies.base import ACTION_DIM, Observation, Policy, check_actions, make_policy
from policies.remote import EXTENSION, PROTOCOL_VERSION, SERVER_NAME, WireError, no_delay, packb, unpackb

log = logging.getLogger(__name__)

METHODS = ("reset", "act", "sample_actions", "act_batch", "sample_actions_batch")
MAX_SLOT = 2**16
MAX_BATCH = 1024


class BadRequest(ValueError):
    """A request the server refuses before running the policy; the message says what to fix."""


@dataclass
class _Session:
    """One connection: its policy and the instruction each of its slots was last reset with."""

    policy: Policy
    instructions: dict[int, str] = field(default_factory=dict)
    prev_total_s: float | None = None


class PolicyServer:
    """Serves policies built by `factory` on ws://host:port; `port=0` picks a free port (see `.port`)."""

    def __init__(
        self, factory: Callable[[], Policy], host: str = "0.0.0.0", port: int = 8000, max_size: int = 16 * 2**20,
        max_clients: int = 4, api_key: str | None = None, max_k: int = 1024, name: str = "policy",
        warmup_k: Sequence[int] = (),
    ) -> None:  # fmt: skip
        self.factory, self.host, self.port = factory, host, port
        self.max_size, self.max_clients, self.api_key, self.max_k = int(max_size), int(max_clients), api_key, int(max_k)
        if warmup_k:
            warm(factory(), warmup_k)
        self._spare: Policy | None = factory()  # fails here, before listening, on a bad config
        self.chunk = int(self._spare.chunk)
        self.metadata = {
            "server": SERVER_NAME, "protocol": PROTOCOL_VERSION, "policy": name, "chunk": self.chunk,
            "action_dim": ACTION_DIM, "max_size": self.max_size, "max_k": self.max_k, "methods": list(METHODS),
            "extension": EXTENSION,
        }  # fmt: skip
        self._inference = threading.Lock()
        self._clients_lock = threading.Lock()
        self._clients = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # Life cycle ----------------------------------------------------------------------------------

    def listen(self) -> PolicyServer:
        """Bind the socket (after this, `.port` is the real port)."""
        from websockets.sync.server import serve

        if not 0 <= self.port <= 65535:
            raise UserError(f"port={self.port}: choose a TCP port in 1..65535 (0 = any free one).")
        try:
            self._server = serve(
                self._connection, self.host, self.port, compression=None, max_size=2 * self.max_size,
                process_request=self._http,
            )  # fmt: skip
        except OSError as err:  # e.g. [Errno 98] Address already in use
            raise UserError(
                f"Cannot serve on {self.host}:{self.port} ({err.strerror or err}): another program may hold the port; "
                "choose another port= (or stop it)."
            ) from None
        self.port = self._server.socket.getsockname()[1]
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `stop` (or Ctrl-C)."""
        if self._server is None:
            self.listen()
        self._server.serve_forever()

    def start(self) -> PolicyServer:
        """Serve in a daemon thread (tests, benchmarks); its connection threads are daemons too."""
        self.listen()
        self._thread = threading.Thread(target=self._server.serve_forever, name="policy-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection; waits for the connection threads."""
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Connections ---------------------------------------------------------------------------------

    def _http(self, connection: Any, request: Any) -> Any:
        """websockets' process_request: /healthz, and the API key of every other request."""
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Api-Key {self.api_key}".encode()):
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Missing or wrong API key.\n")
        return None

    def _connection(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        with self._clients_lock:
            full = self._clients >= self.max_clients
            self._clients += not full
        if full:
            ws.close(1013, f"the server already serves max_clients={self.max_clients} clients")
            return
        no_delay(ws.socket)
        peer = ws.remote_address
        log.info("client %s connected", peer)
        session: _Session | None = None
        try:
            try:
                session = _Session(self._take_policy())
            except Exception as err:  # e.g. a checkpoint that fails to load: tell the client why
                log.exception("building the policy for client %s failed", peer)
                ws.close(1011, f"the server could not build its policy: {type(err).__name__}"[:120])
                return
            ws.send(packb(self.metadata))
            for message in ws:
                start = time.monotonic()
                ws.send(self.reply(session, message))
                session.prev_total_s = time.monotonic() - start
        except ConnectionClosed:
            pass
        finally:
            if session is not None:
                session.policy.close()
            with self._clients_lock:
                self._clients -= 1
            log.info("client %s disconnected", peer)

    def _take_policy(self) -> Policy:
        with self._clients_lock:
            policy, self._spare = self._spare, None
        return policy if policy is not None else self.factory()

    # Requests ------------------------------------------------------------------------------------

    def reply(self, session: _Session, message: bytes | str) -> bytes | str:
        """The reply frame to one request frame: a msgpack map, or a text frame for an untied error."""
        request_id = None
        try:
            request = self._decode(message)
            control = request.pop(EXTENSION, None)
            request_id = _request_id(control)
            method, control = _method(control)
            start = time.monotonic()
            result = self._run(session, method, control, request)
            infer_s = time.monotonic() - start
        except (BadRequest, UserError) as err:
            return _error(request_id, "bad_request", str(err))
        except Exception as err:  # the policy failed: tell the client, keep serving
            log.exception("policy error")
            return _error(request_id, "policy_error", f"{type(err).__name__}: {err}")
        timing = {"infer_ms": infer_s * 1e3}
        if session.prev_total_s is not None:
            timing["prev_total_ms"] = session.prev_total_s * 1e3
        result["server_timing"] = timing
        if request_id is not None:
            result[EXTENSION] = {"id": request_id}
        return packb(result)

    def _decode(self, message: bytes | str) -> dict[str, Any]:
        if isinstance(message, str):
            raise BadRequest("expected a binary msgpack frame, got a text frame")
        if len(message) > self.max_size:
            raise BadRequest(f"the message has {len(message)} bytes, over the server's max_size={self.max_size}")
        try:
            request = unpackb(message)
        except WireError as err:
            raise BadRequest(str(err)) from None
        if not isinstance(request, dict):
            raise BadRequest(f"a request is a map (an observation), got {type(request).__name__}")
        return request

    def _run(self, session: _Session, method: str, control: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
        policy, chunk = session.policy, self.chunk
        if method == "reset":
            slot, instruction = _slot(control.get("slot", 0)), control.get("instruction")
            if not isinstance(instruction, str):
                raise BadRequest("reset needs an `instruction` string")
            seed = control.get("seed")
            if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
                raise BadRequest(f"seed={seed!r}: an episode seed is an integer in [0, 2**63)")
            with self._inference:
                policy.reset(instruction, slot, seed)
            session.instructions[slot] = instruction
            return {"instruction": instruction}
        k = self._k(control) if method.startswith("sample") else 1
        if method in ("infer", "act", "sample_actions"):
            slot, obs = _slot(control.get("slot", 0)), check_observation(request)
            with self._inference:
                if method == "infer":  # openpi clients never reset: a new instruction starts an episode
                    self._follow_instruction(session, obs, slot)
                if method != "sample_actions":
                    return {"actions": check_actions(policy.act(obs, slot)[None], 1, chunk)[0]}
                return {"actions": check_actions(policy.sample_actions(obs, k, slot), k, chunk)}
        slots, observations = _batch(control, request)
        with self._inference:
            if method == "act_batch":
                actions = policy.act_batch(observations, slots)
                return {"actions": check_actions(actions, len(slots), chunk)}
            actions = np.asarray(policy.sample_actions_batch(observations, k, slots))
            shape = (len(slots), k, chunk, ACTION_DIM)
            if actions.shape != shape:
                raise ValueError(f"the policy returned actions of shape {actions.shape}, expected {shape}")
            flat = check_actions(actions.reshape(-1, chunk, ACTION_DIM), len(slots) * k, chunk)
            return {"actions": flat.reshape(shape)}

    def _k(self, control: dict[str, Any]) -> int:
        k = control.get("k")
        if type(k) is not int or not 1 <= k <= self.max_k:
            raise BadRequest(f"k={k!r}: the number of samples is an integer in [1, max_k={self.max_k}]")
        return k

    @staticmethod
    def _follow_instruction(session: _Session, obs: Observation, slot: int) -> None:
        """Reset `slot` when the observation's instruction differs from the one it was last reset with."""
        instruction = obs.get("instruction")
        if instruction is not None and session.instructions.get(slot) != instruction:
            session.policy.reset(instruction, slot)
            session.instructions[slot] = instruction


def _error(request_id: int | None, kind: str, message: str) -> bytes | str:
    if request_id is None:
        return f"{kind}: {message}"  # openpi clients raise text frames as errors
    return packb({EXTENSION: {"id": request_id, "error": message, "kind": kind}})


def _request_id(control: Any) -> int | None:
    """The id of an extension request (None for a plain openpi request)."""
    if control is None:
        return None
    if not isinstance(control, dict) or type(control.get("id")) is not int:
        raise BadRequest(f"{EXTENSION} must be a map with an integer `id` and a `method`")
    return control["id"]


def _method(control: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(method, fields) of a request; a plain openpi request is `infer`: `act` on slot 0."""
    if control is None:
        return "infer", {}
    method = control.get("method")
    if method not in METHODS:
        raise BadRequest(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return method, control


def _slot(slot: Any) -> int:
    if type(slot) is not int or not 0 <= slot < MAX_SLOT:
        raise BadRequest(f"slot={slot!r}: a slot is an integer in [0, {MAX_SLOT})")
    return slot


def _batch(control: dict[str, Any], request: dict[str, Any]) -> tuple[list[int], list[Observation]]:
    slots, observations = control.get("slots"), request.get("observations")
    if not isinstance(slots, list) or not isinstance(observations, list) or len(slots) != len(observations):
        raise BadRequest("a batch request has `slots` (in the extension map) and `observations`, of equal length")
    if not 1 <= len(slots) <= MAX_BATCH or len(set(slots)) != len(slots):
        raise BadRequest(f"a batch has 1 to {MAX_BATCH} distinct slots, got {slots!r}")
    return [_slot(s) for s in slots], [check_observation(o, f"observations[{i}]") for i, o in enumerate(observations)]


def check_observation(obs: Any, what: str = "the observation") -> Observation:
    """DESIGN.md's observation from a decoded request: checked keys only, `state` as float32 (7,)."""
    if not isinstance(obs, dict):
        raise BadRequest(f"{what} must be a map with image_primary, optional image_wrist, state, instruction")
    if obs.get("image_primary") is None:
        raise BadRequest(f"{what} has no 'image_primary' (uint8 (H, W, 3) RGB)")
    out: dict[str, Any] = {"image_primary": _image(obs["image_primary"], "image_primary", what)}
    if obs.get("image_wrist") is not None:
        out["image_wrist"] = _image(obs["image_wrist"], "image_wrist", what)
    state = obs.get("state")
    if state is not None:
        if not isinstance(state, np.ndarray) or state.dtype.kind != "f" or state.shape != (ACTION_DIM,):
            raise BadRequest(f"{what}: 'state' must be a float array of shape (7,), got {_describe(state)}")
        out["state"] = state.astype(np.float32)
        if not np.isfinite(out["state"]).all():
            raise BadRequest(f"{what}: 'state' holds NaN or infinite values")
    instruction = obs.get("instruction", obs.get("prompt"))
    if instruction is not None:
        if not isinstance(instruction, str):
            raise BadRequest(f"{what}: 'instruction' must be a string, got {_describe(instruction)}")
        out["instruction"] = instruction
    return out


def _image(image: Any, key: str, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadRequest(f"{what}: {key!r} must be a uint8 array of shape (H, W, 3), got {_describe(image)}")
    if min(image.shape[:2]) < 1:
        raise BadRequest(f"{what}: {key!r} is empty, shape {image.shape}")
    return image


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    return type(value).__name__


def warm(policy: Policy, ks: Sequence[int], size: int = 256) -> None:
    """Run `sample_actions` once per K on a blank observation (JIT compilation before the first client)."""
    obs = {"image_primary": np.zeros((size, size, 3), np.uint8), "state": np.zeros(ACTION_DIM, np.float32)}
    policy.reset("warm up", 0)
    for k in ks:
        start = time.monotonic()
        policy.sample_actions({**obs, "instruction": "warm up"}, int(k), 0)
        log.info("warm-up with K=%d took %.1f s", k, time.monotonic() - start)
    policy.close()


def serve(cfg: Any) -> None:
    """`serve_policy.py`: build the policy of `cfg.policy` and serve it until Ctrl-C."""
    server = PolicyServer(
        lambda: make_policy(cfg.policy), cfg.host, cfg.port, cfg.max_size, cfg.max_clients, cfg.api_key, cfg.max_k,
        cfg.policy.name, list(cfg.warmup_k),
    ).listen()  # fmt: skip
    log.info("serving policy %r (chunk %d) on ws://%s:%d; health: http://%s:%d/healthz",
             cfg.policy.name, server.chunk, cfg.host, server.port, cfg.host, server.port)  # fmt: skip
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `docker stop`: stop as on Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
