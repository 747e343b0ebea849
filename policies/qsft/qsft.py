"""Q-SFT (Hong, Dragan, Levine, ICLR 2025, arXiv 2411.05193; reference/qsft.md) on robot action tokens.

Token-level MDP: an action a_t is 7 tokens; token j's state is (s_t, a_t^{<j}). Inside an action
gamma = 1 and the reward is 0; the last token gets the robot step's reward r_t in [0, 1] and
bootstraps from the first token of the next observation s_{t+1}, discounted by gamma; a terminal
step takes its reward only. With r = 1 on reaching success and 0 elsewhere, returns lie in [0, 1]
(Assumption 4.1), so Q is a probability.

    Behaviour policy (Eq. 2):  L(phi)   = - E log pi_phi(a|s)
    Target (Sec. 4.2):         y(s, a)  = r + gamma' max_{a': pi_phi(a'|s') > floor} pbar(a'|s') / pi_phi(a'|s'),
                                         clipped to [0, 1]; stop-gradient; s' the next token state
    Q-SFT loss (Eq. 3):        L(theta) = - E [ y log p_theta(a|s) + sum_{a'!=a} (1-y) / (|A|-1) log p_theta(a'|s) ]
    dummy-action form:         L(theta) = - E [ y log p_theta(a|s) + (1 - y) log p_theta(a_d|s) ]    (labels=dummy)
    Target network:            thetabar <- (1 - alpha) thetabar + alpha theta, after every step
    Selection (Alg. 1, l. 11): pi(a|s) ∝ pi_phi(a|s) exp(beta p_theta(a|s)), token by token
    Critic (Theorem 4.1):      pi_phi(a|s) Q*(s, a) <= p_theta(a|s) <= Q*(s, a); the backup uses p_theta / pi_phi

|A| = 256: every softmax runs over the action tokens (and, for labels=dummy, one dummy token a_d;
policies/qsft/backbone.py). Why labels=dummy exists: at the optimum of Eq. 3,
p(a) = pi(a) y(a) + sum_{a' != a} pi(a') (1 - y(a')) / (|A| - 1), so p / pi = y(a) + O(1 / ((|A| - 1) pi(a))),
and both p and pi sum to 1, so max_a' p / pi >= 1 whenever no token is cut by the floor. With
50k text tokens and floor 1e-4 the extra term is below 0.2; with 256 action tokens it reaches ~39,
and the backup saturates at 1. The dummy form's optimum p(a) = pi(a) y(a) has no such term
(tests/qsft/test_math.py shows both).
Deliberate deviations from the author's prototype (reference/qsft.md, Pitfalls): the ratio pairs
the target and pi_phi at the *same* next state; targets are clipped; selection multiplies by
pi_phi. Rewards are rescaled from the data's sparse labels (`unit_rewards`), since the data layer's
default labels are V-GPS's 0 / -1.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from policies.action_tokens import NUM_ACTION_TOKENS
from policies.base import ACTION_DIM
from policies.llama_stack import cached_stack
from policies.qsft.backbone import DUMMY_COLUMNS, Backbone, create_backbone, rebuild_backbone
from policies.qsft.lora import add_lora, lora_enabled
from policies.vla import choose, token_uniforms
from values.networks import soft_update

CRITIC_MODES = ("p_theta", "ratio")
LABELS = ("uniform", "dummy")
BACKUPS = ("max", "double", "mc")

# --- loss math -----------------------------------------------------------------------------------


def unit_rewards(reward: torch.Tensor, success_reward: float, step_reward: float) -> torch.Tensor:
    """The data's sparse labels mapped to [0, 1]: step_reward -> 0, success_reward -> 1 (Pitfall 1)."""
    if success_reward == step_reward:
        raise UserError("data.reward.success_reward equals step_reward: Q-SFT needs a success signal.")
    return ((reward - step_reward) / (success_reward - step_reward)).clamp(0.0, 1.0)


def log_q(logits: torch.Tensor, labels: str) -> torch.Tensor:
    """log p_theta(a|s) of the 256 action tokens from Backbone logits (..., 1 + 256) (column 0: the dummy).

    uniform labels: the softmax over the action tokens; dummy labels: over them and the dummy token.
    """
    return logits[..., 1:].log_softmax(-1) if labels == "uniform" else logits.log_softmax(-1)[..., 1:]


def ratio_support(log_pi: torch.Tensor, floor: float) -> torch.Tensor:
    """Tokens the backup's max may pick: pi_phi(a') > floor, and pi_phi's most likely token, whatever the floor."""
    return (log_pi > math.log(floor)) | (log_pi == log_pi.amax(-1, keepdim=True))


def max_ratio(log_target: torch.Tensor, log_pi: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """max_{a': pi(a') > floor} pbar(a') / pi(a') over the last axis (..., A) of log-probabilities -> (...,).

    Also returns the support size. Tokens pi_phi gives at most `floor` are left out, as their
    ratios explode (Pitfall 2); pi_phi's most likely token always stays in, whatever the floor.
    """
    support = ratio_support(log_pi, floor)
    return (log_target - log_pi).masked_fill(~support, float("-inf")).amax(-1).exp(), support.sum(-1)


def double_ratio(
    log_target: torch.Tensor, log_pi: torch.Tensor, log_online: torch.Tensor, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """pbar(a*) / pi(a*) with a* = argmax_{a': pi(a') > floor} p_theta(a') / pi(a'): the double-Q backup -> (...,).

    Double Q-learning (van Hasselt, Guez, Silver, AAAI 2016): the online p_theta picks the next
    token and the target p_thetabar values it, so one network's noise does not both choose and
    score. A max over noisy estimates is biased up; in the token MDP that bias compounds over the
    7 tokens of every action (gamma = 1 inside), which `max_ratio` cannot avoid (docs/qsft.md).
    Also returns the support size.
    """
    support = ratio_support(log_pi, floor)
    choice = (log_online - log_pi).masked_fill(~support, float("-inf")).argmax(-1, keepdim=True)
    return (log_target - log_pi).gather(-1, choice)[..., 0].exp(), support.sum(-1)


def token_targets(
    reward: torch.Tensor, terminal: torch.Tensor, next_ratio: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bellman targets of the n tokens of each action: (B,), (B,), (B, n) -> clipped y (B, n), unclipped y.

    next_ratio[:, j] is `max_ratio` at the state after token j: within the action for j < n - 1,
    the first token of the next observation for j = n - 1. Tokens before the last get reward 0 and
    gamma = 1; the last gets r + gamma (1 - terminal) next_ratio.
    """
    n = next_ratio.shape[1]
    discount = torch.ones_like(next_ratio)
    discount[:, -1] = gamma * (1.0 - terminal)
    rewards = F.pad(reward[:, None], (n - 1, 0))  # (B, n): zeros, then r on the last token
    raw = rewards + discount * next_ratio
    return raw.clamp(0.0, 1.0), raw


def soft_label_ce(logits: torch.Tensor, index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per token: -(y log p[a] + (1 - y) mean_{a' != a} log p[a']); logits (..., A), index, y (...)."""
    logp = logits.log_softmax(-1)
    taken = logp.gather(-1, index[..., None])[..., 0]
    others = (logp.sum(-1) - taken) / (logits.shape[-1] - 1)
    return -(y * taken + (1.0 - y) * others)


def dummy_label_ce(logits: torch.Tensor, index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dummy-action form per token: -(y log p[a] + (1 - y) log p[a_d]); logits (..., 1 + A), column 0 = a_d.

    Its optimum is p(a|s) = pi_beta(a|s) y(s, a) for every action a (reference/qsft.md).
    """
    logp = logits.log_softmax(-1)
    return -(y * logp.gather(-1, index[..., None] + 1)[..., 0] + (1.0 - y) * logp[..., 0])


def selection_logits(
    pi_logits: torch.Tensor, q_probs: torch.Tensor, beta: float, value: str = "p_theta", floor: float = 0.02
) -> torch.Tensor:
    """Logits of pi(a|s) ∝ pi_phi(a|s) exp(beta v(a|s)) over the action tokens (..., A).

    value="p_theta" (Alg. 1): v = p_theta. value="ratio": v = p_theta / pi_phi, the Q estimate the
    backup uses (with labels=dummy p_theta ≈ pi_beta Q, so p_theta itself mostly re-weights by
    pi_phi); tokens pi_phi gives at most `floor` are left out, as in `max_ratio`.
    """
    log_pi = pi_logits.log_softmax(-1)
    if value == "p_theta":
        return log_pi + beta * q_probs
    if value != "ratio":
        raise UserError(f"policy.select_value={value!r}; use one of {', '.join(CRITIC_MODES)}.")
    return (log_pi + beta * q_probs / log_pi.exp()).masked_fill(~ratio_support(log_pi, floor), float("-inf"))


def _mode_dependent(module: nn.Module) -> bool:
    """Whether `module` computes something else in train mode: BatchNorm, or dropout with p > 0."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        for m in module.modules()
    )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode inside the block, its own mode again after it."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@torch.no_grad()
def _eval_logits(model: Backbone, images: torch.Tensor, instructions: list[str], inputs: torch.Tensor) -> torch.Tensor:
    """`model`'s action logits in eval mode, no gradient; its mode (and BatchNorm statistics) left as they were."""
    with _eval_mode(model):
        return model.action_logits(model.prefix(images, instructions), inputs)


# --- the model -----------------------------------------------------------------------------------


class QSFTModel(nn.Module):
    """pi_phi (`pi`), p_theta (`q`) and the Polyak target p_thetabar (`q_target`): three copies of one backbone."""

    chunk = 1

    def __init__(
        self, pi: Backbone, q: Backbone | None = None, q_target: Backbone | None = None, labels: str = "uniform"
    ) -> None:
        super().__init__()
        if labels not in LABELS:
            raise UserError(f"policy.model.labels={labels!r}; use one of {', '.join(LABELS)}.")
        self.pi, self.labels = pi, labels
        self.q = q if q is not None else copy.deepcopy(pi)  # paper: theta, thetabar start from the same model
        self.q_target = q_target if q_target is not None else copy.deepcopy(self.q)
        self.q_target.requires_grad_(False)
        self.tokens, self.image_size = pi.tokens, pi.image_size
        self.behaviour_frozen = False
        # BatchNorm or dropout in pi_phi (adapters included: LoRA goes on before the copies): looked up once
        self.pi_mode_dependent = _mode_dependent(pi)
        self.q_mode_dependent = _mode_dependent(self.q)

    @classmethod
    def create(cls, cfg: Any, image_size: int) -> QSFTModel:
        backbone = create_backbone(cfg, image_size)
        if lora_enabled(cfg):
            add_lora(backbone, cfg.lora)  # before the copies: all three carry the same (zero) adapters
        return cls(backbone, labels=cfg.labels)

    @classmethod
    def rebuild(cls, cfg: Any, image_size: int, path: Path) -> QSFTModel:
        """The architecture of a checkpoint, adapters included (the caller loads the weights)."""
        backbones = [rebuild_backbone(cfg, image_size, path) for _ in range(3)]
        if lora_enabled(cfg):
            for backbone in backbones:
                add_lora(backbone, cfg.lora)
        return cls(*backbones, labels=cfg.labels)

    def files(self) -> dict[str, str]:
        return self.pi.files()

    def train(self, mode: bool = True) -> QSFTModel:
        super().train(mode)
        self.q_target.eval()  # the target never drops out
        if self.behaviour_frozen:  # a frozen pi_phi is what it was: no dropout, no BatchNorm statistics that move
            self.pi.eval()
        return self

    def freeze_behaviour(self) -> None:
        """behaviour=frozen: pi_phi keeps its weights and stays in eval mode (its BatchNorm statistics too)."""
        self.pi.requires_grad_(False)
        self.behaviour_frozen = True
        self.pi.eval()

    # --- training --------------------------------------------------------------------------------

    def losses(
        self, batch: dict[str, Any], gamma: float, floor: float, train_behaviour: bool = True, backup: str = "max"
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(q_loss, bc_loss, metrics) of a transition batch whose `reward` is already in [0, 1].

        One forward per model: p_theta over (s_t, a_t); pi_phi and the target over (s_t, a_t) and
        s_{t+1} stacked as 2B rows (the next rows carry the same action tokens, which their first
        row, the only one read, cannot see). When pi_phi trains (behaviour=joint) it runs twice
        instead: over (s_t, a_t) with a gradient, and over s_{t+1}'s prefix alone without one; in
        the shared pass autograd would run pi_phi's backward over all 2B rows, B of them without a loss.

        backup="double": the next token is chosen by p_theta (inside the action from its own logits
        of (s_t, a_t); at the boundary one more forward of it over the prefix of s_{t+1}, no gradient)
        and valued by the target (`double_ratio`). A p_theta with BatchNorm or dropout chooses from one
        eval-mode pass over both states instead, made before its training pass: the values it chooses
        among are eval-mode ones, and its running statistics move once per step, as with backup="max".

        backup="mc" is a diagnostic, not Q-SFT: every token's target is the transition's Monte-Carlo
        return (`mc_return`, in [0, 1]), no bootstrapping and no target network, so p_theta learns
        the behaviour policy's Q; it tells whether the model can learn values from this data at
        all when the bootstrapped backup does not (docs/qsft.md).
        """
        if backup not in BACKUPS:
            raise UserError(f"backup={backup!r}; use one of {', '.join(BACKUPS)}.")
        ids = self.tokens.encode(batch["action"])  # (B, 7)
        index = self.tokens.id_to_index(ids)
        B, mc = ids.shape[0], backup == "mc"
        # the backup reads the next observation too; the mc targets need only s_t (pi_phi: its SFT loss)
        both = batch["image"] if mc else torch.cat([batch["image"], batch["next_image"]])
        instructions = list(batch["instruction"]) * (1 if mc else 2)
        inputs = ids[:, :-1] if mc else ids[:, :-1].repeat(2, 1)
        online_logits = None
        if backup == "double" and self.q.training and self.q_mode_dependent:
            q_both = _eval_logits(self.q, both, instructions, inputs)
            online_logits = torch.cat([q_both[:B, 1:], q_both[B:, :1]], dim=1)
        q_logits = self.q.action_logits(self.q.prefix(batch["image"], batch["instruction"]), ids[:, :-1])
        eval_values = None
        if not mc and self.pi.training and self.pi_mode_dependent:
            # the backup divides the target (eval mode) by pi_phi: both must normalise alike. A training
            # pi_phi with BatchNorm would use the batch's statistics (a ratio ~1.008 per token where the
            # weights are equal, which the max picks up) or dropout: its values come from an eval pass,
            # before its training pass moves the running statistics.
            pi_both = _eval_logits(self.pi, both, instructions, inputs)[..., 1:]
            eval_values = pi_both[:B], pi_both[B:, :1]
        with torch.set_grad_enabled(train_behaviour and torch.is_grad_enabled()):
            if mc or not torch.is_grad_enabled():  # one pass over s_t and s_{t+1} (2B rows; B for mc)
                pi_both = self.pi.action_logits(self.pi.prefix(both, instructions), inputs)[..., 1:]
                pi_logits, pi_next = pi_both[:B], pi_both[B:, :1]  # (B, 7, 256), (B, 1, 256)
            else:  # joint SFT: a backward over the shared pass would run over 2B rows, B of them without a loss
                pi_logits = self.pi.action_logits(self.pi.prefix(batch["image"], batch["instruction"]), ids[:, :-1])
                pi_logits = pi_logits[..., 1:]
                with torch.no_grad():  # s_{t+1}'s first-token row: its prefix alone, as for `next_q` below
                    pi_next = self.pi.action_logits(
                        self.pi.prefix(batch["next_image"], batch["instruction"]), ids[:, :0]
                    )
                pi_next = pi_next[..., 1:]
        if eval_values is not None:
            pi_values, pi_next = eval_values
        else:
            pi_values = pi_logits
        extra = {}
        with torch.no_grad():
            if mc:
                raw = batch["mc_return"].float()[:, None].expand(B, ACTION_DIM)
                y = raw.clamp(0.0, 1.0)
            else:
                target = log_q(
                    self.q_target.action_logits(self.q_target.prefix(both, instructions), inputs), self.labels
                )
                # the token state after token j: rows 1..6 of the action, then row 0 of the next observation
                log_pi = torch.cat([pi_values[:, 1:].detach(), pi_next], dim=1).log_softmax(-1)
                after = [torch.cat([target[:B, 1:], target[B:, :1]], dim=1), log_pi]
                if backup == "double":
                    if online_logits is None:  # p_theta at s_{t+1}'s first token: the row after its prefix alone
                        next_q = self.q.action_logits(
                            self.q.prefix(batch["next_image"], batch["instruction"]), ids[:, :0]
                        )
                        online_logits = torch.cat([q_logits[:, 1:].detach(), next_q], dim=1)
                    ratio, support = double_ratio(*after, log_q(online_logits, self.labels), floor)
                else:
                    ratio, support = max_ratio(*after, floor)
                y, raw = token_targets(batch["reward"].float(), batch["terminal"].float(), ratio, gamma)
                extra["ratio_support"] = support.float().mean()
        if self.labels == "uniform":
            q_loss = soft_label_ce(q_logits[..., 1:], index, y).mean()
        else:
            q_loss = dummy_label_ce(q_logits, index, y).mean()
        bc_loss = F.cross_entropy(pi_logits.reshape(-1, NUM_ACTION_TOKENS), index.reshape(-1))
        with torch.no_grad():
            p = log_q(q_logits, self.labels).exp().gather(-1, index[..., None])[..., 0]  # p_theta(a_j|s, a_<j)
            metrics = {
                "q_loss": q_loss.detach(), "bc_loss": bc_loss.detach(),
                "target": y.mean(), "target_last": y[:, -1].mean(), "target_clipped": (raw > 1).float().mean(),
                "p_theta": p.mean(), "p_theta_last": p[:, -1].mean(), **extra,
                "token_accuracy": (pi_logits.argmax(-1) == index).float().mean(),
            }  # fmt: skip
        return q_loss, bc_loss, metrics

    @torch.no_grad()
    def update_target(self, rate: float) -> None:
        """Polyak step of p_thetabar toward p_theta (`soft_update`: trained parameters, each rank its shards)."""
        if hasattr(self.q, "reshard"):  # FSDP may leave a backbone's own parameters gathered after a backward
            for module in (*self.q.modules(), *self.q_target.modules()):
                if hasattr(module, "reshard"):
                    module.reshard()
        soft_update(self.q_target, self.q, rate)

    # --- acting and scoring ----------------------------------------------------------------------

    @torch.no_grad()
    def select(
        self, images: torch.Tensor, instructions: Sequence[str], k: int, beta: float, temperature: float = 1.0,
        top_k: int = 0, generator: torch.Generator | None = None, value: str = "p_theta", floor: float = 0.02,
        fused: bool = True, uniform: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """K actions per observation from pi(a|s) ∝ pi_phi exp(beta v), token by token: ids (N, K, 7).

        v = p_theta, or p_theta / pi_phi over tokens above `floor` (`selection_logits`).

        Both models prefill their prefix once with the KV cache, repeat it K times, and decode the 7
        tokens in lockstep; temperature 0 = greedy. `fused` (`_decoding`): both in one batched forward per step.
        `uniform` (N * K, 7): the numbers `choose` samples each row's tokens with (else drawn from `generator`).
        """
        if temperature <= 0 and k > 1:
            one = self.select(images, instructions, 1, beta, 0.0, top_k, generator, value, floor, fused)
            return one.expand(-1, k, -1).clone()
        uniform = token_uniforms(uniform, images.shape[0] * k, temperature, generator, images.device)
        logits, extend = self._decoding((self.pi, self.q), images, instructions, k, fused)
        chosen = []
        for step in range(ACTION_DIM):
            scores = selection_logits(logits[0, :, 1:], log_q(logits[1], self.labels).exp(), beta, value, floor)
            index = choose(scores, temperature, top_k, uniform=None if uniform is None else uniform[:, step])
            chosen.append(index)
            if step < ACTION_DIM - 1:
                logits = extend(self.tokens.index_to_id(index)[:, None])[:, :, -1]
        ids = self.tokens.index_to_id(torch.stack(chosen, dim=1))
        return ids.view(-1, k, ACTION_DIM)  # (N * K, 7) -> (N, K, 7)

    @torch.no_grad()
    def score(
        self, images: torch.Tensor, instructions: Sequence[str], ids: torch.Tensor, mode: str, fused: bool = True
    ) -> torch.Tensor:
        """Q(s, a) of K candidate actions per observation: ids (N, K, 7) -> (N, K).

        gamma = 1 inside an action makes the last token's value the whole action's: p_theta(a_7 |
        s, a_<7) (`p_theta`, the conservative estimate of Theorem 4.1) or that over pi_phi(a_7 | s, a_<7)
        (`ratio`, the estimate the backup uses). Each prefix is encoded once, the N * K actions in one
        batched cached forward (per model, or of both models at once when `fused`).
        """
        if mode not in CRITIC_MODES:
            raise UserError(f"Q-SFT critic mode {mode!r}; use one of {', '.join(CRITIC_MODES)}.")
        N, K, _ = ids.shape
        flat = ids.reshape(N * K, ACTION_DIM)  # row n * K + j = candidate j of observation n
        last = self.tokens.id_to_index(flat[:, -1:])
        models = (self.q, self.pi) if mode == "ratio" else (self.q,)
        _, extend = self._decoding(models, images, instructions, K, fused)
        logits = extend(flat[:, :-1])[:, :, -1]  # (G, N * K, 257): the distribution of the last token
        q = log_q(logits[0], self.labels).exp().gather(-1, last)[:, 0]
        if mode == "ratio":
            q = q / log_q(logits[1], "uniform").exp().gather(-1, last)[:, 0]  # pi_phi: the softmax over the actions
        return q.view(N, K)

    def _decoding(
        self, models: Sequence[Backbone], images: torch.Tensor, instructions: Sequence[str], k: int, fused: bool
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Prefill G models over N prefixes, each row k times -> the next logits (G, N * k, 257) and extend.

        extend(ids (N * k, n)) appends tokens to every model and returns (G, N * k, n, 257). `fused`
        and Llama VLA backbones of one shape: the G models run as one stack (policies/llama_stack.py),
        each step one batched forward; otherwise each model runs transformers' forward in turn.
        """
        prefixes = [m.prefix(images, instructions) for m in models]
        lms = [m.stack_lm() for m in models]
        stack = None
        if fused and None not in lms and all(torch.equal(p.mask, prefixes[0].mask) for p in prefixes):
            first = self.tokens.first_id - DUMMY_COLUMNS
            stack = cached_stack(self, lms, slice(first, self.tokens.vocab_size))
        if stack is not None:
            embeds = torch.stack([p.inputs["inputs_embeds"] for p in prefixes])
            state, logits = stack.prefill(embeds, prefixes[0].mask, k, extra=ACTION_DIM - 1)
            return logits, lambda ids: stack.extend(state, ids)
        decs = [m.prefill(p, k) for m, p in zip(models, prefixes, strict=True)]
        extend = lambda ids: torch.stack([m.extend(d, ids) for m, d in zip(models, decs, strict=True)])  # noqa: E731
        return torch.stack([d.logits for d in decs]), extend

    @torch.no_grad()
    def evaluate(
        self, batch: dict[str, Any], gamma: float, floor: float, backup: str = "max"
    ) -> dict[str, torch.Tensor]:
        """Held-out loss metrics."""
        return self.losses(batch, gamma, floor, train_behaviour=False, backup=backup)[2]
