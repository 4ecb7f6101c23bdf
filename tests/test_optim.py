"""The optimiser against a numpy torch.optim.Adam and the official per-epoch schedule."""

from bisect import bisect_right

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from apnet_jax import optim
from apnet_jax.models import layers
from configs.common import get_config


def official_lr(epoch, base_lr, milestones, gamma, warmup_factor, warmup_iters):
  """WarmupMultiStepLR.get_lr with last_epoch = epoch (linear warmup)."""
  factor = 1.0
  if epoch < warmup_iters:
    alpha = epoch / warmup_iters
    factor = warmup_factor * (1 - alpha) + alpha
  return base_lr * factor * gamma ** bisect_right(milestones, epoch)


def test_default_config_is_the_official_recipe():
  # configs/default.yml (SOLVER) and config/defaults.py (MARGIN, SMOOTH).
  cfg = get_config()
  assert cfg.optim.base_lr == 4e-4 and cfg.optim.weight_decay == 1e-3
  # WEIGHT_DECAY_BIAS 0.001 = WEIGHT_DECAY: unset here, the biases follow weight_decay.
  assert cfg.optim.bias_lr_factor == 1 and cfg.optim.weight_decay_bias is None
  assert tuple(cfg.optim.betas) == (0.9, 0.999)
  assert cfg.optim.warmup_factor == 0.01 and cfg.optim.warmup_epochs == 10
  assert cfg.optim.gamma == 0.1
  assert cfg.loss.margin == 0.3 and cfg.loss.label_smoothing == 0.1


def test_default_schedule_hand_computed_values():
  steps_per_epoch = 5
  schedule = optim.make_schedule(get_config().optim, steps_per_epoch)
  # epoch -> lr, by hand from configs/default.yml (base 4e-4, warmup 0.01 over
  # 10 epochs, x0.1 at 40/80/120).
  expected = {
    0: 4e-6,
    1: 4e-4 * 0.109,
    5: 4e-4 * 0.505,
    9: 4e-4 * 0.901,
    10: 4e-4,
    39: 4e-4,
    40: 4e-5,
    79: 4e-5,
    80: 4e-6,
    119: 4e-6,
    120: 4e-7,
    159: 4e-7,
  }
  for epoch, lr in expected.items():
    for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
      np.testing.assert_allclose(schedule(step), lr, rtol=1e-6, err_msg=f"step {step}")


def test_default_schedule_matches_official_scheduler_over_160_epochs():
  # default.yml lists STEPS [40, 80, 120, 160]; training stops after epoch 159,
  # so the 160 milestone never applies.
  cfg = get_config()
  schedule = jax.jit(optim.make_schedule(cfg.optim, 3))
  for epoch in range(cfg.train.epochs):
    ref = official_lr(epoch, 4e-4, [40, 80, 120, 160], 0.1, 0.01, 10)
    np.testing.assert_allclose(schedule(3 * epoch + 1), ref, rtol=1e-6, err_msg=f"epoch {epoch}")


def test_schedule_other_settings_match_official_formula():
  cfg = ml_collections.ConfigDict(
    dict(base_lr=3e-4, warmup_factor=1 / 3, warmup_epochs=4, milestones=(2, 6, 6, 9), gamma=0.5)
  )
  schedule = optim.make_schedule(cfg, 1)
  for epoch in range(12):
    np.testing.assert_allclose(
      schedule(epoch), official_lr(epoch, 3e-4, [2, 6, 6, 9], 0.5, 1 / 3, 4), rtol=1e-6
    )
  no_warmup = optim.make_schedule(
    ml_collections.ConfigDict(
      dict(base_lr=1e-3, warmup_factor=0.01, warmup_epochs=0, milestones=(), gamma=0.1)
    ),
    7,
  )
  np.testing.assert_allclose(no_warmup(0), 1e-3, rtol=1e-6)


def test_schedule_rejects_a_step_count_of_zero():
  cfg = get_config().optim
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.make_schedule(cfg, 0)


class Tiny(nnx.Module):
  """A linear layer with bias, a BatchNorm and a BNNeck-style BatchNorm."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(3, 2, rngs=rngs)
    self.bn = layers.BatchNorm(2)
    self.neck = layers.BatchNorm(2, frozen_bias=True)


def torch_adam_reference(params, grads_per_step, lrs, *, wd, wd_bias, bias_factor, betas, eps=1e-8):
  """torch.optim.Adam (PyTorch docs algorithm, amsgrad=False, maximize=False).

  For t = 1..T: g <- g + wd * theta; m <- b1 m + (1 - b1) g;
  v <- b2 v + (1 - b2) g^2; m_hat = m / (1 - b1^t); v_hat = v / (1 - b2^t);
  theta <- theta - lr * m_hat / (sqrt(v_hat) + eps). Biases: their own wd and lr.
  """
  b1, b2 = betas
  theta = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    for k in theta:
      bias = k.endswith("bias")
      g = grads[k] + (wd_bias if bias else wd) * theta[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      theta[k] = theta[k] - lr * (bias_factor if bias else 1.0) * m_hat / (np.sqrt(v_hat) + eps)
  return theta


def flat(state):
  return {
    jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
    for p, x in jax.tree_util.tree_leaves_with_path(state)
  }


@pytest.mark.parametrize(
  "bias_lr_factor, weight_decay_bias, torch_weight_decay_bias",
  [
    (1.0, 0.05, 0.05),  # As configs/default.yml: biases treated like everything else.
    (2.0, 0.0, 0.0),  # config/defaults.py's values: the groups differ.
    (1.0, None, 0.05),  # Unset: the biases decay by weight_decay, whatever it is set to.
  ],
)
def test_adam_steps_match_torch_adam(bias_lr_factor, weight_decay_bias, torch_weight_decay_bias):
  config = get_config()
  config.optim.bias_lr_factor = bias_lr_factor
  config.optim.weight_decay_bias = weight_decay_bias
  config.optim.weight_decay = 0.05  # Large enough to matter in 3 steps.
  config.optim.base_lr = 0.1
  steps_per_epoch = 1  # The warmup changes the rate at every step.
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)

  _, params, _ = nnx.split(Tiny(nnx.Rngs(0)), nnx.Param, ...)
  names = sorted(flat(params))
  # The frozen BNNeck bias is not a parameter; the other biases are.
  assert names == [
    "bn/bias/value",
    "bn/scale/value",
    "fc/bias/value",
    "fc/kernel/value",
    "neck/scale/value",
  ]
  rng = np.random.default_rng(0)
  grads_np = [{k: rng.normal(0, 1, x.shape) for k, x in flat(params).items()} for _ in range(3)]
  expected = torch_adam_reference(
    {k.removesuffix("/value"): v for k, v in flat(params).items()},
    [{k.removesuffix("/value"): v for k, v in g.items()} for g in grads_np],
    [float(schedule(s)) for s in range(3)],
    wd=0.05,
    wd_bias=torch_weight_decay_bias,
    bias_factor=bias_lr_factor,
    betas=(0.9, 0.999),
  )

  initial = flat(params)
  opt_state = tx.init(params)
  treedef = jax.tree.structure(params)
  for step, g in enumerate(grads_np):
    grads = jax.tree.unflatten(treedef, [jnp.asarray(g[k], jnp.float32) for k in names])
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(optim.current_learning_rate(opt_state), schedule(step), rtol=1e-7)
  got = {k.removesuffix("/value"): v for k, v in flat(params).items()}
  for k in expected:
    # Compare the displacements. optax computes Adam's bias corrections
    # 1 - b**t in float32 (torch in float64): 1 - 0.999 loses ~1e-5 relative,
    # so the updates agree to ~1e-5 relative, not to float32 epsilon.
    start = initial[k + "/value"]
    np.testing.assert_allclose(got[k] - start, expected[k] - start, rtol=3e-5, atol=1e-9, err_msg=k)
    assert np.all(np.abs(expected[k] - start) > 1e-3)  # Every entry moved.
  dtypes = {x.dtype for x in jax.tree.leaves(opt_state)}
  assert dtypes == {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}  # Moments, lr; counts.


def test_is_bias_uses_the_parameter_name():
  _, params, rest = nnx.split(Tiny(nnx.Rngs(0)), nnx.Param, ...)
  found = {
    jax.tree_util.keystr(p, simple=True, separator="/"): optim.is_bias(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(params)
  }
  assert found == {
    "bn/bias/value": True,
    "bn/scale/value": False,
    "fc/bias/value": True,
    "fc/kernel/value": False,
    "neck/scale/value": False,
  }
  assert (
    optim.is_bias((jax.tree_util.DictKey("bias_free"), jax.tree_util.DictKey("kernel"))) is False
  )


def test_current_learning_rate_needs_make_optimizer_state():
  state = optax.adam(1e-3).init({"w": jnp.zeros(2)})
  with pytest.raises(TypeError, match="make_optimizer"):
    optim.current_learning_rate(state)
