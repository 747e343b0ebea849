"""A real policy server on loopback: round trips, openpi compatibility, bad inputs, clients, timeouts."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from policies.base import RandomPolicy
from policies.remote import EXTENSION, RemotePolicy, RemotePolicyError, RemotePolicyTimeout, packb
from tests.serve.conftest import EchoPolicy, observation


def test_remote_equals_the_local_policy_on_the_same_seed(serve, connect) -> None:
    local, remote = RandomPolicy(chunk=4, seed=3), connect(serve(lambda: RandomPolicy(chunk=4, seed=3)))
    obs = [observation(i) for i in range(3)]
    for policy in (local, remote):
        policy.reset("put the spoon on the towel", 0)
        policy.reset("open the drawer", 1)
    np.testing.assert_array_equal(remote.sample_actions(obs[0], 10), local.sample_actions(obs[0], 10))
    np.testing.assert_array_equal(remote.act(obs[1], 1), local.act(obs[1], 1))
    batch = remote.sample_actions_batch(obs[:2], 5, [0, 1])
    np.testing.assert_array_equal(batch, local.sample_actions_batch(obs[:2], 5, [0, 1]))
    np.testing.assert_array_equal(remote.act_batch(obs[1:], [1, 0]), local.act_batch(obs[1:], [1, 0]))
    assert remote.chunk == 4 and batch.shape == (2, 5, 4, 7) and batch.dtype == np.float32
    assert batch.flags.writeable  # a copy, not the read-only wire buffer


def test_sample_shapes_slots_and_resets_reach_the_policy(serve, connect) -> None:
    client = connect(serve(EchoPolicy))
    client.reset("abc", slot=3)
    obs = observation(0, instruction="abc")
    out = client.sample_actions(obs, np.int64(7), slot=np.int64(3))  # NumPy integers are sent as ints
    assert out.shape == (7, 2, 7)
    np.testing.assert_allclose(out[0, 0, :4], [1, obs["state"][0], 3, 3])
    batch = client.sample_actions_batch([obs, observation(1, instruction="wxyz")], 3, [3, 5])
    assert batch.shape == (2, 3, 2, 7) and (batch[1, ..., 2] == 4).all() and (batch[1, ..., 3] == 5).all()


def test_metadata_frame_and_server_timing(serve, raw) -> None:
    conn = raw(serve(EchoPolicy, max_size=1_234_567))
    meta = conn.metadata
    assert meta["server"] == "robosteer" and meta["chunk"] == 2 and meta["action_dim"] == 7
    assert meta["max_size"] == 1_234_567 and "sample_actions" in meta["methods"] and meta["extension"] == EXTENSION
    first = conn.ask(observation(0))
    second = conn.ask(observation(1))
    assert first["server_timing"]["infer_ms"] >= 0 and "prev_total_ms" not in first["server_timing"]
    assert second["server_timing"]["prev_total_ms"] >= 0  # the previous request's total time


def test_openpi_style_requests_act_on_slot_0_and_follow_the_prompt(serve, raw) -> None:
    """What openpi's WebsocketClientPolicy.infer sends: a bare observation, no reset ever."""
    conn = raw(serve(EchoPolicy))
    obs = {"image_primary": observation(0)["image_primary"], "prompt": "pick up the can"}
    reply = conn.ask(obs)
    assert set(reply) == {"actions", "server_timing"} and reply["actions"].shape == (2, 7)
    np.testing.assert_allclose(reply["actions"][0, :4], [1, -1, len("pick up the can"), 0])
    reply = conn.ask({**obs, "prompt": "go"})  # a new instruction resets the slot with it
    assert reply["actions"][0, 2] == 2


def test_a_port_that_cannot_be_served_is_a_user_error(serve) -> None:
    from configs.errors import UserError
    from policies.server import PolicyServer

    busy = serve()  # holds its port
    with pytest.raises(UserError, match=rf"Cannot serve on 127.0.0.1:{busy.port} \(.+\).*choose another port="):
        PolicyServer(lambda: RandomPolicy(chunk=4), host="127.0.0.1", port=busy.port).listen()
    with pytest.raises(UserError, match=r"port=-5: choose a TCP port in 1\.\.65535"):
        PolicyServer(lambda: RandomPolicy(chunk=4), host="127.0.0.1", port=-5).listen()


def test_healthz_answers_200_without_a_websocket(serve) -> None:
    server = serve(api_key="s3cret")  # health checks need no key
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"OK\n"
    conn.close()


def _ext(method: str = "sample_actions", request_id: int = 1, **fields) -> dict:
    return {EXTENSION: {"method": method, "id": request_id, "slot": 0, "k": 2, **fields}}


def _good(conn) -> None:
    reply = conn.ask({**observation(9, size=64), **_ext(request_id=99)})
    assert reply[EXTENSION] == {"id": 99} and reply["actions"].shape == (2, 2, 7)


image = observation(0)["image_primary"]
BAD_REQUESTS = {
    "missing image": ({"state": np.zeros(7, np.float32), **_ext()}, "no 'image_primary'"),
    "float image": ({"image_primary": image.astype(np.float32), **_ext()}, "uint8"),
    "gray image": ({"image_primary": image[..., 0], **_ext()}, r"\(H, W, 3\)"),
    "RGBA image": ({"image_primary": np.zeros((8, 8, 4), np.uint8), **_ext()}, r"\(H, W, 3\)"),
    "image as list": ({"image_primary": [[1, 2, 3]], **_ext()}, "uint8 array"),
    "short state": ({"image_primary": image, "state": np.zeros(6, np.float32), **_ext()}, r"'state'.*\(7,\)"),
    "integer state": ({"image_primary": image, "state": np.zeros(7, np.int32), **_ext()}, "'state'"),
    "NaN state": ({"image_primary": image, "state": np.full(7, np.nan, np.float32), **_ext()}, "NaN"),
    "instruction not str": ({"image_primary": image, "instruction": 5, **_ext()}, "'instruction'"),
    "k = 0": ({"image_primary": image, **_ext(k=0)}, "k=0"),
    "k too large": ({"image_primary": image, **_ext(k=10**6)}, "max_k"),
    "k as string": ({"image_primary": image, **_ext(k="3")}, "k='3'"),
    "negative slot": ({"image_primary": image, **_ext(slot=-1)}, "slot=-1"),
    "unknown method": ({"image_primary": image, **_ext("explode")}, "unknown method 'explode'"),
    "batch length mismatch": ({"observations": [observation(0)], **_ext("act_batch", slots=[0, 1])}, "equal length"),
    "batch with bad obs": ({"observations": [{"state": 1}], **_ext("act_batch", slots=[0])}, r"observations\[0\]"),
    "reset without text": (_ext("reset"), "instruction"),
    "reset with a text seed": (_ext("reset", instruction="go", seed="7"), "seed='7'"),
    "reset with a negative seed": (_ext("reset", instruction="go", seed=-1), "seed=-1"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_an_error_reply_and_the_server_goes_on(serve, raw, case: str) -> None:
    message, match = BAD_REQUESTS[case]
    conn = raw(serve(EchoPolicy))
    reply = conn.ask(message)
    error = reply[EXTENSION]
    assert error["id"] == 1 and error["kind"] == "bad_request" and "actions" not in reply
    assert re.search(match, error["error"]), error["error"]
    _good(conn)


UNTIED_REQUESTS = {
    "garbage bytes": (b"\xc1\xc1 definitely not msgpack", "not a valid message"),
    "text frame": ("hello, server", "text frame"),
    "not a map": (packb([1, 2, 3]), "a request is a map"),
    "object array": (  # raw pointers: refused when decoding, before any array is built
        msgpack.packb({"image_primary": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}),
        "cannot cross the wire",
    ),
    "extension without id": ({"image_primary": image, EXTENSION: {"method": "act"}}, "integer `id`"),
    "openpi request without image": ({"prompt": "go"}, "no 'image_primary'"),
}


@pytest.mark.parametrize("case", list(UNTIED_REQUESTS))
def test_an_unreadable_request_gets_a_text_error_and_the_server_goes_on(serve, raw, case: str) -> None:
    """No request id can be read: the error is a text frame, as openpi's server sends them."""
    message, match = UNTIED_REQUESTS[case]
    conn = raw(serve(EchoPolicy))
    reply = conn.ask(message)
    assert isinstance(reply, str) and match in reply and reply.startswith("bad_request")
    _good(conn)


def test_oversized_messages(serve, raw) -> None:
    server = serve(EchoPolicy, max_size=100_000)
    conn = raw(server)
    big = {"image_primary": np.zeros((200, 200, 3), np.uint8), **_ext()}  # 120 kB
    reply = conn.ask(big)
    assert isinstance(reply, str) and "max_size=100000" in reply
    _good(conn)
    # over twice max_size websockets does not read it: that connection closes (1009) ...
    from websockets.exceptions import ConnectionClosed

    conn.send({"image_primary": np.zeros((300, 300, 3), np.uint8), **_ext()})  # 270 kB
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    _good(raw(server))  # ... and the server serves the next one


def test_the_client_refuses_oversized_requests_before_sending(serve, connect) -> None:
    client = connect(serve(EchoPolicy, max_size=50_000))
    with pytest.raises(RemotePolicyError, match="exceeds the server's max_size=50000"):
        client.sample_actions(observation(0), 2)
    assert client.sample_actions(observation(0, size=64), 2).shape == (2, 2, 7)


def test_policy_errors_reach_the_client_and_the_connection_goes_on(serve, connect) -> None:
    client = connect(serve(lambda: EchoPolicy(fail_on="break")))
    client.reset("break", 0)
    with pytest.raises(RemotePolicyError, match=r"policy_error.*RuntimeError: policy failure on 'break'") as err:
        client.sample_actions(observation(0, instruction="break"), 2)
    assert err.value.kind == "policy_error"
    with pytest.raises(RemotePolicyError, match=r"bad_request.*image_primary"):
        client.act({"instruction": "fine"})
    client.reset("fine", 0)
    assert client.act(observation(0, instruction="fine")).shape == (2, 7)


def test_a_late_reply_is_never_taken_as_the_next_answer(serve, connect) -> None:
    """Call 1 is answered after 0.8 s; the client gave up at 0.3 s; call 2 must get reply 2, not reply 1."""
    client = connect(serve(lambda: EchoPolicy(delays={1: 0.8})), timeout_s=0.3)
    client.reset("go", 0)
    obs = observation(0, instruction="go")
    start = time.monotonic()
    with pytest.raises(RemotePolicyTimeout, match="did not answer sample_actions"):
        client.sample_actions(obs, 2)
    assert time.monotonic() - start < 0.7
    client.timeout_s = 5.0
    assert client.sample_actions(obs, 3)[0, 0, 0] == 2  # call 2's reply (reply 1, with 1s, was discarded)
    assert client.act(obs)[0, 0] == 3


def test_each_connection_has_its_own_policy_and_clients_run_concurrently(serve, connect) -> None:
    server = serve(lambda: EchoPolicy(delays=dict.fromkeys(range(1, 100), 0.002)))
    clients = [connect(server), connect(server)]
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        clients[i].reset("x" * (i + 3), 0)
        barrier.wait()
        for step in range(20):
            obs = observation(step, instruction="x" * (i + 3))
            obs["state"][0] = 100 * i + step
            results[i].append(clients[i].sample_actions(obs, 2))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    for i in range(2):
        got = np.stack(results[i])[:, 0, 0]  # (20, 7) first action of each reply
        np.testing.assert_array_equal(got[:, 0], np.arange(1, 21))  # this connection's own call counter
        np.testing.assert_array_equal(got[:, 1], 100 * i + np.arange(20))  # its own observations
        assert (got[:, 2] == i + 3).all()  # its own instruction


def test_max_clients_api_key_and_missing_servers(serve, connect) -> None:
    server = serve(EchoPolicy, max_clients=1, api_key="s3cret")
    with pytest.raises(RemotePolicyError, match="API key was refused"):
        connect(server)
    first = connect(server, api_key="s3cret")
    with pytest.raises(RemotePolicyError, match="max_clients=1"):
        connect(server, api_key="s3cret")
    first.close()
    deadline = time.monotonic() + 5
    while True:  # the server notices the closed connection shortly after
        try:
            assert connect(server, api_key="s3cret").chunk == 2
            break
        except RemotePolicyError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    with pytest.raises(RemotePolicyError, match=r"No policy server answers.*serve_policy.py"):
        RemotePolicy("127.0.0.1", free, connect_timeout_s=0.3)


def test_a_server_that_is_not_robosteers_is_named(serve) -> None:
    """An openpi server sends its own metadata (no sample_actions extension): refuse it clearly."""
    from websockets.sync.server import serve as ws_serve

    with ws_serve(lambda ws: (ws.send(packb({})), ws.recv()), "127.0.0.1", 0) as other:
        thread = threading.Thread(target=other.serve_forever, daemon=True)
        thread.start()
        with pytest.raises(RemotePolicyError, match="not a robosteer policy server"):
            RemotePolicy("127.0.0.1", other.socket.getsockname()[1], connect_timeout_s=2)
        other.shutdown()


@pytest.mark.parametrize("name", ["flow", "vla"])
def test_a_tiny_learned_policy_is_the_same_over_the_wire(serve, connect, name: str, tmp_path) -> None:
    """The project's own policies (tiny random checkpoints) served: same seed -> the same candidates."""
    import torch

    from policies.base import make_policy
    from tests.policies.conftest import contract_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = contract_config(name, tmp_path)
        local, remote = make_policy(cfg), connect(serve(lambda: make_policy(cfg)))
        obs = [observation(i, size=48) for i in range(2)]
        for policy in (local, remote):
            policy.reset("put the spoon on the towel", 0)
            policy.reset("open the drawer", 1)
        expected = local.sample_actions_batch(obs, 4, [0, 1])
        np.testing.assert_allclose(remote.sample_actions_batch(obs, 4, [0, 1]), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(remote.act(obs[0]), local.act(obs[0]), rtol=1e-6, atol=1e-7)
    finally:
        torch.set_num_threads(threads)


def test_a_policy_that_cannot_be_built_closes_only_that_connection(serve, connect) -> None:
    built = iter([True, False, True])  # the spare at start-up, then a failure, then a good one

    def factory() -> EchoPolicy:
        if not next(built):
            raise OSError("checkpoint vanished")
        return EchoPolicy()

    server = serve(factory)
    assert connect(server).chunk == 2  # takes the spare
    with pytest.raises(RemotePolicyError, match="could not build its policy: OSError"):
        connect(server)
    assert connect(server).sample_actions(observation(0), 1).shape == (1, 2, 7)


def test_a_frozen_server_times_out_and_the_client_closes_within_a_second() -> None:
    """serve_policy.py stopped with SIGSTOP (a hung machine): the request times out after policy.timeout_s and
    closing the connection does not wait for a close handshake that never comes (websockets' default: 10 s)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    command = [sys.executable, "serve_policy.py", "policy=random", "policy.chunk=2", "host=127.0.0.1", f"port={port}"]
    server = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = RemotePolicy("127.0.0.1", port, timeout_s=1.0, connect_timeout_s=60)
        client.reset("go")
        assert client.act(observation(0, instruction="go")).shape == (2, 7)
        server.send_signal(signal.SIGSTOP)
        with pytest.raises(RemotePolicyTimeout):
            client.act(observation(1, instruction="go"))
        start = time.monotonic()
        client.close()
        assert time.monotonic() - start < 3.0
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)
