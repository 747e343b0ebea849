"""A simulated WidowX service: the wire protocol of `widowx_env_service --server`, a toy arm, faults.

    python -m real_robot.sim_service --port 5556                     # rehearse on loopback
    python -m real_robot.sim_service --init-delay 10 --reset-delay 3 # the real robot's slow calls
    python -m real_robot.sim_service --fault late_reply --fault-on step_action --fault-at 20

It binds the same sockets as the real service (REP on the port, an unused PUB on port + 1, same
socket options), answers the same handshake, act and obs messages with the same status codes and
observation layout (real_robot/protocol.py), and is single-threaded like it: a slow call blocks
every other request.

The arm is an end-effector integrator, not a dynamics model: like the service
(robot_base_env.py `_next_qpos`), an action is clipped to the service's action space and applied to
the previous *target* (rotation about the measured end-effector position, world axes), the target
xyz is clipped to the workspace, and the gripper target is absolute. The measured pose follows the
target with a first-order lag (time constant 0.1 s). The camera is synthetic: a textured table with
a few objects and the gripper drawn where the end-effector is (size from height, colour from
opening), with a little sensor noise, rendered at 480x640 (`full_image`) and resized to the
`image_size` of `init` (`image`).

Faults (one per service, on the `at`-th request, 0-based, of kind `on`: "obs" or an act key):
    no_reply          the request is dropped unexecuted; the service is silent for `duration_s`,
                      then rebinds its socket (as the real service does after an exception)
    late_reply        the request executes; the reply is sent after `duration_s`
    garbage_reply     the request executes; the reply is random bytes
    malicious_reply   the request executes; the reply is a pickle that would call os.system
    disconnect        the request is dropped unexecuted; the sockets close for `duration_s`
plus `init_delay_s` / `reset_delay_s` for slow init and reset.
"""

from __future__ import annotations

import argparse
import logging
import math
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import lz4.frame
import numpy as np
import zmq

from configs.errors import UserError
from real_robot import protocol
from real_robot.protocol import SERVICE_ACTION_HIGH, SERVICE_ACTION_LOW, ProtocolError, WidowXStatus

log = logging.getLogger(__name__)

FAULT_KINDS = ("no_reply", "late_reply", "garbage_reply", "malicious_reply", "disconnect")
# Fallback bounds of a wx250s when env_params sets none (robot_base_env.py, ROBONETV2_ARM=wx250s).
WX250S_BOUNDS = ((0.19, -0.08, 0.05, -1.57, 0.0), (0.31, 0.08, 0.055, 1.57, 0.0))
NEUTRAL_XYZ = (0.25, 0.0, 0.20)  # where the toy arm stands after init (the real one: NEUTRAL_JOINT_STATE)


@dataclass
class Fault:
    """One injected fault (see the module docstring)."""

    kind: str
    on: str = "step_action"
    at: int = 0
    duration_s: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise UserError(f"unknown fault {self.kind!r}; known: {', '.join(FAULT_KINDS)}")
        if self.on != "obs" and self.on not in protocol.ACTION_KEYS:
            keys = ", ".join(protocol.ACTION_KEYS)
            raise UserError(f"a fault applies to 'obs' or an act key ({keys}), not {self.on!r}")


# ---------------------------------------------------------------------------------------------
# Rotations, as transformation_utils.py of bridge_data_robot defines them (R = Rz @ Ry @ Rx).


def euler_to_matrix(rpy: np.ndarray) -> np.ndarray:
    """(3,) roll, pitch, yaw -> (3, 3) rotation Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    (cr, cp, cy), (sr, sp, sy) = np.cos(rpy), np.sin(rpy)
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def matrix_to_euler(rot: np.ndarray) -> np.ndarray:
    """Inverse of `euler_to_matrix` (rotationMatrixToEulerAngles)."""
    sy = math.hypot(rot[0, 0], rot[1, 0])
    if sy < 1e-6:
        return np.array([math.atan2(-rot[1, 2], rot[1, 1]), math.atan2(-rot[2, 0], sy), 0.0])
    return np.array([math.atan2(rot[2, 1], rot[2, 2]), math.atan2(-rot[2, 0], sy), math.atan2(rot[1, 0], rot[0, 0])])


def _rotvec(rot: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) axis * angle."""
    angle = math.acos(max(-1.0, min(1.0, (np.trace(rot) - 1) / 2)))
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


def _from_rotvec(vec: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(vec))
    if angle < 1e-12:
        return np.eye(3)
    k = vec / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


# ---------------------------------------------------------------------------------------------
# The toy arm and camera.


class SimArm:
    """End-effector target integrator with a lagging measured pose (see the module docstring)."""

    TIME_CONSTANT_S = 0.1

    def __init__(self, env_params: dict[str, Any]) -> None:
        bounds = env_params.get("override_workspace_boundaries") or WX250S_BOUNDS
        self.low = np.asarray(bounds[0][:3], np.float64)
        self.high = np.asarray(bounds[1][:3], np.float64)
        start = np.asarray(env_params.get("start_state") or [0.3, 0.0, 0.15, 0, 0, 0, 1], np.float64)
        if start.shape == (5,):  # [x, y, z, yaw, gripper] as widowx_env.py expands it
            start = np.concatenate([start[:3], np.zeros(2), start[3:]])
        self.start_state = start
        self.clipped_steps = 0
        self._place(np.asarray(NEUTRAL_XYZ), np.eye(3), 1.0)

    def _place(self, xyz: np.ndarray, rot: np.ndarray, gripper: float) -> None:
        """Put target and measured pose at the same place."""
        self.target_xyz, self.target_rot, self.target_gripper = xyz.astype(np.float64), rot.copy(), float(gripper)
        self.xyz, self.rot, self.gripper = self.target_xyz.copy(), rot.copy(), float(gripper)
        self._updated = time.monotonic()

    def advance(self, now: float | None = None) -> None:
        """Move the measured pose towards the target for the time elapsed since the last call."""
        now = time.monotonic() if now is None else now
        alpha = 1.0 - math.exp(-max(now - self._updated, 0.0) / self.TIME_CONSTANT_S)
        self._updated = now
        self.xyz = self.xyz + alpha * (self.target_xyz - self.xyz)
        self.rot = _from_rotvec(alpha * _rotvec(self.target_rot @ self.rot.T)) @ self.rot
        self.gripper += alpha * (self.target_gripper - self.gripper)

    def step(self, action: np.ndarray) -> None:
        """Apply one relative action (7,) or (5,) [dx, dy, dz, (droll, dpitch,) dyaw, gripper]."""
        self.advance()
        action = np.asarray(action, np.float64)
        if action.shape == (5,):  # 3trans1rot: zeros for roll and pitch
            action = np.concatenate([action[:3], np.zeros(2), action[3:]])
        action = np.clip(action, SERVICE_ACTION_LOW, SERVICE_ACTION_HIGH)
        delta_rot = euler_to_matrix(action[3:6])
        # T_eef @ T_delta @ T_eef^-1 applied to the previous target (action2transform_local).
        xyz = self.xyz + action[:3] + delta_rot @ (self.target_xyz - self.xyz)
        clipped = np.clip(xyz, self.low, self.high)
        if not np.array_equal(clipped, xyz):
            self.clipped_steps += 1
            log.info("action clipped!")  # the service's own message
        self.target_xyz, self.target_rot, self.target_gripper = clipped, delta_rot @ self.target_rot, float(action[6])

    def move(self, pose: np.ndarray) -> None:
        """Absolute target pose (6,) [x, y, z, roll, pitch, yaw] or a 4x4 transform."""
        self.advance()
        if pose.shape == (4, 4):
            self.target_xyz, self.target_rot = pose[:3, 3].astype(np.float64), pose[:3, :3].astype(np.float64)
        else:
            self.target_xyz, self.target_rot = pose[:3].astype(np.float64), euler_to_matrix(pose[3:6])

    def reset(self) -> None:
        """Open the gripper and stand at start_state."""
        self._place(self.start_state[:3], euler_to_matrix(self.start_state[3:6]), 1.0)

    def state(self) -> np.ndarray:
        """(7,) float64 [x, y, z, roll, pitch, yaw, gripper] of the measured pose."""
        self.advance()
        return np.concatenate([self.xyz, matrix_to_euler(self.rot), [self.gripper]])


class SimCamera:
    """A synthetic 480x640 RGB view of the table and the gripper."""

    H, W = protocol.FULL_IMAGE_SHAPE[:2]

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0 : self.H, 0 : self.W] / np.array([self.H, self.W])[:, None, None]
        table = np.stack([0.55 + 0.2 * xx, 0.45 + 0.15 * yy, 0.3 + 0.05 * np.sin(40 * xx) * np.sin(40 * yy)], -1)
        for _ in range(4):  # a few objects on the table
            y0, x0 = rng.integers(60, self.H - 80), rng.integers(60, self.W - 80)
            table[y0 : y0 + rng.integers(25, 60), x0 : x0 + rng.integers(25, 60)] = rng.uniform(0.1, 0.9, 3)
        self.background = (table * 255).astype(np.uint8)
        self.rng = rng

    def pixel(self, xyz: np.ndarray) -> tuple[int, int, int]:
        """(row, col, radius) of the end-effector: x forward = up the image, y left = left."""
        row = int(430 - (xyz[0] - 0.1) / 0.35 * 380)
        col = int(560 - (xyz[1] + 0.15) / 0.40 * 480)
        radius = int(np.clip(18 + (xyz[2] + 0.1) * 80, 8, 48))
        return row, col, radius

    def render(self, state: np.ndarray) -> np.ndarray:
        """(480, 640, 3) uint8 RGB for a (7,) state."""
        image = self.background.copy()
        row, col, radius = self.pixel(state[:3])
        r0, r1 = max(row - radius, 0), min(row + radius, self.H)
        c0, c1 = max(col - radius, 0), min(col + radius, self.W)
        if r0 < r1 and c0 < c1:
            yy, xx = np.mgrid[r0:r1, c0:c1]
            disc = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
            color = np.array([230 * (1 - state[6]) + 20, 60 + 40 * np.cos(state[5]), 230 * state[6] + 20])
            image[r0:r1, c0:c1][disc] = color.clip(0, 255).astype(np.uint8)
        noise = self.rng.integers(-4, 5, (16, 16, 3))
        image[:16, :16] = (image[:16, :16].astype(np.int16) + noise).clip(0, 255).astype(np.uint8)
        return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3), anti-aliased (the service uses skimage's anti-aliased resize)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, reducing_gap=2.0))


# ---------------------------------------------------------------------------------------------
# The service.


class SimWidowXService:
    """Serves the WidowX protocol on tcp://host:port in a thread (`start`) or the caller's (`serve`).

    What it executed is kept for tests and rehearsal: `executed` (step_action actions, in order),
    `moves` (move poses) and `events` ((monotonic time, request kind, request index) of every request).
    """

    def __init__(
        self, port: int = protocol.DEFAULT_PORT, host: str = "127.0.0.1", fault: Fault | None = None,
        init_delay_s: float = 0.0, reset_delay_s: float = 0.0, move_settle_s: float = 0.2,
        testing: bool = False, seed: int = 0,
    ) -> None:  # fmt: skip
        self.port, self.host, self.fault = int(port), host, fault
        self.init_delay_s, self.reset_delay_s, self.move_settle_s = init_delay_s, reset_delay_s, move_settle_s
        self.testing = testing  # like the real service's --test: init answers NOT_INITIALIZED
        self.camera = SimCamera(seed)
        self.arm: SimArm | None = None
        self.env_params: dict[str, Any] = {}
        self.image_size: int | None = None
        self.executed: list[np.ndarray] = []
        self.moves: list[np.ndarray] = []
        self.events: list[tuple[float, str, int]] = []
        self.fault_fired = threading.Event()
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: zmq.Context | None = None
        self._rep: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SimWidowXService:
        """Serve in a background thread; returns once the sockets are bound."""
        self._thread = threading.Thread(target=self._serve_guarded, name=f"sim-widowx-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> SimWidowXService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_guarded(self) -> None:
        try:
            self.serve()
        except BaseException as err:
            self._error = err
            self._ready.set()

    def serve(self) -> None:
        """Answer requests until `stop()` (or Ctrl-C when run from the command line)."""
        self._bind()
        self._ready.set()
        log.info("simulated WidowX service on tcp://%s:%d (PUB %d unused)", self.host, self.port, self.port + 1)
        try:
            while not self._stop.is_set():
                if self._rep is None or not self._rep.poll(100, zmq.POLLIN):
                    continue
                self._handle(self._rep.recv())
        finally:
            self._close()

    def _bind(self) -> None:
        self._context = zmq.Context()
        self._rep = self._context.socket(zmq.REP)
        self._rep.setsockopt(zmq.SNDHWM, protocol.SERVER_SNDHWM)
        self._rep.setsockopt(zmq.RCVTIMEO, protocol.SERVER_RCVTIMEO_MS)
        self._rep.setsockopt(zmq.LINGER, 0)
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        try:
            self._rep.bind(f"tcp://{self.host}:{self.port}")
            self._pub.bind(f"tcp://{self.host}:{self.port + 1}")
        except zmq.ZMQError as err:
            self._close()
            ports = f"{self.port}/{self.port + 1}"
            raise UserError(f"cannot bind ports {ports} on {self.host}: {err}; pick another --port") from None

    def _close(self) -> None:
        for sock in (self._rep, self._pub):
            if sock is not None:
                sock.close(linger=0)
        if self._context is not None:
            self._context.term()
        self._rep = self._pub = self._context = None

    def _rebind(self, down_s: float) -> None:
        """Close the sockets (dropping queued requests and replies), wait, bind again."""
        self._close()
        if not self._stop.wait(down_s):
            self._bind()

    # -- requests -----------------------------------------------------------------------------

    def _handle(self, data: bytes) -> None:
        try:
            message = protocol.decode(data)
        except ProtocolError as err:
            # The real service's loop dies on an undecodable request and restarts its server.
            log.error("undecodable request (%s); restarting the socket", err)
            self._rebind(0.0)
            return
        kind = _kind_of(message)
        index = self._counts[kind]
        self._counts[kind] += 1
        self.events.append((time.monotonic(), kind, index))
        fault = self.fault
        if fault is not None and kind in (fault.on, f"act:{fault.on}") and index == fault.at:
            self._inject(fault, message, kind, index)
        else:
            self._rep.send(protocol.encode(self.dispatch(message)))

    def _inject(self, fault: Fault, message: Any, kind: str, index: int) -> None:
        log.warning("fault %s on %s #%d", fault.kind, kind, index)
        self.fault_fired.set()
        if fault.kind == "no_reply":
            self._stop.wait(fault.duration_s)
            self._rebind(0.0)
        elif fault.kind == "disconnect":
            self._rebind(fault.duration_s)
        else:
            reply = protocol.encode(self.dispatch(message))
            if fault.kind == "late_reply":
                self._stop.wait(fault.duration_s)
            elif fault.kind == "garbage_reply":
                reply = np.random.default_rng(index).integers(0, 256, 64, dtype=np.uint8).tobytes()
            elif fault.kind == "malicious_reply":
                reply = lz4.frame.compress(MALICIOUS_PICKLE)
            if self._rep is not None:
                self._rep.send(reply)

    def dispatch(self, message: Any) -> dict[str, Any]:
        """The reply to one decoded request, as edgeml's ActionServer routes it."""
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "obs":
            return self.observe()
        if kind == "act" and isinstance(message.get("payload"), dict):
            return {"status": int(self.act(message.get("key"), message["payload"]))}
        if kind == "hash":
            return protocol.hash_reply(self.port)
        return protocol.invalid_reply()

    def act(self, key: Any, payload: dict[str, Any]) -> WidowXStatus:
        handler = {"init": self._init, "move": self._move, "gripper": self._gripper, "reset": self._reset,
                   "step_action": self._step_action, "reboot_motor": self._reboot}.get(key)  # fmt: skip
        if handler is None:
            return WidowXStatus.EXECUTION_FAILURE
        if key != "init" and self.arm is None:
            log.warning("WARNING: env not initialized.")
            return WidowXStatus.NOT_INITIALIZED
        try:
            return handler(payload)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # The real service raises here and restarts; the simulation answers instead.
            log.error("malformed %s payload: %r", key, err)
            return WidowXStatus.EXECUTION_FAILURE

    def _init(self, payload: dict[str, Any]) -> WidowXStatus:
        reinit = payload["env_params"] != self.env_params
        self.env_params, self.image_size = payload["env_params"], int(payload["image_size"])
        if self.testing:
            return WidowXStatus.NOT_INITIALIZED
        if not reinit and self.arm is not None:
            return self._reset({})
        self._stop.wait(self.init_delay_s)
        self.arm = SimArm(self.env_params)
        log.info("Initialized bridge env (image_size %d).", self.image_size)
        return WidowXStatus.SUCCESS

    def _reset(self, payload: dict[str, Any]) -> WidowXStatus:
        self._stop.wait(self.reset_delay_s)
        self.arm.reset()
        return WidowXStatus.SUCCESS

    def _step_action(self, payload: dict[str, Any]) -> WidowXStatus:
        action = payload["action"]
        if not isinstance(action, np.ndarray) or action.shape not in ((7,), (5,)) or not np.isfinite(action).all():
            log.error("step_action with an invalid action %r", action)
            return WidowXStatus.EXECUTION_FAILURE
        self.arm.step(action)
        self.executed.append(action.astype(np.float64).copy())
        self.observe()  # the real env.step() ends with current_obs(), which the service discards: same cost
        return WidowXStatus.SUCCESS

    def _move(self, payload: dict[str, Any]) -> WidowXStatus:
        pose = payload["pose"]
        if not isinstance(pose, np.ndarray) or pose.shape not in ((6,), (4, 4)):
            return WidowXStatus.EXECUTION_FAILURE
        self.arm.move(pose.astype(np.float64))
        self.moves.append(pose.copy())
        if payload.get("blocking"):
            self._stop.wait(float(payload.get("duration", 1.0)))
        self._stop.wait(self.move_settle_s)  # _reset_previous_qpos sleeps 0.2 s after every move
        return WidowXStatus.SUCCESS

    def _gripper(self, payload: dict[str, Any]) -> WidowXStatus:
        self.arm.target_gripper = 1.0 if payload["open"] > 0.5 else 0.0
        return WidowXStatus.SUCCESS

    def _reboot(self, payload: dict[str, Any]) -> WidowXStatus:
        log.info("Experimental: Rebooting motor %s", payload["joint_name"])
        return WidowXStatus.SUCCESS

    def observe(self) -> dict[str, Any]:
        """The observation reply; the dummy noise frame before init, as the real service sends."""
        if self.arm is None:
            noise = np.random.default_rng().integers(0, 255, protocol.FULL_IMAGE_SHAPE, dtype=np.uint8)
            return {"image": noise, "state": {}, "full_image": noise}
        state = self.arm.state()
        full = self.camera.render(state)
        small = resize(full, self.image_size)
        return {
            "image": protocol.images_to_wire(small[None]),
            "state": state,
            "full_image": protocol.encode_full_image(full),
        }


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p + 1 (the unused PUB port) are free on `host` (for tests and rehearsal)."""

    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
        return True

    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port < 65535 and free(port) and free(port + 1):
            return port
    raise UserError(f"no free pair of ports on {host}")


def _kind_of(message: Any) -> str:
    kind = message.get("type") if isinstance(message, dict) else None
    return f"act:{message.get('key')}" if kind == "act" else str(kind)


# A pickle that would run `os.system("echo pwned")` if unpickled with pickle.loads (protocol 0 text).
MALICIOUS_PICKLE = b"cos\nsystem\n(S'echo pwned'\ntR."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=protocol.DEFAULT_PORT)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; '*' for every interface")
    parser.add_argument("--init-delay", type=float, default=0.0, help="seconds the first init takes (real: ~10)")
    parser.add_argument("--reset-delay", type=float, default=0.0, help="seconds a reset takes (real: a few)")
    parser.add_argument("--fault", choices=FAULT_KINDS, help="inject one fault")
    parser.add_argument("--fault-on", default="step_action", help="'obs' or an act key")
    parser.add_argument("--fault-at", type=int, default=0, help="0-based index of the request that faults")
    parser.add_argument("--fault-duration", type=float, default=2.0, help="silence / delay / downtime, seconds")
    parser.add_argument("--test", action="store_true", help="like the real --test: init answers NOT_INITIALIZED")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    fault = Fault(args.fault, args.fault_on, args.fault_at, args.fault_duration) if args.fault else None
    service = SimWidowXService(args.port, args.host, fault, args.init_delay, args.reset_delay,
                               testing=args.test, seed=args.seed)  # fmt: skip
    try:
        service.serve()
    except KeyboardInterrupt:
        log.info("stopped")


if __name__ == "__main__":
    from configs.errors import exit_on_user_error

    with exit_on_user_error():
        main()
