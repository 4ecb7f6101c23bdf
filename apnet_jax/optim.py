"""The official APNet optimiser: PyTorch Adam with coupled weight decay, per-epoch warmup + steps.

Optimiser (``solver/build.py::make_optimizer``). ``torch.optim.Adam`` adds
``weight_decay * w`` to the gradient *before* the moment estimates (coupled
L2, not AdamW's decoupled decay), hence

    add_decayed_weights -> scale_by_adam(eps=1e-8) -> scale_by_learning_rate

Every trainable parameter whose PyTorch name contains ``"bias"`` gets its own
group with learning rate ``base_lr * BIAS_LR_FACTOR`` and weight decay
``WEIGHT_DECAY_BIAS``; all others (convolution/linear kernels, BatchNorm
scales) get ``base_lr`` and ``WEIGHT_DECAY``. Here a parameter is a bias when
its own name (the last key of its path in the ``nnx.Param`` state) is
``bias``: the BatchNorm shifts and the SAMS convolution biases. The biases
frozen at zero (BNNeck, BatchNorm after SAMS) are ``FrozenBias`` variables,
not ``nnx.Param``, so the optimiser never sees them, as ``requires_grad``
False parameters are skipped in the official code. ``configs/default.yml``
sets ``BIAS_LR_FACTOR: 1`` and ``WEIGHT_DECAY_BIAS: 0.001`` (= WEIGHT_DECAY),
so with the official recipe all parameters are treated alike; the groups
matter only when a config changes them. ``optim.weight_decay_bias`` left
unset (None) follows ``optim.weight_decay``: a config that changes the decay
changes it for the biases too unless it sets both.

Learning rate (``solver/lr_scheduler.py::WarmupMultiStepLR``, stepped once per
*epoch* by the trainer, starting at epoch 0):

    lr(epoch) = base_lr * warmup(epoch) * gamma ** bisect_right(milestones, epoch)
    warmup(epoch) = warmup_factor * (1 - epoch / warmup_epochs) + epoch / warmup_epochs
                    for epoch < warmup_epochs, else 1

so epoch 0 trains at ``warmup_factor * base_lr`` and epoch ``warmup_epochs``
is the first at ``base_lr``. Epochs are counted from the global step:
``epoch = step // steps_per_epoch``. The learning rate used by each update
is recorded in the optimiser state (``optax.inject_hyperparams``) and read
back with :func:`current_learning_rate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apnet_jax import config_check

__all__ = ["current_learning_rate", "is_bias", "make_optimizer", "make_schedule"]

# torch.optim.Adam's default epsilon (added to sqrt(v_hat), outside the root).
_ADAM_EPS = 1e-8


def make_schedule(optim_config: Any, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """The official per-epoch WarmupMultiStepLR as a function of the global step.

  Args:
    optim_config: the config's ``optim`` section: ``base_lr``,
      ``warmup_factor``, ``warmup_epochs``, ``milestones`` (epochs, sorted)
      and ``gamma``, in the ranges of `apnet_jax.config_check.RULES` (the
      modes check them before they get here).
    steps_per_epoch: optimiser steps per epoch (>= 1).

  Returns:
    ``schedule(step) -> float32 learning rate``, jittable.
  """
  if int(steps_per_epoch) < 1:
    raise ValueError(f"make_schedule: steps_per_epoch must be >= 1, got {steps_per_epoch}.")
  base_lr = float(optim_config.base_lr)
  warmup_factor = float(optim_config.warmup_factor)
  warmup_epochs = int(optim_config.warmup_epochs)
  milestones = tuple(int(m) for m in optim_config.milestones)
  gamma = float(optim_config.gamma)
  steps_per_epoch = int(steps_per_epoch)
  milestone_array = np.asarray(milestones, np.int32)

  def schedule(step: jax.Array) -> jax.Array:
    epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
    if warmup_epochs > 0:
      alpha = epoch.astype(jnp.float32) / warmup_epochs
      warmup = jnp.where(epoch < warmup_epochs, warmup_factor * (1.0 - alpha) + alpha, 1.0)
    else:
      warmup = jnp.float32(1.0)
    # bisect_right(milestones, epoch) = number of milestones <= epoch.
    decays = jnp.sum(milestone_array <= epoch)
    return (base_lr * warmup * gamma**decays).astype(jnp.float32)

  return schedule


def is_bias(path: tuple[Any, ...]) -> bool:
  """Whether a parameter path (from ``jax.tree_util``) names a bias.

  The last named key of the path is used (``nnx.State`` paths end with the
  Variable's ``.value`` attribute, which is skipped).
  """
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return key.key == "bias"
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
      return key.name == "bias"
  return False


def _bias_mask(params: Any, want_bias: bool) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, _: is_bias(p) == want_bias, params)


def make_optimizer(
  config: Any, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """PyTorch-Adam with coupled weight decay, bias groups and the official schedule.

  Args:
    config: the full config; reads ``config.optim``: ``base_lr``,
      ``weight_decay``, ``bias_lr_factor``, ``weight_decay_bias`` (None:
      ``weight_decay``),
      ``betas``, ``warmup_factor``, ``warmup_epochs``, ``milestones``,
      ``gamma``.
    steps_per_epoch: optimiser steps per epoch.

  Returns:
    ``(tx, schedule)``: the optax transformation (apply it to the
    ``nnx.Param`` state only) and ``schedule(step) -> lr`` for the non-bias
    parameters (biases use ``bias_lr_factor`` times it).
  """
  optim = config.optim
  schedule = make_schedule(optim, steps_per_epoch)
  b1, b2 = (float(b) for b in optim.betas)
  weight_decay = float(optim.weight_decay)
  weight_decay_bias = float(config_check.effective_value(config, "optim.weight_decay_bias"))
  bias_lr_factor = float(optim.bias_lr_factor)

  def adam(learning_rate: jax.Array) -> optax.GradientTransformation:
    # Coupled decay per group, one Adam (elementwise, so one Adam over both
    # groups equals two), then the per-group learning rate.
    return optax.chain(
      optax.masked(optax.add_decayed_weights(weight_decay), lambda p: _bias_mask(p, False)),
      optax.masked(optax.add_decayed_weights(weight_decay_bias), lambda p: _bias_mask(p, True)),
      optax.scale_by_adam(b1=b1, b2=b2, eps=_ADAM_EPS),
      optax.scale_by_learning_rate(learning_rate),
      optax.masked(optax.scale(bias_lr_factor), lambda p: _bias_mask(p, True)),
    )

  tx = optax.inject_hyperparams(adam, hyperparam_dtype=jnp.float32)(learning_rate=schedule)
  return tx, schedule


def current_learning_rate(opt_state: Any) -> jax.Array:
  """The (non-bias) learning rate of the last update made with ``opt_state``.

  Before any update this is the rate of step 0.
  """
  hyperparams = getattr(opt_state, "hyperparams", None)
  if not isinstance(hyperparams, dict) or "learning_rate" not in hyperparams:
    raise TypeError(
      "current_learning_rate: opt_state does not come from make_optimizer's "
      f"transformation (got {type(opt_state).__name__})."
    )
  return hyperparams["learning_rate"]
