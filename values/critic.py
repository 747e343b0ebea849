"""A trained critic, loaded from a `train_value.py` checkpoint, ready to score actions (DESIGN.md).

    scorer = load_critic("runs/train_value/<name>")          # or a checkpoint directory
    scorer.q(images, lang, normalised_actions)                # (ensemble, B), the Critic contract
                                                              # (+ normalised states for value.proprio)
    scorer.score(obs, actions)                                # (K,) for K canonical actions
    scorer.score_batch(observations, actions)                 # (N, K) for N observations

`score` encodes the image and the instruction once and evaluates all K actions in one batch of the
heads; actions are normalised with the *critic's own* training statistics (V-GPS's released code
re-scales queries with other bounds than it trained with; reference/vgps.md). As in V-GPS, scores
use the target critic's parameters and the minimum over the ensemble. Images of another size than
the critic was trained on are resized (antialiased) first. A critic trained with value.proprio=true
also reads each observation's `state`, normalised with its own "proprio" statistics.

Scoring is two calls, `embed_batch(observations) -> (N, F)` and `score_embedded(emb, actions)`, so
that steering can launch the encoder before the policy samples. On a GPU the encoder runs on a side
CUDA stream (`overlap=True`), so it executes *while* the policy's kernels run on the main stream, and
`score_embedded` waits for it: a batch-1 ResNet and a batch-K policy each leave most of the GPU idle,
so steering then costs about the heads alone on top of the policy. On a GPU,
`bf16=True` runs the critic under bf16 autocast (as train_value trains it), and `cuda_graphs=True`
captures the encoder (per N) and the heads (per N, K) as CUDA graphs and replays them: an eager
ResNet-34 at batch 1 is dominated by kernel launches, not arithmetic (benchmarks/steer_latency.py).
`fix_batch_rows(rows)` runs both on exactly `rows` observations per call (padded with copies of the
first), as the policies do under the runner (policies/base.py): a row's score then does not depend on
the other rows of its batch, and the CUDA graphs are one per K instead of one per (N, K).
`random_critic` builds an untrained scorer from a value config, for benchmarks and tests that need
the real scoring path without a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from configs.checkpoint import load_checkpoint, resolve_checkpoint
from configs.errors import UserError
from data.normalize import ActionNormalizer
from policies.base import fixed_batches
from values.language import EmbeddingCache, make_language_encoder
from values.networks import Critic, value_encoder


class CriticScorer:
    """A critic network + its normalisation statistics + its language encoder."""

    def __init__(
        self, critic: Critic, normalizer: ActionNormalizer, language: EmbeddingCache, image_shape: Sequence[int],
        bf16: bool = False, cuda_graphs: bool = False, overlap: bool = True,
        state_normalizer: ActionNormalizer | None = None,
    ) -> None:  # fmt: skip
        self.critic, self.normalizer, self.language = critic.eval(), normalizer, language
        if (state_normalizer is None) != (critic.encoder.proprio_dim == 0):
            raise ValueError("a critic that reads the state (value.proprio) needs a state normaliser, and only it")
        self.state_normalizer = state_normalizer
        self.image_shape = tuple(image_shape)
        self.device = next(critic.parameters()).device
        on_gpu = self.device.type == "cuda"
        self.bf16, self.cuda_graphs = bf16 and on_gpu, cuda_graphs and on_gpu  # CPU: plain fp32 eager
        self._graphs: dict[tuple, CudaGraphed] = {}
        # the encoder's side stream (None: the encoder runs on the main stream, before the policy's kernels)
        self.stream = torch.cuda.Stream(self.device) if on_gpu and overlap else None
        self.batch_rows: int | None = None

    def fix_batch_rows(self, rows: int | None) -> None:
        """Encode and score exactly `rows` observations per call from now on (None: as many as given)."""
        self.batch_rows = rows

    @torch.no_grad()
    def q(
        self, images: torch.Tensor, lang: torch.Tensor, actions: torch.Tensor, state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 (B, H, W, 3), (B, D), normalised (B, 7) [, normalised states (B, 7)] -> (ensemble, B)."""
        with torch.autocast("cuda", torch.bfloat16, enabled=self.bf16):
            return self.critic.q(self._images(images), lang, actions, state).float()

    @torch.no_grad()
    def score_batch(self, observations: Sequence[dict[str, Any]], actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N observations and their K canonical candidate actions (N, K, 7) -> (N, K) scores."""
        return self.score_embedded(self.embed_batch(observations), actions)

    def score(self, obs: dict[str, Any], actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One observation, K canonical actions (K, 7) -> (K,)."""
        actions = actions if isinstance(actions, torch.Tensor) else np.asarray(actions, np.float32)
        return self.score_batch([obs], actions[None])[0]

    @torch.no_grad()
    def embed_batch(self, observations: Sequence[dict[str, Any]]) -> torch.Tensor:
        """(N, F) embeddings of N observations: each image and instruction encoded once.

        On a GPU this only launches the work, on the side stream: called before the policy samples its
        candidates (policies/steering.py), the encoder runs alongside the policy's kernels.
        `score_embedded` makes the main stream wait for it.
        """
        images = torch.from_numpy(np.stack([np.asarray(o["image_primary"]) for o in observations]))
        lang = torch.stack([self.language.get(o["instruction"]) for o in observations])
        inputs = [self._images(images.to(self.device)), lang]
        if self.state_normalizer is not None:
            inputs.append(self._states(observations))
        if self.stream is None:
            return self._rows(self._embed, *inputs)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the inputs were made on the main stream
        with torch.cuda.stream(self.stream):
            emb = self._rows(self._embed, *inputs)
        # the caching allocator must not hand these blocks out again before the other stream is done
        for x in inputs:
            x.record_stream(self.stream)
        emb.record_stream(main)
        return emb

    def _states(self, observations: Sequence[dict[str, Any]]) -> torch.Tensor:
        """(N, 7) normalised states of the observations, for a critic trained with value.proprio=true."""
        states = [o.get("state") for o in observations]
        bad = [x for x in states if x is None or np.shape(x) != (7,)]
        if bad:
            raise UserError(
                "This critic was trained with value.proprio=true: every observation needs its 'state', float (7,) "
                f"[x, y, z, roll, pitch, yaw, gripper], got {None if bad[0] is None else np.shape(bad[0])}. Send "
                "the robot's state with each observation, or steer with a critic trained without proprio."
            )
        norm = self.state_normalizer.normalize(np.stack(states).astype(np.float32))  # type: ignore[union-attr]
        return torch.from_numpy(norm).to(self.device)

    @torch.no_grad()
    def score_embedded(self, emb: torch.Tensor, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embeddings (N, F) and canonical actions (N, K, 7) -> (N, K): the heads over all N * K actions at once."""
        if not isinstance(actions, torch.Tensor):
            actions = np.asarray(actions, np.float32)
        shape = tuple(actions.shape)
        if len(shape) != 3 or shape[0] != len(emb) or shape[-1] != 7:
            raise ValueError(f"actions must be (N={len(emb)}, K, 7), got {shape}")
        if isinstance(actions, torch.Tensor):
            norm = self.normalizer.normalize(actions.to(self.device, torch.float32))
        else:  # normalise on the host: one transfer instead of one per statistic
            norm = torch.from_numpy(self.normalizer.normalize(actions)).to(self.device)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)  # the embedding is ready
        return self._rows(self._heads, emb, norm)

    def _rows(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """fn over the rows of `inputs` (dim 0), in calls of exactly `batch_rows` rows if it is set."""
        if self.batch_rows is None:
            return self._run(fn, *inputs)
        outs = [
            self._run(fn, *(x[rows] for x in inputs))[:real]
            for rows, real in fixed_batches(len(inputs[0]), self.batch_rows)
        ]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _run(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs), replayed from a CUDA graph per input shape if `cuda_graphs`."""
        if not self.cuda_graphs:
            return fn(*inputs)
        key = (fn.__name__, *(tuple(x.shape) for x in inputs))
        if key not in self._graphs:
            self._graphs[key] = CudaGraphed(fn, inputs)
        return self._graphs[key](*inputs)

    # no autocast weight cache: CUDA graph capture needs it off, and each weight is cast once per call anyway
    def _embed(self, images: torch.Tensor, lang: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            return self.critic.embed(images, lang, state)

    def _heads(self, emb: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            q = self.critic.q_from_embedding(emb, actions)  # (E, N, K)
        return q.float().min(dim=0).values

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[1:3]) == self.image_shape[:2]:
            return images
        x = F.interpolate(
            images.permute(0, 3, 1, 2).float(), size=self.image_shape[:2], mode="bilinear", antialias=True
        )
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class CudaGraphed:
    """`fn(*inputs)` captured once in a CUDA graph for fixed input shapes, then replayed.

    Inputs are copied into static buffers and the output is cloned out of the graph's pool, so a
    result stays valid after the next replay. Warm-up runs on a side stream, as torch.cuda.graphs asks.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], warmup: int = 3) -> None:
        self.inputs = [x.clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # cuDNN autotuning and allocations happen outside the capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, x in zip(self.inputs, inputs, strict=True):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output.clone()


def load_critic(
    path: str | Path, device: str | torch.device = "cpu", params: str = "target", dataset: str | None = None,
    bf16: bool = False, cuda_graphs: bool = False, overlap: bool = True,
) -> CriticScorer:  # fmt: skip
    """Load the critic of a run directory or checkpoint; `params` "target" (V-GPS) or "online".

    `dataset` picks whose statistics normalise the queried actions when the critic was trained on a mixture.
    """
    if params not in ("target", "online"):
        raise UserError(f"Critic params must be 'target' or 'online', got {params!r}.")
    ckpt = resolve_checkpoint(path)
    cfg = OmegaConf.create((ckpt / "config.yaml").read_text())
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    language_info = json.loads((ckpt / "language.json").read_text())
    if dataset is None and len(stats) > 1:
        raise UserError(f"{ckpt} was trained on {sorted(stats)}: choose whose statistics normalise actions "
                        "(steering.dataset=<name>).")  # fmt: skip
    name = dataset or next(iter(stats))
    if name not in stats:
        raise UserError(f"{ckpt} has statistics for {sorted(stats)}, not {name!r}.")
    encoder = make_language_encoder(language_info["encoder"], device="cpu")
    if encoder.identity() != language_info["encoder"]:
        raise UserError(
            f"{ckpt} was trained with language encoder {language_info['encoder']}, got {encoder.identity()}."
        )
    critic = Critic(value_encoder(cfg.value, encoder.dim), cfg.value.hidden, cfg.value.ensemble)
    state, meta = load_checkpoint(ckpt, device="cpu")
    prefix = {"target": "target.", "online": "critic."}[params]
    critic.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    critic.to(device)
    source = f"{ckpt} statistics of {name}"
    normalizer = ActionNormalizer(stats[name], cfg.data.normalization, source=source)
    states = _state_normalizer(critic, stats[name], cfg.data.normalization, source)
    language = EmbeddingCache(encoder, device)
    return CriticScorer(critic, normalizer, language, meta["image_shape"], bf16, cuda_graphs, overlap, states)


def _state_normalizer(critic: Critic, stats: dict[str, Any], mode: str, source: str) -> ActionNormalizer | None:
    """The "proprio" normaliser of a critic that reads the state (value.proprio), else None."""
    return ActionNormalizer(stats, mode, source, key="proprio") if critic.encoder.proprio_dim else None


def random_critic(
    cfg: Any, stats: dict[str, Any], image_size: int, normalization: str = "bounds_q99",
    device: str | torch.device = "cpu", seed: int = 0, bf16: bool = False, cuda_graphs: bool = False,
    overlap: bool = True,
) -> CriticScorer:  # fmt: skip
    """An untrained critic of value config `cfg` (a ValueConfig or its node) with one dataset's `stats`.

    Same networks and scoring path as a loaded critic; for latency benchmarks and tests.
    """
    cfg = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    encoder = make_language_encoder(cfg.language, device="cpu")
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the global RNG alone
        torch.manual_seed(seed)
        critic = Critic(value_encoder(cfg, encoder.dim), cfg.hidden, cfg.ensemble).to(device)
    normalizer = ActionNormalizer(stats, normalization, source="random_critic statistics")
    states = _state_normalizer(critic, stats, normalization, "random_critic statistics")
    return CriticScorer(critic, normalizer, EmbeddingCache(encoder, device), (image_size, image_size, 3), bf16,
                        cuda_graphs, overlap, states)  # fmt: skip
