"""IQL (Kostrikov et al. 2022), the V-GPS alternative (jaxrl_m `gc_iql` as configured by V-GPS).

    L_V     = E[ |tau - 1(u < 0)| u^2 ],  u = min_i Qbar_i(s, a) - V(s)            (expectile, Eq. 5; tau 0.7)
    L_Q     = E[ (Q_i(s, a) - r - gamma (1 - terminal) Vbar(s'))^2 ], mean over critics   (Eq. 6)
    L_pi    = -E[ min(exp(beta (min_i Qbar_i(s, a) - V(s))), 100) log pi(a|s) ]      (AWR, Eq. 7; beta 1.0)

Qbar and Vbar are Polyak targets of the critic and the value network (rate 2e-3 in V-GPS; its
gc_iql bootstraps from the target value, `forward_target_value`, where the IQL paper's code uses V
itself); the actor is a plain Gaussian (no tanh) so that dataset actions at the bounds keep a finite
log-probability.
"""

from __future__ import annotations

import copy

import torch

from values.agent import Agent
from values.config import ValueConfig
from values.networks import Actor, Critic, FiLMResNet, ValueNet, soft_update, value_encoder

# --- loss math --------------------------------------------------------------------------------


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """E[|tau - 1(diff < 0)| diff^2] for diff = target - prediction."""
    weight = torch.where(diff > 0, expectile, 1 - expectile)
    return (weight * diff**2).mean()


def q_loss(q: torch.Tensor, reward: torch.Tensor, terminal: torch.Tensor, next_v: torch.Tensor, discount: float):
    """q (E, B); target r + gamma (1 - terminal) V(s') (B,), no gradient into V."""
    target = reward + discount * (1.0 - terminal) * next_v.detach()
    return ((q - target.unsqueeze(0)) ** 2).mean(), target


def awr_loss(advantage: torch.Tensor, log_prob: torch.Tensor, temperature: float, max_weight: float = 100.0):
    """-E[min(exp(beta A), 100) log pi(a|s)], weights without gradient."""
    weight = torch.exp(advantage.detach() * temperature).clamp(max=max_weight)
    return -(weight * log_prob).mean(), weight


# --- agent ------------------------------------------------------------------------------------


class IQLAgent(Agent):
    def __init__(
        self, cfg: ValueConfig, lang_dim: int, discount: float, seed: int, channels_last: bool = False
    ) -> None:
        super().__init__(cfg, discount, seed)
        self.critic = Critic(value_encoder(cfg, lang_dim, channels_last), cfg.hidden, cfg.ensemble)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.shared = cfg.actor_encoder == "critic"  # V and the actor read the critic's embeddings
        width = self.critic.encoder.out_dim

        def encoder() -> FiLMResNet | None:
            return None if self.shared else value_encoder(cfg, lang_dim, channels_last)

        self.value = ValueNet(encoder(), cfg.hidden, in_dim=width)
        self.value_target = copy.deepcopy(self.value).requires_grad_(False)
        self.actor = Actor(encoder(), cfg.hidden, tanh_squash=False, in_dim=width)
        self.make_optimizer(
            [
                {"params": list(self.critic.parameters()), "lr": cfg.critic_lr},
                {"params": list(self.actor.parameters()), "lr": cfg.actor_lr},
                {"params": list(self.value.parameters()), "lr": cfg.value_lr},
            ]
        )

    def losses(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        s, s_next, lang, a = batch["image"], batch["next_image"], batch["lang"], batch["action"]
        st, st_next = batch.get("state"), batch.get("next_state")  # normalised states (value.proprio)
        if self.shared:  # actor_encoder=critic: heads over the critic's embedding of s, the target's elsewhere
            emb = self.critic.embed(s, lang, st)
            v = self.value.head(emb.detach())
            with torch.no_grad():  # the target encoder once over s and s' (GroupNorm: rows stay independent)
                states = None if st is None else torch.cat([st, st_next])
                both = self.target.embed(torch.cat([s, s_next]), torch.cat([lang, lang]), states)
                q_target = self.target.q_from_embedding(both[: len(s)], a).float().min(dim=0).values
                next_v = self.value_target.head(both[len(s) :])
            q = self.critic.q_from_embedding(emb, a).float()
            mean, std = self.actor.head(emb.detach())
        else:
            v = self.value(s, lang, st)
            with torch.no_grad():
                next_v = self.value_target(s_next, lang, st_next)  # Vbar(s'): the target value network
                q_target = self.target.q(s, lang, a, st).float().min(dim=0).values
            q = self.critic.q(s, lang, a, st).float()
            mean, std = self.actor(s, lang, st)
        value_loss = expectile_loss(q_target - v, self.cfg.expectile)
        critic_loss, y = q_loss(q, batch["reward"], batch["terminal"], next_v, self.discount)
        actor_loss, weight = awr_loss(q_target - v, self.actor.log_prob(mean, std, a), self.cfg.awr_temperature)
        metrics = {
            "critic_loss": critic_loss, "value_loss": value_loss, "actor_loss": actor_loss, "q_data": q.mean(),
            "q_data_min": q.min(), "q_data_max": q.max(), "v": v.mean(), "q_target": y.mean(),
            "td_error": (q - y).abs().mean(), "adv_weight": weight.mean(), "mc_return": batch["mc_return"].mean(),
        }  # fmt: skip
        return critic_loss + value_loss + actor_loss, metrics

    def after_step(self) -> None:
        soft_update(self.target, self.critic, self.cfg.target_update_rate)
        soft_update(self.value_target, self.value, self.cfg.target_update_rate)

    def load_state_dict(self, state: dict, strict: bool = True):  # type: ignore[override]
        """Checkpoints written before the target value network existed (stop 28) start it as V."""
        if not any(k.startswith("value_target.") for k in state):
            copies = {"value_target." + k.removeprefix("value."): v for k, v in state.items() if k.startswith("value.")}
            state = {**state, **copies}
        return super().load_state_dict(state, strict=strict)
