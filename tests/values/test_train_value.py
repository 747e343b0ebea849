"""End-to-end value learning: debug runs, exact resume, checkpoints, scoring, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from configs import CONFIG_DIR
from configs.checkpoint import list_checkpoints
from configs.errors import UserError
from configs.schema import register
from values.critic import load_critic
from values.train import train_value

pytestmark = pytest.mark.tf
REPO = Path(__file__).resolve().parents[2]


def cfg(data_dir: Path, run_root: Path, *overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(
            "train_value",
            overrides=["+experiment=debug", f"data.data_dir={data_dir}", f"run_root={run_root}", *overrides],
        )


def final_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:09d}" / "model.safetensors"))


def test_resume_is_exact(sim_data_dir: Path, tmp_path: Path) -> None:
    """2 steps, checkpoint, resume, 2 more == 4 uninterrupted steps (every tensor, bit for bit)."""
    straight = train_value(cfg(sim_data_dir, tmp_path, "name=straight", "steps=4"))
    train_value(cfg(sim_data_dir, tmp_path, "name=resumed", "steps=2"))
    resumed = train_value(cfg(sim_data_dir, tmp_path, "name=resumed", "steps=4"))
    a, b = final_state(straight, 4), final_state(resumed, 4)
    assert a.keys() == b.keys() and any(k.startswith("target.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a = torch.load(straight / "checkpoints" / "step_000000004" / "trainer_state.pt", weights_only=False)
    opt_b = torch.load(resumed / "checkpoints" / "step_000000004" / "trainer_state.pt", weights_only=False)
    assert opt_a["step"] == opt_b["step"] == 4
    for sa, sb in zip(opt_a["optimizer"]["state"].values(), opt_b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    log = (resumed / "log.txt").read_text()  # the resume and its longer run are in the run's own log
    assert "resumed from" in log and "step_000000002" in log and "steps: 2 -> 4" in log
    assert "numerics" not in log  # the same machine: nothing to warn about
    assert [e["step"] for e in json.loads((resumed / "environment.json").read_text())] == [0, 2]
    # and training actually changed the weights
    first = final_state(resumed, 2)
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith("critic."))


def test_checkpoint_contents_and_scoring(sim_data_dir: Path, tmp_path: Path) -> None:
    run = train_value(cfg(sim_data_dir, tmp_path, "name=ckpt", "steps=2"))
    ckpt = list_checkpoints(run)[-1]
    for name in ("config.yaml", "dataset_statistics.json", "language.json", "meta.json", "trainer_state.pt"):
        assert (ckpt / name).is_file(), name
    assert (run / "log.txt").read_text() and any((run / "tb").iterdir())
    scorer = load_critic(run)
    obs = {"image_primary": np.zeros((64, 64, 3), np.uint8), "instruction": "reach forward"}  # resized to 32
    actions = np.random.default_rng(0).uniform(-0.01, 0.01, (5, 7)).astype(np.float32)
    scores = scorer.score(obs, actions)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    # the same K actions scored one by one through the Critic contract agree with the batched score
    image = torch.as_tensor(obs["image_primary"])[None]
    lang = scorer.language.get("reach forward")[None]
    norm = scorer.normalizer.normalize(torch.as_tensor(actions))
    singles = torch.stack([scorer.q(image, lang, norm[k : k + 1]).min(0).values[0] for k in range(5)])
    torch.testing.assert_close(scores, singles, rtol=1e-5, atol=1e-5)


def test_iql_debug_run(sim_data_dir: Path, tmp_path: Path) -> None:
    run = train_value(cfg(sim_data_dir, tmp_path, "name=iql", "value=iql", "steps=2"))
    state = final_state(run, 2)
    assert any(k.startswith("value.") for k in state) and all(torch.isfinite(v).all() for v in state.values())


def test_shared_actor_encoder_debug_run_gives_a_critic_that_scores(sim_data_dir: Path, tmp_path: Path) -> None:
    """value.actor_encoder=critic: the checkpoint has no actor encoder, and steering loads its critic as any other."""
    run = train_value(cfg(sim_data_dir, tmp_path, "name=shared", "value.actor_encoder=critic", "steps=2"))
    state = final_state(run, 2)
    assert not any(k.startswith("actor.encoder") for k in state) and any(k.startswith("actor.mlp") for k in state)
    obs = {"image_primary": np.zeros((32, 32, 3), np.uint8), "instruction": "reach forward"}
    scores = load_critic(run).score(obs, np.zeros((3, 7), np.float32))
    assert scores.shape == (3,) and torch.isfinite(scores).all()


@pytest.mark.parametrize(
    "options",
    [
        ("value.proprio=true",),
        ("value.proprio=true", "value.actor_encoder=critic"),
        ("value.proprio=true", "value=iql"),
        ("value.proprio=true", "value=iql", "value.actor_encoder=critic"),
    ],
    ids=["calql", "calql-shared", "iql", "iql-shared"],
)
def test_a_proprio_critic_trains_and_scores_with_the_state(sim_data_dir: Path, tmp_path: Path, options) -> None:
    """value.proprio=true: the heads read the normalised state after the image features; the scorer
    normalises each observation's state with the checkpoint's "proprio" statistics, as the loader did."""
    run = train_value(cfg(sim_data_dir, tmp_path, "name=proprio", "steps=2", *options))
    state = final_state(run, 2)
    assert all(torch.isfinite(v).all() for v in state.values())
    scorer = load_critic(run)
    assert scorer.critic.encoder.proprio_dim == 7 and scorer.state_normalizer is not None
    features = scorer.critic.encoder.net.num_features
    assert state["critic.heads.weights.0"].shape[1] == features + 7 + 7  # features, state, action
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    raw = scorer.state_normalizer.unnormalize(rng.uniform(-0.9, 0.9, (2, 7)).astype(np.float32))
    actions = rng.uniform(-0.01, 0.01, (4, 7)).astype(np.float32)
    obs = [{"image_primary": image, "instruction": "reach forward", "state": s} for s in raw]
    scores = scorer.score_batch(obs, np.stack([actions, actions]))
    assert scores.shape == (2, 4) and not torch.allclose(scores[0], scores[1])  # the state changes Q
    # the Critic contract with the state normalised by hand gives the same scores
    lang = scorer.language.get("reach forward")[None].expand(4, -1)
    norm_actions = scorer.normalizer.normalize(torch.as_tensor(actions))
    for row, s in enumerate(raw):
        norm_state = torch.as_tensor(scorer.state_normalizer.normalize(s)).expand(4, -1)
        q = scorer.q(torch.as_tensor(image)[None].expand(4, -1, -1, -1), lang, norm_actions, norm_state)
        torch.testing.assert_close(scores[row], q.min(0).values, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match=r"value.proprio=true.*'state'"):
        scorer.score({"image_primary": image, "instruction": "reach forward"}, actions)


def test_bad_value_options_write_nothing(tmp_path: Path) -> None:
    for option, named in (("value.actor_encoder=shared", "actor_encoder"), ("value.algo=sac", "sac")):
        with pytest.raises(UserError, match=named):
            train_value(cfg(tmp_path / "no_data", tmp_path / "runs", option))
    assert not (tmp_path / "runs").exists()


def test_bad_runs_are_user_errors_that_write_nothing(sim_data_dir: Path, tmp_path: Path) -> None:
    """resume= without a checkpoint, batch_size=0, an unknown architecture: a message, nothing written; a
    run's name rerun with another algorithm: a message naming the mismatch, the run left as it was."""
    runs, empty = tmp_path / "runs", tmp_path / "empty"
    empty.mkdir()
    for options, named in (
        ([f"resume={empty}"], "no checkpoint there to resume from"),
        ([f"resume={tmp_path / 'nope'}"], "no checkpoint there to resume from"),
        (["batch_size=0"], "batch_size=0"),
        (["value.encoder.arch=resnet99"], "not a timm architecture"),
    ):
        with pytest.raises(UserError, match=named):
            train_value(cfg(sim_data_dir, runs, "name=bad", *options))
    assert not runs.exists() and not any(empty.iterdir())
    run = train_value(cfg(sim_data_dir, runs, "name=calql", "steps=2"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(UserError, match=r"step_000000002 does not fit the model this command builds .*config\.yaml"):
        train_value(cfg(sim_data_dir, runs, "name=calql", "value=iql", "steps=4"))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    # a damaged checkpoint (a partial copy): named, with the way back to the one before it
    weights = run / "checkpoints" / "step_000000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    for load in (lambda: train_value(cfg(sim_data_dir, runs, "name=calql", "steps=4")), lambda: load_critic(run)):
        with pytest.raises(UserError, match=r"Cannot read the checkpoint .*step_000000002 .*damaged or incomplete"):
            load()
    # an output directory that cannot be made: a message, not an OSError traceback
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"Cannot create the run directory .*choose a writable run_root"):
        train_value(cfg(sim_data_dir, tmp_path / "file", "name=x", "steps=2"))


def test_missing_bridge_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "tfds"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_value.py"), "data=bridge",
         f"data.data_dir={empty}", f"run_root={tmp_path}/runs"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bridge_dataset/1.0.0" in proc.stderr and "wget" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tfds"]


def test_compile_defaults_to_cuda_only_and_follows_an_explicit_choice() -> None:
    """train_value's `compile` is null by default: compiled on CUDA (1.7x the eager update on an H200) in
    the default NCHW layout, eager on the CPU; compile=true / false as given, on either device."""
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from values.train import use_compile

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        default = compose("train_value").compile
        on, off = (compose("train_value", overrides=[f"compile={v}"]).compile for v in ("true", "false"))
    assert (default, on, off) == (None, True, False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert (use_compile(default, cpu), use_compile(default, cuda)) == (False, True)
    assert (use_compile(on, cpu), use_compile(off, cuda)) == (True, False)
    # not by default in channels_last, where inductor crashed on an H200; on request still
    assert (use_compile(default, cuda, channels_last=True), use_compile(on, cuda, channels_last=True)) == (False, True)


def test_a_failing_torch_compile_is_a_message_that_names_compile_false(
    sim_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiler that fails at the first update (no C compiler, no Triton, an inductor bug) ends the run with
    a UserError naming compile=false, not inductor's traceback; nothing is checkpointed."""
    import values.train

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working C compiler found")

    real = values.train.compile_encoders
    monkeypatch.setattr(values.train, "compile_encoders", lambda agent: real(agent, backend=broken_backend))
    with pytest.raises(UserError, match=r"torch.compile of the value encoders failed.*no working C compiler") as err:
        train_value(cfg(sim_data_dir, tmp_path, "name=broken", "steps=2", "compile=true"))
    assert "compile=false" in str(err.value)
    run = tmp_path / "train_value" / "broken"
    assert run.is_dir() and not list(run.glob("checkpoints/step_*"))
    # the fix the message names works on the same run name
    assert train_value(cfg(sim_data_dir, tmp_path, "name=broken", "steps=2", "compile=false")) == run
    assert [c.name for c in list_checkpoints(run)] == ["step_000000002"]


def test_compiled_encoders_train_like_eager_ones_and_keep_checkpoint_keys() -> None:
    """train_value compile=true (compile_encoders, torch.compile in place; inductor's CPU backend here,
    tests/gpu has the CUDA one): the same updates as the eager agent, and the eager state-dict keys,
    so a compiled run's checkpoints load into an uncompiled critic."""
    from tests.values.helpers import small_value_config, value_batch
    from values.train import compile_encoders, make_agent

    def agent() -> torch.nn.Module:
        torch.manual_seed(0)
        return make_agent(small_value_config("calql", "resnet10t"), 32, 0.98, seed=3, channels_last=False)

    eager, compiled = agent(), agent()
    compile_encoders(compiled)
    assert all(getattr(net, "encoder", None) is None or net.encoder._compiled_call_impl for net in compiled.children())
    for step in range(2):
        batch = value_batch(8, 32, seed=step)
        m1, m2 = eager.update(batch), compiled.update(batch)
        for name in m1:
            assert m2[name] == pytest.approx(m1[name], rel=1e-3, abs=1e-4), name
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for key, value in eager.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-3, atol=1e-4)
