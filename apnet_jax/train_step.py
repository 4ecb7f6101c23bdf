"""The sharded, jitted APNet train step: augment, forward, loss, Adam update.

One ``jax.jit`` over a 1-D device mesh with axis ``'data'``: the global batch
is one array sharded along its first axis, the train state is replicated
and donated. Because the batch is a single global array, BatchNorm
statistics, the triplet distance matrix and its hard-example mining span the
whole batch whatever the number of devices; XLA inserts the cross-device
reductions, so no ``axis_name``/``pmean`` appears here.

The model travels as ``(graphdef, params, model_state)``: ``params`` holds
the ``nnx.Param`` leaves (the only thing the optimiser and the gradients
see); ``model_state`` holds the model's other variables (BatchNorm running
statistics, the biases frozen at zero). The step merges them back into a module *inside* the trace
and splits the updated running statistics out after the forward pass.

Randomness is a pure function of ``(seed, step)`` (``fold_in`` of the step
counter kept on device), so a resumed run draws the same augmentations and
no host synchronisation is needed.

Typical use::

  mesh = sharding.make_mesh()
  tx, _ = optim.make_optimizer(config, steps_per_epoch)
  graphdef, state = create_train_state(model, tx)
  state = jax.device_put(state, sharding.replicated_sharding(mesh))
  train_step = make_train_step(graphdef, tx, num_classes=n, config=config,
                               mesh=mesh, seed=config.seed)
  for host_batch in loader:
    state, metrics = train_step(state, sharding.shard_batch(host_batch, mesh))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from apnet_jax import losses, optim, sharding
from apnet_jax.data import augment
from apnet_jax.models import layers
from apnet_jax.platform import cpu

__all__ = ["TrainState", "TrainStep", "create_train_state", "make_train_step"]

# The batch entries the step consumes; anything else in a loader batch
# (pid, camid, index) stays on the host.
_STEP_KEYS = ("image", "label")

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training: a plain pytree of arrays.

  Attributes:
    params: the model's ``nnx.Param`` state (trained).
    model_state: the model's other variables (BatchNorm running mean/var,
      frozen biases); not trained.
    opt_state: the optax state of ``params``.
    step: int32 scalar, the number of updates made so far.
  """

  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState
  step: jax.Array


def create_train_state(
  model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits a model into its static graph and a fresh train state.

  The model is put in training mode first (batch statistics in every
  BatchNorm), which the returned ``graphdef`` records.

  Args:
    model: the APNet module (e.g. from ``apnet_jax.build_model``).
    tx: the optimiser (e.g. from ``apnet_jax.optim.make_optimizer``).

  Returns:
    ``(graphdef, state)`` with ``state.step == 0``.
  """
  model.train()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state = TrainState(
    params=params,
    model_state=model_state,
    # Jitted: eagerly, each zero-filled moment would compile a program per shape.
    opt_state=jax.jit(tx.init)(params),
    step=jnp.zeros((), jnp.int32),
  )
  return graphdef, state


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  *,
  num_classes: int,
  config: Any,
  mesh: Mesh,
  seed: int,
) -> TrainStep:
  """Builds the jitted train step.

  Args:
    graphdef: from :func:`create_train_state`.
    tx: the optimiser that made ``state.opt_state`` (from
      :func:`apnet_jax.optim.make_optimizer`: the ``lr`` metric is read from
      its state).
    num_classes: number of train identities (classifier outputs).
    config: the full config; reads ``config.loss.margin``,
      ``config.loss.label_smoothing`` and ``config.augment.{pad, flip_p,
      erase_p}``.
    mesh: a mesh with a ``'data'`` axis, e.g. `apnet_jax.sharding.make_mesh`.
    seed: the training seed; the augmentation key of step ``s`` is
      ``fold_in(key(seed), s)``.

  Returns:
    A `TrainStep`: ``train_step(state, batch) -> (state, metrics)``. ``batch`` needs
    ``image`` (uint8 (B, H, W, 3)) and ``label`` (int (B,)), ideally
    already sharded with `apnet_jax.sharding.shard_batch`; other entries are ignored.
    ``state`` must be replicated on the mesh (``jax.device_put(state,
    sharding.replicated_sharding(mesh))``) and is donated: do not use it after the
    call. ``metrics`` are float32 device scalars: ``loss``, ``ce``,
    ``triplet``, ``acc``, ``lr``, ``grad_norm`` (of the loss gradient,
    before weight decay), ``param_norm`` (after the update), ``dist_ap``,
    ``dist_an``. On CPU devices the model convolves with
    `apnet_jax.platform.cpu.conv_general_dilated` inside the step.
  """
  sharding.check_mesh(mesh)
  margin = float(config.loss.margin)
  epsilon = float(config.loss.label_smoothing)
  augment_kwargs = {
    "pad": int(config.augment.pad),
    "flip_p": float(config.augment.flip_p),
    "erase_p": float(config.augment.erase_p),
  }
  base_key = jax.random.key(int(seed))
  convolution = cpu.convolution_for(mesh)

  def loss_fn(params, model_state, images, labels):
    # copy=True: fresh Variables at this trace level, so the BatchNorm update
    # below neither trips NNX's trace check nor touches the caller's state.
    model = nnx.merge(graphdef, params, model_state, copy=True)
    outputs = model(images)
    loss, aux = losses.total_loss(
      outputs, labels, num_classes=num_classes, margin=margin, epsilon=epsilon
    )
    # The forward pass updated the BatchNorm running statistics in `model`.
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss, (aux, new_model_state)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(base_key, state.step)
    images = augment.train_augment(rng, batch["image"], **augment_kwargs)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    with layers.convolution(convolution):
      (loss, (aux, new_model_state)), grads = grad_fn(
        state.params, state.model_state, images, batch["label"]
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      **aux,
      "lr": optim.current_learning_rate(opt_state),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
    }
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = TrainState(
      params=params, model_state=new_model_state, opt_state=opt_state, step=state.step + 1
    )
    return new_state, metrics

  replicated = sharding.replicated_sharding(mesh)
  jitted = jax.jit(
    step,
    in_shardings=(replicated, sharding.data_sharding(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
    compiler_options=cpu.compiler_options(mesh),
  )

  return TrainStep(step=step, jitted=jitted, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The train step of `make_train_step`: call it with ``(state, batch)``.

  Attributes:
    step: the plain function ``(state, batch) -> (state, metrics)``, to trace
      inside other transformations (``jax.make_jaxpr``, ``jax.eval_shape``).
    jitted: ``step`` jitted for ``mesh``, with the platform's compiler
      options (which JAX allows only on a top-level jit).
    mesh: the mesh the batch is sharded over.
  """

  step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, Metrics]]
  jitted: Any
  mesh: Mesh

  def __call__(
    self, state: TrainState, batch: Mapping[str, jax.Array]
  ) -> tuple[TrainState, Metrics]:
    """Checks the batch (names what is wrong), then runs the jitted step."""
    missing = [k for k in _STEP_KEYS if k not in batch]
    if missing:
      raise KeyError(f"train_step: the batch has no {missing} (got keys {sorted(batch)}).")
    image, label = batch["image"], batch["label"]
    if image.dtype != jnp.uint8 or image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(
        f"train_step: batch['image'] must be uint8 (B, H, W, 3), got {image.dtype} {image.shape}."
      )
    if label.shape != image.shape[:1] or not jnp.issubdtype(label.dtype, jnp.integer):
      raise ValueError(
        f"train_step: batch['label'] must be integer ({image.shape[0]},), got "
        f"{label.dtype} {label.shape}."
      )
    devices = self.mesh.shape[sharding.DATA_AXIS]
    if image.shape[0] % devices:
      raise ValueError(
        f"train_step: batch size {image.shape[0]} is not divisible by the "
        f"{devices} devices of the mesh's 'data' axis."
      )
    return self.jitted(state, {"image": image, "label": label})
