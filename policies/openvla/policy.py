"""The `openvla` Policy: OpenVLA-7B behind robosteer's Policy contract (docs/openvla.md).

    sample_actions(obs, k) -> (k, 1, 7)   K candidates: one prefix forward, the KV cache expanded K
                                          times, 7 decode steps over the 256 action ids only (every
                                          other logit masked), softmax(logits / temperature) sampling
    act(obs) -> (1, 7)                    predict_action(do_sample=False): 7 greedy tokens over the
                                          whole vocabulary, as published (policy.greedy_act=true)

Masked and unmasked greedy decoding differ only where the most likely token is not an action id: the
published code then decodes that id as a clipped bin (any id below 31744 -> +0.996, a padding id
>= 32000 -> -0.996) while the masked decoder picks the best action id.

Actions (predict_action's arithmetic; policies/action_tokens.py for ids -> bin centres):
    normalised = bin_centers[clip(32000 - id - 1, 0, 254)]
    action     = where(mask, 0.5 * (normalised + 1) * (q99 - q01) + q01, normalised)   float64
with `norm_stats[unnorm_key]["action"]`; a missing mask means every dimension (as published). The
canonical action is that with the gripper clipped to [0, 1]: OpenVLA's datasets are standardised to
gripper 1 = open, 0 = closed (bridge_orig binarises it: > 0.95 -> 1), the gripper is not
un-normalised (mask False), and a sampled gripper bin may lie anywhere in [-1, 1].

One observation at a time (the published model has no batched generation either): `act_batch` and
`sample_actions_batch` loop over the slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from configs.errors import UserError
from policies.action_tokens import ActionTokenizer
from policies.base import ACTION_DIM, POLICIES, Observation, Policy, check_actions
from policies.learned import resolve_device
from policies.openvla.checkpoint import LoadedOpenVLA, load_openvla
from policies.openvla.processing import prompt_ids


def action_stats(norm_stats: dict[str, Any], unnorm_key: str | None, source: str) -> dict[str, np.ndarray]:
    """q01, q99 and mask (7,) of `unnorm_key` (None: the only dataset), as predict_action reads them."""
    if unnorm_key is None:
        if len(norm_stats) != 1:
            raise UserError(f"{source} was trained on {len(norm_stats)} datasets: choose policy.unnorm_key from "
                            f"{sorted(norm_stats)}.")  # fmt: skip
        unnorm_key = next(iter(norm_stats))
    if unnorm_key not in norm_stats:
        raise UserError(f"policy.unnorm_key={unnorm_key!r} is not a dataset of {source}; it has {sorted(norm_stats)}.")
    action = norm_stats[unnorm_key].get("action", {})
    missing = [k for k in ("q01", "q99") if k not in action]
    if missing:
        raise UserError(f"{source}: the {unnorm_key} action statistics lack {missing}.")
    q01, q99 = np.asarray(action["q01"], np.float64), np.asarray(action["q99"], np.float64)
    mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    if not q01.shape == q99.shape == mask.shape == (ACTION_DIM,):
        raise UserError(f"{source}: the {unnorm_key} action statistics are not {ACTION_DIM}-dimensional.")
    return {"q01": q01, "q99": q99, "mask": mask}


def bin_centres(tokens: ActionTokenizer, ids: np.ndarray) -> np.ndarray:
    """Token ids (...) -> float64 bin centres (...), predict_action's `bin_centers[clip(vocab - id - 1, 0, 254)]`."""
    return tokens.bin_centers[np.clip(tokens.vocab_size - np.asarray(ids, np.int64) - 1, 0, tokens.n_bins - 2)]


def unnormalize(normalised: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """OpenVLA's un-normalisation of (..., 7) bin centres: masked dims from [-1, 1] to [q01, q99]."""
    low, high = stats["q01"], stats["q99"]
    return np.where(stats["mask"], 0.5 * (normalised + 1) * (high - low) + low, normalised)


def to_canonical(actions: np.ndarray) -> np.ndarray:
    """OpenVLA actions (..., 7) -> canonical float32: arm deltas as they are, gripper clipped to [0, 1] (1 = open)."""
    out = np.array(actions, dtype=np.float32)
    out[..., -1] = np.clip(out[..., -1], 0.0, 1.0)
    return out


class OpenVLAPolicy(Policy):
    """A loaded OpenVLA checkpoint as a Policy: (K, 1, 7) canonical candidates per observation."""

    chunk = 1

    def __init__(self, loaded: LoadedOpenVLA, cfg: Any, device: torch.device) -> None:
        super().__init__()
        self.loaded, self.model, self.device = loaded, loaded.model, device
        self.stats = action_stats(loaded.norm_stats, cfg.unnorm_key, str(loaded.path))
        self.temperature, self.top_k, self.greedy_act = float(cfg.temperature), int(cfg.top_k), bool(cfg.greedy_act)
        self.fused = bool(cfg.fused)
        self.seed = int(cfg.seed)
        self.llm_backbone_id = self.model.arch.llm_backbone_id
        self._prompts: dict[str, torch.Tensor] = {}

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        """(k, 1, 7) canonical candidates: action-token sampling at the configured temperature."""
        if k < 1:
            raise UserError(f"k={k}: a policy samples at least one action.")
        return self._decode(obs, slot, k, self.temperature, restrict=True)

    def act(self, obs: Observation, slot: int = 0) -> np.ndarray:
        """(1, 7): OpenVLA's greedy action (whole vocabulary), or one candidate if greedy_act is off."""
        if not self.greedy_act:
            return self.sample_actions(obs, 1, slot)[0]
        return self._decode(obs, slot, 1, 0.0, restrict=False)[0]

    def _decode(self, obs: Observation, slot: int, k: int, temperature: float, restrict: bool) -> np.ndarray:
        pixel_values, input_ids = self.inputs(obs, slot)
        with torch.inference_mode():
            generator = self.episode_stream(slot, "sample", lambda seed: torch.Generator(self.device).manual_seed(seed))
            ids, _ = self.model.sample(pixel_values, input_ids, k, temperature, self.top_k, restrict, generator,
                                       self.fused)  # fmt: skip
        normalised = bin_centres(self.model.tokens, ids.cpu().numpy())  # (K, 7) float64, as published
        actions = to_canonical(unnormalize(normalised, self.stats))[:, None]  # (K, 7) -> (K, chunk=1, 7)
        return check_actions(actions, k, self.chunk, "openvla")

    def inputs(self, obs: Observation, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (1, 3 * n, S, S) in the model dtype and prompt ids (1, L) on the policy's device."""
        if "image_primary" not in obs:
            raise UserError(f"The observation has no 'image_primary' (it has {sorted(obs)}).")
        text = obs.get("instruction") or self.instructions.get(slot)
        if not text:
            raise UserError(f"No instruction for slot {slot}: call reset(instruction, slot) or set obs['instruction'].")
        if text not in self._prompts:
            ids = prompt_ids(self.loaded.tokenizer, str(text), self.llm_backbone_id)
            self._prompts[text] = torch.tensor([ids], device=self.device)
        dtype = self.model.language_model.get_input_embeddings().weight.dtype
        pixel_values = self.loaded.processor(obs["image_primary"])[None].to(self.device, dtype)
        return pixel_values, self._prompts[text]


@POLICIES.register("openvla")
def _openvla(cfg: Any) -> Policy:
    device = resolve_device(cfg.device)
    loaded = load_openvla(cfg.path, cfg.dtype, device, cfg.quantization)
    return OpenVLAPolicy(loaded, cfg, device)
