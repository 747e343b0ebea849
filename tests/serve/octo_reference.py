"""Octo's own code on a tiny random Octo checkpoint: runs in OCTO's environment, not robosteer's.

Used by tests/serve/test_octo_parity.py (its docstring has the set-up). Two commands:

    python octo_reference.py build DIR
        writes a tiny random checkpoint with octo-small-1.5's layout (primary 256 px and wrist 128 px
        SmallStem16 tokenizers, a T5 language encoder, a diffusion action head, window 2, horizon 4)
        through `OctoModel.from_config(...).save_pretrained(...)`, so `load_pretrained` reads it.
    python octo_reference.py expect REQUEST.npz OUT.npz
        what Octo's own evaluation stack gives for the request's episodes: Octo's gym wrappers
        (ResizeImageWrapper, HistoryWrapper, TemporalEnsembleWrapper) around a replay of the images,
        `create_tasks(texts=...)`, and `sample_actions(..., unnormalization_statistics=...)` with the
        request's PRNG seeds; and, at each episode's first step, how much the actions move when every pixel
        is one level brighter or the pad mask says no padding.

Only numpy, JAX, TensorFlow, transformers (Flax) and Octo are imported: never robosteer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

WORDS = ["put", "pick", "up", "the", "a", "cube", "spoon", "on", "towel", "red", "green", "bin", "open", "drawer"]
MEAN = [0.0005, 0.0001, -0.0002, 0.0001, -0.0003, 0.0002, 0.58]  # Bridge-like action statistics
TEXT = "language_instruction"
STD = [0.0097, 0.0137, 0.0127, 0.0285, 0.0307, 0.0769, 0.4971]


def build(out: Path) -> None:
    import jax
    from octo.data.utils.text_processing import HFTokenizer
    from octo.model.components.action_heads import DiffusionActionHead
    from octo.model.components.tokenizers import ImageTokenizer, LanguageTokenizer
    from octo.model.components.transformer import common_transformer_sizes
    from octo.model.components.vit_encoders import SmallStem16
    from octo.model.octo_model import OctoModel
    from octo.utils.spec import ModuleSpec
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config

    # A tiny T5 encoder and a word-level tokenizer, saved where `AutoConfig` / `AutoTokenizer` read them
    # (Octo's LanguageTokenizer picks FlaxT5EncoderModel when "t5" is in the name).
    text_dir = out.parent / f"{out.name}-tiny-t5"
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    inputs = ["input_ids", "attention_mask"]  # no token_type_ids: the T5 encoder does not take them
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", model_input_names=inputs
    )
    fast.save_pretrained(text_dir)
    T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).save_pretrained(text_dir)

    embedding, transformer = common_transformer_sizes("dummy")
    model = {
        "observation_tokenizers": {
            name: ModuleSpec.create(
                ImageTokenizer, obs_stack_keys=[key], task_stack_keys=[key], encoder=ModuleSpec.create(SmallStem16)
            )
            for name, key in (("primary", "image_primary"), ("wrist", "image_wrist"))
        },
        "task_tokenizers": {"language": ModuleSpec.create(LanguageTokenizer, encoder=str(text_dir))},
        "heads": {
            "action": ModuleSpec.create(
                DiffusionActionHead,
                readout_key="readout_action",
                use_map=False,
                action_horizon=4,
                action_dim=7,
                n_diffusion_samples=1,
                dropout_rate=0.0,
            )
        },
        "readouts": {"action": 1},
        "repeat_task_tokens": True,
        "token_embedding_size": embedding,
        "transformer_kwargs": transformer,
        "max_horizon": 10,
        "use_correct_attention": True,
    }
    text_processor = ModuleSpec.create(
        HFTokenizer,
        tokenizer_name=str(text_dir),
        encode_with_model=False,
        tokenizer_kwargs={"max_length": 16, "padding": "max_length", "truncation": True, "return_tensors": "np"},
    )
    config = {"model": model, "text_processor": text_processor, "window_size": 2}

    window, ones, zeros = 2, np.ones((1, 2), bool), np.zeros((1, 2), np.int32)
    example_batch = {
        "observation": {
            "image_primary": np.zeros((1, window, 256, 256, 3), np.uint8),
            "image_wrist": np.zeros((1, window, 128, 128, 3), np.uint8),
            "timestep": zeros,
            "timestep_pad_mask": ones,
            "task_completed": np.zeros((1, window, 4), bool),
            "pad_mask_dict": {"image_primary": ones, "image_wrist": ones, "timestep": ones},
        },
        "task": {
            "image_primary": np.zeros((1, 256, 256, 3), np.uint8),
            "image_wrist": np.zeros((1, 128, 128, 3), np.uint8),
            "timestep": np.zeros((1,), np.int32),
            TEXT: {"input_ids": np.zeros((1, 16), np.int32), "attention_mask": np.ones((1, 16), np.int32)},
            "pad_mask_dict": {k: np.ones((1,), bool) for k in ("image_primary", "image_wrist", "timestep", TEXT)},
        },
        "action": np.zeros((1, window, 4, 7), np.float32),
    }
    action_stats = {
        "mean": np.array(MEAN), "std": np.array(STD), "mask": np.array([True] * 6 + [False]),
        "min": np.full(7, -1.0), "max": np.full(7, 1.0), "p01": np.full(7, -0.5), "p99": np.full(7, 0.5),
    }  # fmt: skip
    statistics = {
        "bridge_dataset": {"action": action_stats, "num_transitions": np.array(1000), "num_trajectories": np.array(10)},
        "other_dataset": {"action": {**action_stats, "mean": np.zeros(7), "std": np.full(7, 2.0)}},
    }
    processor = ModuleSpec.instantiate(text_processor)()
    rng = jax.random.PRNGKey(7)
    octo = OctoModel.from_config(config, example_batch, processor, rng=rng, dataset_statistics=statistics)
    octo.save_pretrained(step=0, checkpoint_path=str(out.resolve()))


def replay_env(images: np.ndarray):
    """A gym environment that replays `images` and records the actions it is given (Octo's wrappers wrap it)."""
    import gym

    class Replay(gym.Env):
        def __init__(self) -> None:
            h, w = images.shape[1:3]
            self.observation_space = gym.spaces.Dict({"image_primary": gym.spaces.Box(0, 255, (h, w, 3), np.uint8)})
            self.action_space = gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)
            self.t, self.executed = 0, []

        def reset(self, **kwargs):
            self.t = 0
            return {"image_primary": images[0].copy()}, {}

        def step(self, action):
            self.executed.append(np.asarray(action, np.float64))
            self.t += 1
            return {"image_primary": images[min(self.t, len(images) - 1)].copy()}, 0.0, False, False, {}

    return Replay()


def expect(request: Path, out: Path) -> None:
    import jax
    from octo.model.octo_model import OctoModel
    from octo.utils.gym_wrappers import HistoryWrapper, ResizeImageWrapper, TemporalEnsembleWrapper

    req = dict(np.load(request, allow_pickle=False))
    meta = json.loads(str(req["meta"]))
    model = OctoModel.load_pretrained(meta["checkpoint"])
    stats = model.dataset_statistics[meta["dataset"]]["action"]
    results: dict[str, np.ndarray] = {}
    for e, episode in enumerate(meta["episodes"]):
        images, seeds, k = req[f"images{e}"], req[f"seeds{e}"], episode["k"]
        replay = replay_env(images)
        resize = {"primary": (256, 256)} if images.shape[1] != 256 else None
        env = ResizeImageWrapper(replay, resize, augmented_keys=tuple(episode["augmented_keys"]))
        env = HistoryWrapper(env, meta["window"])
        env = TemporalEnsembleWrapper(env, 4)
        task = model.create_tasks(texts=[episode["instruction"]])
        obs, _ = env.reset()
        samples, seen = [], []
        for t, seed in enumerate(seeds):
            batch = jax.tree_util.tree_map(lambda x: x[None], obs)
            seen.append(batch["image_primary"][0])
            actions = model.sample_actions(
                batch,
                task,
                unnormalization_statistics=stats,
                timestep_pad_mask=batch["timestep_pad_mask"],
                sample_shape=(k,),
                rng=jax.random.PRNGKey(int(seed)),
            )
            actions = np.asarray(actions)[:, 0]  # (k, horizon, 7)
            samples.append(actions)
            if t == 0:
                results[f"sensitivity{e}"] = sensitivity(model, batch, task, stats, k, int(seed), actions)
            obs, *_ = env.step(actions[0])  # the first candidate, temporally ensembled by Octo's wrapper
        results[f"samples{e}"] = np.stack(samples)
        results[f"executed{e}"] = np.stack(replay.executed)
        results[f"inputs{e}"] = np.stack(seen)
    np.savez(out, **results)


def sensitivity(model, batch: dict, task: dict, stats: dict, k: int, seed: int, actions: np.ndarray) -> np.ndarray:
    """How far the actions move (same key) when every pixel is one level brighter, or with no pad mask:
    the test's tolerance must not hide either."""
    import jax

    brighter = np.clip(batch["image_primary"].astype(np.int16) + 1, 0, 255).astype(np.uint8)
    variants = (({**batch, "image_primary": brighter}, batch["timestep_pad_mask"]),
                (batch, np.ones_like(batch["timestep_pad_mask"])))  # fmt: skip
    moved = [
        model.sample_actions(obs, task, unnormalization_statistics=stats, timestep_pad_mask=mask,
                             sample_shape=(k,), rng=jax.random.PRNGKey(seed))
        for obs, mask in variants
    ]  # fmt: skip
    return np.array([np.abs(np.asarray(m)[:, 0] - actions).max() for m in moved])


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "build":
        build(Path(args[0]))
    elif command == "expect":
        expect(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}: build DIR | expect REQUEST.npz OUT.npz")
