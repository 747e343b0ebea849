"""OctoPolicy's own logic on a stand-in OctoModel (JAX and Octo are not installed here).

The fake follows `OctoModel`'s interface (octo/model/octo_model.py): `create_tasks(texts=...)`,
`sample_actions(observations, tasks, ..., timestep_pad_mask, sample_shape=(K,), rng)` returning
normalised actions (K, batch, horizon, action_dim), `dataset_statistics`, `example_batch`, `config`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from configs.errors import UserError
from policies.octo import OctoPolicy, load_octo_model
from tests.serve.conftest import observation

MEAN = np.array([0.01, -0.02, 0.03, 0.0, 0.1, -0.1, 0.5], np.float32)
STD = np.array([0.1, 0.2, 0.3, 0.05, 0.05, 0.05, 1.0], np.float32)
MASK = np.array([True] * 6 + [False])


class FakeOcto:
    """Returns normalised actions drawn from the rng seed it is given (so equal keys give equal actions)."""

    def __init__(self, horizon: int = 4, action_dim: int = 7, window: int = 2, output: np.ndarray | None = None):
        self.horizon, self.action_dim, self.output = horizon, action_dim, output
        other = {"mean": np.zeros(7), "std": np.full(7, 2.0)}
        self.dataset_statistics = {
            "bridge_dataset": {"action": {"mean": MEAN, "std": STD, "mask": MASK}, "proprio": {}},
            "fractal20220817_data": {"action": other},
        }
        self.example_batch = {"observation": {"image_primary": np.zeros((1, window, 256, 256, 3), np.uint8)}}
        self.config = {"model": {"heads": {"action": {"kwargs": {"action_horizon": horizon}}}}}
        self.calls: list[dict[str, Any]] = []
        self.tasks_made: list[list[str]] = []

    def create_tasks(self, goals: Any = None, texts: list[str] | None = None) -> dict[str, Any]:
        self.tasks_made.append(list(texts))
        return {"language_instruction": list(texts)}

    def sample_actions(
        self, observations, tasks, unnormalization_statistics=None, timestep_pad_mask=None, sample_shape=(), rng=None,
        **kwargs,
    ):  # fmt: skip
        self.calls.append({"obs": observations, "tasks": tasks, "pad": timestep_pad_mask, "shape": sample_shape,
                           "rng": rng, "unnorm": unnormalization_statistics})  # fmt: skip
        batch = observations["image_primary"].shape[0]
        if self.output is not None:
            return np.broadcast_to(self.output, (*sample_shape, batch, self.horizon, self.action_dim))
        return np.random.default_rng(rng).normal(size=(*sample_shape, batch, self.horizon, self.action_dim))


class FakeOps:
    """OctoOps stand-in: the key is the seed itself; resizing is nearest-neighbour (and counted)."""

    def __init__(self) -> None:
        self.resized: list[tuple[int, ...]] = []

    def key(self, seed: int) -> int:
        return seed

    def resize(self, image: np.ndarray, size: int) -> np.ndarray:
        self.resized.append(image.shape)
        rows = np.arange(size) * image.shape[0] // size
        cols = np.arange(size) * image.shape[1] // size
        return image[rows][:, cols]


def octo(model: FakeOcto | None = None, **kwargs: Any) -> OctoPolicy:
    return OctoPolicy(model or FakeOcto(), ops=kwargs.pop("ops", FakeOps()), **kwargs)


def test_history_window_and_pad_mask_follow_octos_history_wrapper() -> None:
    model = FakeOcto()
    policy = octo(model)
    policy.reset("put the spoon on the towel")
    frames = [observation(i) for i in range(3)]
    for obs in frames:
        policy.sample_actions(obs, 3)
    first, second, third = model.calls
    # step 1: the first frame fills the window; the copy is padding
    np.testing.assert_array_equal(first["obs"]["image_primary"][0], [frames[0]["image_primary"]] * 2)
    np.testing.assert_array_equal(first["pad"], [[False, True]])
    np.testing.assert_array_equal(first["obs"]["timestep_pad_mask"], first["pad"])
    # step 2: [frame 0, frame 1], nothing padded; step 3: the window slides
    np.testing.assert_array_equal(second["obs"]["image_primary"][0][0], frames[0]["image_primary"])
    np.testing.assert_array_equal(second["pad"], [[True, True]])
    np.testing.assert_array_equal(third["obs"]["image_primary"][0], [f["image_primary"] for f in frames[1:]])
    assert first["obs"]["image_primary"].shape == (1, 2, 256, 256, 3)
    policy.reset("open the drawer")  # a new episode starts padded again
    policy.sample_actions(frames[2], 1)
    np.testing.assert_array_equal(model.calls[-1]["pad"], [[False, True]])
    np.testing.assert_array_equal(model.calls[-1]["obs"]["image_primary"][0], [frames[2]["image_primary"]] * 2)


def test_window_one_has_no_padding() -> None:
    model = FakeOcto()
    policy = octo(model, window=1)
    policy.reset("go")
    policy.sample_actions(observation(0), 2)
    assert model.calls[0]["obs"]["image_primary"].shape == (1, 1, 256, 256, 3)
    np.testing.assert_array_equal(model.calls[0]["pad"], [[True]])


def test_k_samples_in_one_call_chunked_and_canonical() -> None:
    model = FakeOcto()
    policy = octo(model)
    policy.reset("go")
    actions = policy.sample_actions(observation(0), 10)
    assert actions.shape == (10, 4, 7) and actions.dtype == np.float32
    assert len(model.calls) == 1 and model.calls[0]["shape"] == (10,)  # one transformer pass for K samples
    assert model.calls[0]["unnorm"] is None  # normalised from Octo; un-normalised here
    assert not np.allclose(actions[0], actions[1])  # K distinct samples
    assert ((actions[..., 6] >= 0) & (actions[..., 6] <= 1)).all()
    assert policy.act(observation(1)).shape == (4, 7)
    short = octo(FakeOcto(), chunk=2)
    short.reset("go")
    assert short.sample_actions(observation(0), 3).shape == (3, 2, 7)  # the first 2 of Octo's 4


def test_unnormalisation_uses_the_dataset_statistics_with_the_mask() -> None:
    normalised = np.array([[1.0, -1.0, 0.5, 2.0, 0.0, -2.0, 0.7, 9.0]], np.float32)  # 8-dim head: the 8th is cut
    policy = octo(FakeOcto(action_dim=8, output=normalised))
    policy.reset("go")
    actions = policy.sample_actions(observation(0), 2)
    expected = np.where(MASK, normalised[0, :7] * STD + MEAN, normalised[0, :7])  # gripper left as is: 0.7
    np.testing.assert_allclose(actions, np.broadcast_to(expected, (2, 4, 7)), rtol=1e-6)
    fractal = octo(FakeOcto(output=normalised[:, :7]), dataset="fractal20220817_data")  # no mask: all normalised
    fractal.reset("go")
    np.testing.assert_allclose(fractal.sample_actions(observation(0), 1)[0, 0, :6], normalised[0, :6] * 2.0)


def test_gripper_is_clipped_to_the_canonical_range() -> None:
    policy = octo(FakeOcto(output=np.array([0, 0, 0, 0, 0, 0, 1.3], np.float32)))
    policy.reset("go")
    assert (policy.sample_actions(observation(0), 1)[..., 6] == 1.0).all()  # Bridge: 1 = open, as ours


def test_act_ensembles_the_chunks_before_clipping_the_gripper() -> None:
    """Octo's TemporalEnsembleWrapper averages the raw predictions; the clip comes after (mean(1.6, 0.2) = 0.9)."""

    class Alternating(FakeOcto):
        def sample_actions(self, observations, tasks, **kwargs):
            grip = 1.6 if len(self.calls) % 2 == 0 else 0.2
            self.calls.append(kwargs)
            return np.broadcast_to(np.array([0, 0, 0, 0, 0, 0, grip], np.float32), (1, 1, 4, 7))

    policy = octo(Alternating())
    policy.reset("go")
    grippers = [float(policy.act(observation(t))[0, 6]) for t in range(4)]  # row 0 is executed
    np.testing.assert_allclose(grippers, [1.0, 0.9, 1.0, 0.9], rtol=1e-6)  # clipped first: 1, 0.6, 0.73, 0.6


def test_dataset_statistics_errors_name_the_choices() -> None:
    with pytest.raises(UserError, match=r"policy.dataset='bridge'.*bridge_dataset, fractal20220817_data"):
        octo(dataset="bridge")
    single = FakeOcto()
    single.dataset_statistics = {"action": {"mean": MEAN, "std": STD}}  # a fine-tuned model: one dataset
    np.testing.assert_array_equal(octo(single).stats["mask"], np.ones(7, bool))
    single.dataset_statistics = {"action": {"mean": MEAN[:6], "std": STD[:6]}}
    with pytest.raises(UserError, match="not 7-dimensional"):
        octo(single)


def test_window_and_chunk_must_fit_the_checkpoint() -> None:
    with pytest.raises(UserError, match=r"policy\.window=3"):
        octo(window=3)
    with pytest.raises(UserError, match=r"policy\.chunk=5.*predicts 4"):
        octo(chunk=5)


def test_images_are_resized_to_256_only_when_needed() -> None:
    ops, model = FakeOps(), FakeOcto()
    policy = octo(model, ops=ops)
    policy.reset("go")
    policy.sample_actions(observation(0), 1)
    assert ops.resized == []
    policy.sample_actions(observation(1, size=480), 1)
    assert ops.resized == [(480, 480, 3)] and model.calls[-1]["obs"]["image_primary"].shape == (1, 2, 256, 256, 3)


def test_tasks_are_made_once_per_instruction() -> None:
    model = FakeOcto()
    policy = octo(model)
    policy.reset("put the spoon on the towel")
    for i in range(3):
        policy.sample_actions(observation(i), 1)
    policy.sample_actions(observation(3, instruction="open the drawer"), 1)
    assert model.tasks_made == [["put the spoon on the towel"], ["open the drawer"]]
    assert model.calls[-1]["tasks"] == {"language_instruction": ["open the drawer"]}


def test_slots_have_their_own_history_and_noise() -> None:
    a, b = octo(), octo()
    for policy in (a, b):
        policy.reset("go", 0)
        policy.reset("go", 1)
    first_a = a.sample_actions(observation(0), 2, slot=0)
    b.sample_actions(observation(5), 2, slot=1)  # slot 1 steps only in b
    np.testing.assert_array_equal(first_a, b.sample_actions(observation(0), 2, slot=0))
    np.testing.assert_array_equal(a.sample_actions(observation(1), 2, slot=0), b.sample_actions(observation(1), 2, 0))


def test_bad_observations_fail_before_the_history_changes() -> None:
    policy = octo()
    with pytest.raises(UserError, match="No instruction for slot 0"):
        policy.sample_actions({"image_primary": observation(0)["image_primary"]}, 1)
    with pytest.raises(UserError, match="uint8"):
        policy.sample_actions({"image_primary": np.zeros((256, 256, 3), np.float32), "instruction": "go"}, 1)
    with pytest.raises(UserError, match="k=0"):
        policy.sample_actions(observation(0), 0)


def test_loading_without_octo_explains_the_two_environments() -> None:
    with pytest.raises(UserError, match=r"Octo is not importable.*own environment.*serve_policy.py.*PyPI"):
        load_octo_model("hf://rail-berkeley/octo-small-1.5")


def test_octo_served_and_steered_over_the_wire(serve, connect) -> None:
    """The whole route of docs/serving.md with the stand-in model: server -> RemotePolicy -> K candidates."""
    client = connect(serve(lambda: octo(FakeOcto())))
    assert client.chunk == 4
    client.reset("put the spoon on the towel", 0)
    candidates = client.sample_actions_batch([observation(0), observation(1)], 10, [0, 1])
    assert candidates.shape == (2, 10, 4, 7)
    local = octo(FakeOcto())
    local.reset("put the spoon on the towel", 0)
    np.testing.assert_allclose(candidates[0], local.sample_actions(observation(0), 10), rtol=1e-6)
