"""Cal-QL (Nakamoto et al. 2023), as V-GPS trains it (jaxrl_m `ContinuousCQLAgent`, use_calql=True).

Critic loss, per ensemble member i, averaged over members (jaxrl_m averages, CORL sums):

    y          = r + gamma (1 - terminal) max_{j<n} min_i Qbar_i(s', a'_j),  a'_j ~ pi(.|s')   (max-target backup)
    L_TD       = E[(Q_i(s, a) - y)^2]
    CQL(s)     = T log sum_k exp(Q_i(s, a_k) / T) - Q_i(s, a)                                  (CQL(H), Eq. 4)
                 over n uniform actions, n actions of pi(.|s) and n of pi(.|s'), each importance-weighted:
                 Q - log(0.5^7) for uniform ones, Q - log pi(a_k|.) for policy ones
    Cal-QL     : Q_i(s, a_k) <- max(Q_i(s, a_k), MC return of s) for the policy actions      (Cal-QL Eq. 5)
    L_critic   = L_TD + alpha E[CQL(s)]

Actor (SAC, unused at deployment): E[alpha_ent log pi(a|s) - min_i Q_i(s, a)], a ~ pi(.|s);
temperature: -log alpha_ent (log pi + target_entropy). backup_entropy is off (V-GPS).
`calql_bound_rate` is the fraction of current-policy Q values raised to the MC return.
"""

from __future__ import annotations

import copy
import math

import torch

from values.agent import UNIFORM_LOG_DENSITY, Agent, uniform_actions
from values.config import ValueConfig
from values.networks import Actor, Critic, soft_update, value_encoder

# --- loss math --------------------------------------------------------------------------------


def td_target(reward: torch.Tensor, terminal: torch.Tensor, next_q: torch.Tensor, discount: float) -> torch.Tensor:
    """(B,) bootstrapped target r + discount (1 - terminal) next_q."""
    return reward + discount * (1.0 - terminal) * next_q


def max_target_backup(target_q: torch.Tensor) -> torch.Tensor:
    """(E, B, n) target Q of n sampled next actions -> (B,): min over critics, max over samples."""
    return target_q.min(dim=0).values.max(dim=-1).values


def td_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared TD error over critics and batch; q (E, B), target (B,)."""
    return ((q - target.unsqueeze(0)) ** 2).mean()


def calql_lower_bound(q_pi: torch.Tensor, mc_return: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise policy-action Q values (E, B, n) to the MC return (B,); also the fraction raised."""
    bound = mc_return.view(1, -1, 1)
    return torch.maximum(q_pi, bound), (q_pi < bound).float().mean()


def cql_logsumexp(
    q_rand: torch.Tensor,
    q_cur: torch.Tensor,
    logp_cur: torch.Tensor,
    q_next: torch.Tensor,
    logp_next: torch.Tensor,
    q_data: torch.Tensor,
    temp: float,
    importance_sample: bool,
) -> torch.Tensor:
    """T logsumexp(Q/T) over the out-of-distribution actions -> (E, B).

    q_* (E, B, n); logp_* (B, n) log-probabilities of the policy actions (no gradient); q_data (E, B)
    is part of the set only without importance sampling (as in jaxrl_m).
    """
    if importance_sample:
        parts = [q_rand - UNIFORM_LOG_DENSITY, q_next - logp_next.unsqueeze(0), q_cur - logp_cur.unsqueeze(0)]
    else:
        parts = [q_rand, q_data.unsqueeze(-1), q_cur, q_next]
    return torch.logsumexp(torch.cat(parts, dim=-1) / temp, dim=-1) * temp


def sac_actor_loss(log_alpha: torch.Tensor, logp: torch.Tensor, q_pi: torch.Tensor) -> torch.Tensor:
    """E[alpha log pi - min_i Q_i]; logp (B, n), q_pi (E, B, n)."""
    return (log_alpha.exp().detach() * logp - q_pi.min(dim=0).values).mean()


def temperature_loss(log_alpha: torch.Tensor, logp: torch.Tensor, target_entropy: float) -> torch.Tensor:
    return -(log_alpha * (logp.detach() + target_entropy)).mean()


# --- agent ------------------------------------------------------------------------------------


class CalQLAgent(Agent):
    """Critic ensemble + target, tanh-Gaussian actor, entropy temperature; see module docstring."""

    def __init__(
        self, cfg: ValueConfig, lang_dim: int, discount: float, seed: int, channels_last: bool = False
    ) -> None:
        super().__init__(cfg, discount, seed)
        self.critic = Critic(value_encoder(cfg, lang_dim, channels_last), cfg.hidden, cfg.ensemble)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.shared = cfg.actor_encoder == "critic"  # the actor reads the critic's embeddings
        encoder = None if self.shared else value_encoder(cfg, lang_dim, channels_last)
        self.actor = Actor(encoder, cfg.hidden, tanh_squash=True, in_dim=self.critic.encoder.out_dim)
        self.log_alpha = torch.nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))
        self.make_optimizer(
            [
                {"params": list(self.critic.parameters()), "lr": cfg.critic_lr},
                {"params": list(self.actor.parameters()), "lr": cfg.actor_lr},
                {"params": [self.log_alpha], "lr": cfg.temperature_lr},
            ]
        )

    def losses(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, n = self.cfg, self.cfg.cql_n_actions
        s, s_next, lang, a = batch["image"], batch["next_image"], batch["lang"], batch["action"]
        st, st_next = batch.get("state"), batch.get("next_state")  # normalised states (value.proprio)
        B = a.shape[0]
        # the actor over s with a gradient; over s' without one: a single pass over both (2B rows) would
        # run its backward over all 2B, half of them with a zero gradient (GroupNorm: rows are independent)
        if self.shared:  # actor_encoder=critic: the critic's embedding of s, the target's of s', no gradient
            emb = self.critic.embed(s, lang, st)
            mean, std = self.actor.head(emb.detach())
        else:
            mean, std = self.actor(s, lang, st)
        a_cur, logp_cur = self.actor.sample(mean, std, n, g)  # (n, B, 7), (n, B); keeps gradient
        with torch.no_grad():
            emb_next = self.target.embed(s_next, lang, st_next)
            a_next, logp_next = self.actor.sample(
                *(self.actor.head(emb_next) if self.shared else self.actor(s_next, lang, st_next)), n, g
            )
            a_next, logp_next = a_next.transpose(0, 1), logp_next.T  # (B, n, 7), (B, n)
            # max-target backup over the n samples, or a single sample (the first) without it
            backup = a_next if cfg.cql_max_target_backup else a_next[:, :1]
            target_q = self.target.q_from_embedding(emb_next, backup).float()
            y = td_target(batch["reward"], batch["terminal"], max_target_backup(target_q), self.discount)
        if not self.shared:
            emb = self.critic.embed(s, lang, st)
        a_rand = uniform_actions((B, n, 7), g, a.device)
        candidates = torch.cat([a.unsqueeze(1), a_rand, a_cur.detach().transpose(0, 1), a_next], dim=1)
        q_all = self.critic.q_from_embedding(emb, candidates).float()  # (E, B, 1 + 3n)
        q_data, q_rand, q_cur, q_next = q_all[..., 0], *q_all[..., 1:].split(n, dim=-1)
        bound_rate = torch.zeros((), device=a.device)
        if cfg.use_calql:
            q_cur, bound_rate = calql_lower_bound(q_cur, batch["mc_return"])
            q_next, _ = calql_lower_bound(q_next, batch["mc_return"])
        lse = cql_logsumexp(
            q_rand, q_cur, logp_cur.detach().T, q_next, logp_next, q_data, cfg.cql_temp, cfg.cql_importance_sample
        )
        cql_diff = lse - q_data
        td = td_loss(q_data, y)
        critic_loss = td + cfg.cql_alpha * cql_diff.mean()
        # the actor's Q: critic heads frozen (no gradient into the critic), gradient into the actions
        q_pi = self.critic.q_from_embedding(emb.detach(), a_cur.transpose(0, 1), frozen=True).float()
        actor_loss = sac_actor_loss(self.log_alpha, logp_cur.T, q_pi)
        temp_loss = temperature_loss(self.log_alpha, logp_cur, cfg.target_entropy)
        metrics = {
            "critic_loss": critic_loss, "td_loss": td, "cql_diff": cql_diff.mean(), "q_data": q_data.mean(),
            "q_data_min": q_data.min(), "q_data_max": q_data.max(), "q_target": y.mean(),
            "td_error": (q_data - y).abs().mean(), "calql_bound_rate": bound_rate, "actor_loss": actor_loss,
            "entropy": -logp_cur.mean(), "alpha": self.log_alpha.exp(), "mc_return": batch["mc_return"].mean(),
        }  # fmt: skip
        return critic_loss + actor_loss + temp_loss, metrics

    def after_step(self) -> None:
        soft_update(self.target, self.critic, self.cfg.target_update_rate)
