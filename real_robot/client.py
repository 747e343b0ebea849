"""A ROS-free client of the WidowX service (`widowx_env_service --server` of bridge_data_robot).

    client = WidowXClient("192.168.1.10")          # connects and checks the config hash
    client.init(DEFAULT_ENV_PARAMS, image_size=256)  # first init takes ~10 s; waits for it
    obs = client.get_observation()                   # RobotObservation, or None if no usable reply
    client.step_action(np.array([0.01, 0, 0, 0, 0, 0, 1.0]))  # relative action -> WidowXStatus
    client.move_to([0.3, 0.0, 0.15, 0, 0, 0])        # absolute end-effector pose (the service's `move`)
    client.stop()

Every request is one REQ/REP exchange with its own timeout (800 ms by default, as edgeml's client).
A request that gets no reply, or a reply that does not decode, closes the REQ socket and opens a
new one before the next request: a REQ socket that timed out is stuck waiting for its reply, and a
reply that arrives late goes to the closed socket, so it can never be read as the answer to a later
request. The protocol has no request ids, so a request that timed out may still have executed on
the robot: callers must not resend a `step_action` whose status is NO_CONNECTION (the control loop
stops instead).

`init` and `reset` take longer than the request timeout on a real robot (the service is
single-threaded and answers only when done), so the reference client sees NO_CONNECTION while the
service carries on; like the reference's own script, we then poll `get_observation()` until the
service answers again, within an overall deadline.

Imports only numpy, pyzmq, lz4 and the standard library (DESIGN.md "light imports").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from configs.errors import UserError
from real_robot import protocol
from real_robot.protocol import (
    CLIENT_TIMEOUT_MS,
    DEFAULT_PORT,
    MAX_MESSAGE_BYTES,
    NotInitializedError,
    ProtocolError,
    RobotObservation,
    WidowXStatus,
)

log = logging.getLogger(__name__)


class RobotConnectionError(UserError):
    """The WidowX service does not answer (or never finished a long call)."""


class RobotCommandError(UserError):
    """The WidowX service refused a session-level command (init, reset)."""


class WidowXClient:
    """Talks to one WidowX service over ZMQ REQ/REP; see the module docstring."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        timeout_ms: int = CLIENT_TIMEOUT_MS,
        connect_timeout_s: float = 5.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        handshake: bool = True,
    ) -> None:
        """Connect to tcp://host:port; with `handshake`, check the service's config within `connect_timeout_s`."""
        self.host, self.port, self.timeout_ms = host, int(port), int(timeout_ms)
        self.max_message_bytes = max_message_bytes
        self.image_size: int | None = None  # known after init; None = infer from the observation
        self.last_error = ""  # why the last request or observation failed
        self.socket_resets = 0
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        if handshake:
            self.handshake(connect_timeout_s)

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    # -- transport ---------------------------------------------------------------------------

    def _open_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)  # closing drops unsent requests and late replies
        sock.connect(self.address)
        return sock

    def _reset_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self.socket_resets += 1
        self._socket = None

    def request(self, message: dict[str, Any], timeout_ms: int | None = None) -> Any | None:
        """Send one request and return the decoded reply, or None (reason in `last_error`).

        On no reply within the timeout, a transport error or an undecodable reply, the socket is
        closed (a new one is opened by the next request), as edgeml's client does.
        """
        timeout = self.timeout_ms if timeout_ms is None else int(timeout_ms)
        what = _describe_request(message)
        self.last_error = ""
        if self._socket is None:
            self._socket = self._open_socket()
        try:
            self._socket.send(protocol.encode(message), flags=zmq.NOBLOCK)
            if not self._socket.poll(timeout, zmq.POLLIN):
                return self._fail(f"no reply to {what} from {self.address} within {timeout} ms")
            data = self._socket.recv(flags=zmq.NOBLOCK)
        except zmq.ZMQError as err:
            return self._fail(f"transport error on {what} to {self.address}: {err}")
        except BaseException:  # Ctrl-C mid-exchange: this REQ socket would wait for its reply forever
            self._reset_socket()
            raise
        try:
            return protocol.decode(data, self.max_message_bytes)
        except ProtocolError as err:
            return self._fail(f"garbage reply to {what} from {self.address}: {err}")

    def _fail(self, reason: str) -> None:
        self.last_error = reason
        log.warning("%s; resetting the REQ socket", reason)
        self._reset_socket()
        return None

    # -- handshake and observations -----------------------------------------------------------

    def handshake(self, timeout_s: float = 5.0) -> str:
        """Check the service's ActionConfig against ours (retrying until `timeout_s`); returns its JSON."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.request(protocol.hash_request())
            if reply is not None:
                break
            if time.monotonic() >= deadline:
                raise RobotConnectionError(
                    f"No WidowX service answers at {self.address} ({self.last_error}). Start it on the robot "
                    "computer (`widowx_env_service --server`, or `python -m real_robot.sim_service` to rehearse) "
                    "and check robot.host / robot.port and the network."
                )
            time.sleep(0.2)
        if not isinstance(reply, dict) or reply.get("success") is not True:
            raise ProtocolError(f"{self.address} answered the config handshake with {protocol._short(reply)}")
        protocol.check_config(reply.get("payload"), self.port)
        log.info("connected to the WidowX service at %s (config hash matches)", self.address)
        return reply["payload"]

    def get_observation(self) -> RobotObservation | None:
        """The current observation, or None if none usable arrived (reason in `last_error`)."""
        reply = self.request(protocol.obs_request())
        if reply is None:
            return None
        try:
            return protocol.parse_observation(reply, self.image_size, stamp=time.monotonic())
        except (ProtocolError, NotInitializedError) as err:
            self.last_error = str(err)
            log.warning("unusable observation from %s: %s", self.address, err)
            return None

    def wait_for_observation(self, timeout_s: float, what: str) -> RobotObservation:
        """Poll `get_observation` until it answers; raise `RobotConnectionError` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            obs = self.get_observation()
            if obs is not None:
                return obs
            time.sleep(0.1)
        raise RobotConnectionError(
            f"The WidowX service did not answer within {timeout_s:.0f} s after {what} ({self.last_error}). "
            "Check the service's console on the robot computer; raise robot.init_timeout_s / "
            "robot.reset_timeout_s if it is only slow."
        )

    # -- actions ------------------------------------------------------------------------------

    def act(self, key: str, payload: dict[str, Any], timeout_ms: int | None = None) -> WidowXStatus:
        """One act request; NO_CONNECTION if no usable reply (reason in `last_error`)."""
        reply = self.request(protocol.act_request(key, payload), timeout_ms)
        if reply is None:
            return WidowXStatus.NO_CONNECTION
        try:
            return protocol.status_of(reply)
        except ProtocolError as err:
            self.last_error = str(err)
            log.warning("%s: %s", key, err)
            return WidowXStatus.EXECUTION_FAILURE

    def init(self, env_params: dict[str, Any], image_size: int = 256, timeout_s: float = 60.0) -> WidowXStatus:
        """Initialise the robot environment (it then resets to `start_state`); waits until it answers.

        `env_params` must be plain Python data (the service unpickles it without robosteer).
        """
        self.image_size = int(image_size)
        status = self.act("init", {"env_params": env_params, "image_size": self.image_size})
        return self._finish_long_call("init", status, timeout_s)

    def reset(self, timeout_s: float = 30.0) -> WidowXStatus:
        """Open the gripper, go to neutral (unless skipped) and to `start_state`; waits until it answers."""
        return self._finish_long_call("reset", self.act("reset", {}), timeout_s)

    def _finish_long_call(self, key: str, status: WidowXStatus, timeout_s: float) -> WidowXStatus:
        if status == WidowXStatus.NO_CONNECTION:
            log.info("%s: no reply within %d ms, as expected while the service works; polling for an "
                     "observation (up to %.0f s)", key, self.timeout_ms, timeout_s)  # fmt: skip
            self.wait_for_observation(timeout_s, key)
            return WidowXStatus.SUCCESS
        if status == WidowXStatus.NOT_INITIALIZED:
            raise RobotCommandError(
                f"The WidowX service answered {key} with NOT_INITIALIZED: it runs in --test mode (no robot) "
                "or was never initialised. Restart it as `widowx_env_service --server` without --test."
            )
        if status != WidowXStatus.SUCCESS:
            raise RobotCommandError(f"The WidowX service refused {key}: {status.name} ({self.last_error}).")
        return status

    def step_action(self, action: np.ndarray, blocking: bool = False) -> WidowXStatus:
        """Send one relative action (7,) [dx, dy, dz, droll, dpitch, dyaw, gripper] (or the 5-D form)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape not in ((7,), (5,)) or not np.isfinite(action).all():
            raise ValueError(f"step_action needs 7 (or 5) finite numbers, got {action!r}")
        return self.act("step_action", {"action": action, "blocking": bool(blocking)})

    def move_to(self, pose: Sequence[float], duration: float = 1.0, blocking: bool = False) -> WidowXStatus:
        """The service's `move`: absolute end-effector pose (6,) [x, y, z, roll, pitch, yaw] or a 4x4 transform."""
        pose = np.asarray(pose, dtype=np.float64)
        if pose.shape not in ((6,), (4, 4)) or not np.isfinite(pose).all():
            raise ValueError(f"move_to needs a finite (6,) pose or 4x4 transform, got shape {pose.shape}")
        return self.act("move", {"pose": pose, "duration": float(duration), "blocking": bool(blocking)})

    def move_gripper(self, open_fraction: float) -> WidowXStatus:
        """Open (> 0.5) or close the gripper."""
        return self.act("gripper", {"open": float(open_fraction)})

    def reboot_motor(self, joint_name: str) -> WidowXStatus:
        """Experimental in the service: reboot one Dynamixel (see protocol.JOINT_NAMES)."""
        if joint_name not in protocol.JOINT_NAMES:
            raise ValueError(f"unknown joint {joint_name!r}; known: {', '.join(protocol.JOINT_NAMES)}")
        return self.act("reboot_motor", {"joint_name": joint_name})

    def stop(self) -> None:
        """Close the connection (the robot keeps its last target)."""
        self._reset_socket()
        if not self._context.closed:
            self._context.term()

    def __enter__(self) -> WidowXClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _describe_request(message: dict[str, Any]) -> str:
    kind = message.get("type")
    return f"act {message.get('key')}" if kind == "act" else str(kind)
