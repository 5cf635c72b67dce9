"""The SB3 agents' configuration (:class:`SB3Config`) and the checks of every field, the
policy's keyword arguments included (by name, type and range), run by ``validate()``: what a
config built in Python and one read from a checkpoint's ``sb3_config.json`` both pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from textenvs.checks import (
    SEED,
    check_bool,
    check_float,
    check_int,
    check_optional_str,
    floats,
    ints,
)

ALGOS = ("ppo", "maskable_ppo")
POLICIES = ("mlp", "lm_prior", "last_block")
PRIOR_POLICIES = ("lm_prior", "last_block")  # they read the LM's log-probabilities: no VecNormalize
MAX_NUM_ENVS = 1024
MAX_ROLLOUT_STEPS = 2**20
"""num_envs * n_steps at most: SB3's rollout buffer holds that many observations."""
MAX_LAYER_WIDTH = 8192
MAX_LAYERS = 16


# Every numeric field's type and range: checked by SB3Config.validate() (a config from Python or
# from a checkpoint's sb3_config.json) and by the command line's flags.
FIELD_CHECKS = {
    "learning_rate": floats(0, 1, low_open=True),
    "num_envs": ints(1, MAX_NUM_ENVS),
    "n_steps": ints(1, MAX_ROLLOUT_STEPS),
    "batch_size": ints(1, MAX_ROLLOUT_STEPS),
    "n_epochs": ints(1, 10_000),
    "gamma": floats(0, 1),
    "gae_lambda": floats(0, 1),
    "ent_coef": floats(0),
    "kl_coef": floats(0),
    "seed": SEED,
}


@dataclass
class SB3Config:
    """How to build and train the SB3 model (anything else goes through ``policy_kwargs``)."""

    algo: str = "ppo"
    """``ppo`` (stable_baselines3.PPO) or ``maskable_ppo`` (sb3_contrib.MaskablePPO, edit envs)."""
    policy: str = "mlp"
    """``mlp`` (SB3's MlpPolicy) or ``lm_prior``: a policy that starts where the LM is, reading the
    env's ``candidates_obs=True`` block (no observation normalisation). With PPO on generation
    envs :class:`agents.lm_prior.LMPriorPolicy` (the LM's distribution over the actions); with
    MaskablePPO on edit envs made with ``flat_actions=True``
    :class:`agents.edit_prior.EditPriorPolicy` (stop at once: the LM's draft). ``last_block``
    (PPO, generation envs): :class:`agents.last_block.LastBlockPolicy`, a trainable copy of the
    LM's last block over the env's ``obs="context"`` observation, also starting at the LM."""
    num_envs: int = 8
    """Sub-envs of the batched vector env (one LM forward per step for all of them)."""
    n_steps: int = 64
    """Steps per sub-env per rollout (SB3's ``n_steps``)."""
    batch_size: int = 128
    """Minibatch size of the PPO update."""
    n_epochs: int = 4
    """Epochs over each rollout."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    gamma: float = 1.0
    """Discount; the metric is paid within short episodes."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    ent_coef: float = 0.0
    """Entropy bonus. Keep it 0 or tiny: a whole episode's metric is at most 1, while 0.01 times the
    entropy of a few actions, paid every token, outweighs it."""
    kl_coef: float = 0.0
    """Token PPO's KL penalty in the reward (:class:`agents.lm_prior.KLPenalty`): each collected
    reward minus ``kl_coef * (log pi - log prior)`` of the action taken; PPO with the ``lm_prior``
    or ``last_block`` policy (0: none). :func:`train_callbacks` makes the callback."""
    seed: int = 0
    """Seed of SB3 and of the env resets."""
    normalize_obs: bool = True
    """Running mean / std normalisation of the hidden-state observations (SB3's VecNormalize):
    hidden states are unbounded and unevenly scaled across dimensions."""
    policy_kwargs: dict = field(default_factory=dict)
    """Passed to the policy (``net_arch``, ...)."""
    tensorboard_log: str | None = None
    """Folder for TensorBoard logs (None: no logging)."""

    def validate(self) -> None:
        check_bool("normalize_obs", self.normalize_obs)
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r} is not valid: choose one of {list(ALGOS)}.")
        if self.policy not in POLICIES:
            raise ValueError(
                f"policy={self.policy!r} is not valid: choose one of {list(POLICIES)}."
            )
        for name, check in FIELD_CHECKS.items():
            check(name, getattr(self, name))
        if self.num_envs * self.n_steps > MAX_ROLLOUT_STEPS:
            raise ValueError(
                f"num_envs * n_steps = {self.num_envs * self.n_steps} steps per rollout; at most "
                f"{MAX_ROLLOUT_STEPS} fit a rollout buffer: lower one of them."
            )
        check_optional_str("tensorboard_log", self.tensorboard_log)
        check_policy_kwargs(self.policy, self.algo, self.policy_kwargs)
        if self.kl_coef and (self.policy not in PRIOR_POLICIES or self.algo != "ppo"):
            raise ValueError(
                f"kl_coef={self.kl_coef} penalises the KL to the LM prior, which only PPO with "
                f"policy='lm_prior' or 'last_block' has (got algo={self.algo!r}, "
                f"policy={self.policy!r}): set kl_coef=0 or change the policy."
            )
        if self.policy == "last_block" and self.algo != "ppo":
            raise ValueError(
                "policy='last_block' acts on generation envs with PPO: use algo='ppo' (edit envs "
                "have policy='lm_prior' with MaskablePPO)."
            )


# The policy_kwargs each policy takes, by kind of value: classes (only from Python, never from a
# JSON config), objects, and the checks of plain values.
_CLASS_KWARGS = ("activation_fn", "features_extractor_class", "optimizer_class")


_DICT_KWARGS = ("features_extractor_kwargs", "optimizer_kwargs")


_SB3_KWARGS = {
    "net_arch": lambda v: _check_net_arch(v),
    "ortho_init": lambda v: check_bool("policy_kwargs['ortho_init']", v),
    "share_features_extractor": lambda v: check_bool(
        "policy_kwargs['share_features_extractor']", v
    ),
    "normalize_images": lambda v: check_bool("policy_kwargs['normalize_images']", v),
    "log_std_init": lambda v: check_float("policy_kwargs['log_std_init']", v),
}


_POLICY_KWARGS = {
    "mlp": {},
    "lm_prior": {
        "max_correction": lambda v: (
            v is None or check_float("policy_kwargs['max_correction']", v, 0, low_open=True)
        ),
        "candidate_features": lambda v: check_int(
            "policy_kwargs['candidate_features']", v, 0, 4096
        ),
        "prior_temperature": lambda v: check_float(
            "policy_kwargs['prior_temperature']", v, 0, low_open=True
        ),
        "kl_to_prior": lambda v: check_bool("policy_kwargs['kl_to_prior']", v),
        # EditPriorPolicy (MaskablePPO on an edit env)
        "max_len": lambda v: check_int("policy_kwargs['max_len']", v, 1, 1 << 16),
        "k": lambda v: check_int("policy_kwargs['k']", v, 1, 1 << 16),
        "stop_logit": lambda v: check_float("policy_kwargs['stop_logit']", v, 0, low_open=True),
    },
}
_POLICY_KWARGS["last_block"] = {
    **_POLICY_KWARGS["lm_prior"],
    "model": lambda v: v if isinstance(v, str) or hasattr(v, "model") else _bad_model(v),
}


def _bad_model(value) -> None:
    raise ValueError(
        f"policy_kwargs['model'] must be a model name, folder or LanguageModel, got {value!r}."
    )


def _check_net_arch(value) -> None:
    layers = value
    if isinstance(value, dict):
        if not set(value) <= {"pi", "vf"}:
            raise ValueError(
                f"policy_kwargs['net_arch'] as an object takes keys 'pi' and 'vf', got {value!r}."
            )
        layers = [*value.get("pi", []), *value.get("vf", [])]
        if not all(isinstance(v, list) for v in value.values()):
            raise ValueError(f"policy_kwargs['net_arch'] values must be lists, got {value!r}.")
    if not isinstance(layers, list) or len(layers) > 2 * MAX_LAYERS:
        raise ValueError(
            f"policy_kwargs['net_arch'] must be a list of at most {MAX_LAYERS} layer widths (or "
            f"{{'pi': [...], 'vf': [...]}}), got {value!r}."
        )
    for width in layers:
        check_int("a policy_kwargs['net_arch'] width", width, 1, MAX_LAYER_WIDTH)


def check_policy_kwargs(policy: str, algo: str, kwargs) -> None:
    """Every entry of ``policy_kwargs`` is one the policy takes, of the right type and range
    (a class only where a class goes: a JSON config cannot hold one)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"policy_kwargs must be a dict, got {kwargs!r}.")
    takes = {**_SB3_KWARGS, **_POLICY_KWARGS[policy]}
    for name, value in kwargs.items():
        if name in _CLASS_KWARGS:
            if not isinstance(value, type):
                raise ValueError(
                    f"policy_kwargs[{name!r}] must be a class (e.g. torch.nn.Tanh), got "
                    f"{value!r}: classes are passed from Python, a JSON config cannot name one."
                )
        elif name in _DICT_KWARGS:
            if not isinstance(value, dict):
                raise ValueError(f"policy_kwargs[{name!r}] must be a dict, got {value!r}.")
        elif name in takes:
            takes[name](value)
        else:
            known = sorted([*takes, *_CLASS_KWARGS, *_DICT_KWARGS])
            raise ValueError(
                f"policy_kwargs has {name!r}, which policy={policy!r} does not take: use one of "
                f"{known}."
            )
