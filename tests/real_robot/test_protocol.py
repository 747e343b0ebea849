"""Wire format facts of the WidowX service (bridge_data_robot + edgeml), and the light-import rule."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import lz4.frame
import numpy as np
import pytest
import zmq

from real_robot import protocol
from real_robot.client import RobotConnectionError, WidowXClient
from real_robot.protocol import HandshakeError, NotInitializedError, ProtocolError, WidowXStatus
from real_robot.sim_service import free_port_pair
from tests.real_robot.conftest import IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]

# The reference's default ActionConfig JSON, character for character (shared/reference/sim_robot.md).
DEFAULT_CONFIG_JSON = (
    '{"port_number":5556,"action_keys":["init","move","gripper","reset","step_action","reboot_motor"],'
    '"observation_keys":["image","state","full_image"],"broadcast_port":5557,"version":"0.0.1"}'
)


def test_handshake_json_and_hash_match_the_reference() -> None:
    assert protocol.action_config_json(5556) == DEFAULT_CONFIG_JSON
    assert protocol.action_config_json(6000) == DEFAULT_CONFIG_JSON.replace("5556", "6000").replace("5557", "6001")
    # edgeml compute_hash: md5 of the pickled string
    assert protocol.config_hash(DEFAULT_CONFIG_JSON) == hashlib.md5(pickle.dumps(DEFAULT_CONFIG_JSON, 4)).hexdigest()
    protocol.check_config(DEFAULT_CONFIG_JSON, 5556)
    with pytest.raises(HandshakeError, match=r"robot\.port"):
        protocol.check_config(DEFAULT_CONFIG_JSON, 6000)


def test_status_codes() -> None:
    assert [(s.name, int(s)) for s in WidowXStatus] == [
        ("NO_CONNECTION", 0), ("SUCCESS", 1), ("EXECUTION_FAILURE", 2), ("NOT_INITIALIZED", 3),
    ]  # fmt: skip
    assert protocol.status_of({"status": 2}) is WidowXStatus.EXECUTION_FAILURE
    for bad in ({"status": 7}, {"success": False, "message": "Invalid payload"}, None, {"status": 1.0}):
        with pytest.raises(ProtocolError):
            protocol.status_of(bad)


def test_requests_are_what_the_service_reads() -> None:
    """The service does pickle.loads(lz4.frame.decompress(msg)), then payload["action"].shape etc."""
    obs = pickle.loads(lz4.frame.decompress(protocol.encode(protocol.obs_request())))
    assert obs == {"type": "obs", "keys": {"image", "state", "full_image"}}
    step = pickle.loads(lz4.frame.decompress(protocol.encode(
        protocol.act_request("step_action", {"action": np.arange(7.0), "blocking": False})
    )))  # fmt: skip
    assert step["type"] == "act" and step["key"] == "step_action" and step["payload"]["blocking"] is False
    assert step["payload"]["action"].shape == (7,)  # the service calls action.shape and np.clip on it
    with pytest.raises(ValueError, match="unknown action key"):
        protocol.act_request("teleport", {})
    assert pickle.loads(lz4.frame.decompress(protocol.encode({"x": 1})))["x"] == 1


def test_observation_layout_round_trip() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    wire = protocol.images_to_wire(images)
    assert wire.shape == (2, 3 * IMAGE_SIZE * IMAGE_SIZE) and wire.dtype == np.float32
    # CHW flattened: the first S*S values are the red channel of camera 0, row by row
    np.testing.assert_array_equal(wire[0, : IMAGE_SIZE * IMAGE_SIZE], images[0, :, :, 0].ravel() / np.float32(255))
    np.testing.assert_array_equal(protocol.wire_to_images(wire, IMAGE_SIZE), images)  # exact
    reply = {"image": wire, "state": np.arange(7, dtype=np.float64), "full_image": b"jpeg"}
    obs = protocol.parse_observation(reply)  # size inferred
    assert obs.images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and obs.state.dtype == np.float32
    with pytest.raises(ProtocolError, match=r"robot\.image_size"):
        protocol.parse_observation(reply, image_size=16)
    with pytest.raises(NotInitializedError, match="not initialised"):
        protocol.parse_observation({"image": images[0], "state": {}, "full_image": images[0]})
    for bad in ({"image": wire, "state": np.full(7, np.nan)}, {"image": wire.astype(np.float64), "state": np.zeros(7)},
                {"image": wire, "state": np.zeros(6)}, ["not", "a", "dict"]):  # fmt: skip
        with pytest.raises(ProtocolError):
            protocol.parse_observation(bad)


def test_full_image_channels_follow_cv2() -> None:
    """The service JPEG-encodes the RGB array with cv2 (as if BGR): decoding must give back RGB."""
    from PIL import Image

    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    jpeg = protocol.encode_full_image(rgb)
    with Image.open(__import__("io").BytesIO(jpeg)) as img:
        standard = np.asarray(img.convert("RGB"))
    assert standard[..., 2].mean() > 150 and standard[..., 0].mean() < 50  # a standard decoder sees blue
    assert np.abs(protocol.decode_full_image(jpeg).astype(int) - rgb).max() < 8


def _fake_service(port: int, reply: object, stop: threading.Event) -> None:
    """A REP socket that answers every request with `reply` (a service with another config)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(50):
            sock.recv()
            sock.send(protocol.encode(reply))
    sock.close()
    ctx.term()


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        ({"success": True, "payload": DEFAULT_CONFIG_JSON.replace("0.0.1", "0.0.2")}, HandshakeError, "incompatible"),
        ({"success": True, "payload": json.dumps({"port_number": 1})}, HandshakeError, "hash mismatch"),
        ({"success": False, "message": "Invalid payload"}, ProtocolError, "handshake"),
    ],
)
def test_handshake_mismatch_raises_a_clear_error(reply: dict, error: type, match: str) -> None:
    port = free_port_pair()
    if reply.get("payload") == DEFAULT_CONFIG_JSON.replace("0.0.1", "0.0.2"):
        reply = {**reply, "payload": reply["payload"].replace("5556", str(port)).replace("5557", str(port + 1))}
    stop = threading.Event()
    thread = threading.Thread(target=_fake_service, args=(port, reply, stop), daemon=True)
    thread.start()
    try:
        with pytest.raises(error, match=match):
            WidowXClient("127.0.0.1", port, timeout_ms=300)
    finally:
        stop.set()
        thread.join()


def test_no_service_gives_a_clear_error() -> None:
    with pytest.raises(RobotConnectionError, match=r"No WidowX service answers.*robot.host"):
        WidowXClient("127.0.0.1", free_port_pair(), timeout_ms=100, connect_timeout_s=0.3)


def test_client_and_safety_import_light() -> None:
    """DESIGN.md light imports: numpy, pyzmq, lz4 and the standard library only; no torch, no TensorFlow."""
    code = (
        "import sys\nimport real_robot.client, real_robot.protocol, real_robot.safety, real_robot.sim_service\n"
        "allowed = set(sys.stdlib_module_names) | {'numpy', 'zmq', 'lz4', 'configs', 'real_robot', 'cython_runtime'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if not m.startswith('_')} - allowed))"
    )  # names starting with "_" are interpreter/extension internals (cython runtimes, the editable finder,
    # the CPU-torchvision import hook of .ci/site)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"heavy modules imported: {out.stdout}"
