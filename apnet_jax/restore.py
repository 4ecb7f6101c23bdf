"""Models from files: a workdir's checkpoint, an official PyTorch checkpoint, ImageNet weights.

Every mode that runs a trained model (``eval``, ``extract``, ``export``,
``visualize``) gets it from `restore_model`; training starts the backbone
from torchvision's ImageNet ResNet with `init_from_imagenet`.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from apnet_jax import checkpointing, optim, train_step
from apnet_jax.models import build_model
from apnet_jax.weights import detect_layout, load_torch_weights, read_state_dict


def init_from_imagenet(model: nnx.Module, path: str) -> None:
  """Loads torchvision's ImageNet ResNet into the backbone; refuses partial loads."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"model.init_from: {path} does not exist. The official recipe starts from "
      "torchvision's ImageNet ResNet-50, resnet50-19c8e357.pth "
      "(https://download.pytorch.org/models/resnet50-19c8e357.pth); put it there, "
      "point --config.model.init_from at it, or set it to '' to train from scratch."
    )
  state = read_state_dict(path)
  if detect_layout(state) != "torchvision":
    raise ValueError(
      f"model.init_from: {path} is a whole official APNet checkpoint, not an "
      "ImageNet backbone; evaluate it with --config.eval.torch_checkpoint."
    )
  try:
    report = load_torch_weights(model, state)
  except ValueError as e:  # it names the keys; add the file
    raise ValueError(f"model.init_from: {path}: {e}") from e
  if report.missing:
    raise ValueError(f"model.init_from: {path} lacks backbone keys: {report.missing[:5]}")
  logging.info("Loaded %d ImageNet tensors from %s", len(report.loaded), path)


def restore_model(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.Module, dict]:
  """The model to evaluate, export or run, and where it came from.

  ``eval.torch_checkpoint`` (an official PyTorch checkpoint) if set; else the
  Orbax checkpoint of ``workdir`` at ``eval.step``, or the best by mAP when
  ``eval.use_best``, or the latest. The model is in eval mode. A checkpoint
  is checked only on what evaluation depends on (`checkpointing.EVAL_KEYS`).
  """
  if config.eval.torch_checkpoint:
    path = config.eval.torch_checkpoint
    state_dict = read_state_dict(os.path.expanduser(path))
    if "classifier.weight" not in state_dict:
      raise ValueError(
        f"eval.torch_checkpoint: {path} has no classifier.weight; is it an "
        "official APNet checkpoint?"
      )
    num_classes = state_dict["classifier.weight"].shape[0]
    # Abstract: a complete checkpoint fills every variable (checked below).
    model = nnx.eval_shape(lambda: build_model(config.model, num_classes, rngs=nnx.Rngs(0)))
    try:
      report = load_torch_weights(model, state_dict)
    except ValueError as e:  # it names the keys; add the file
      raise ValueError(f"eval.torch_checkpoint: {path}: {e}") from e
    if report.layout != "official" or report.missing:
      raise ValueError(
        f"eval.torch_checkpoint: {path} is not a complete official APNet "
        f"checkpoint for this model; missing: {report.missing[:5]}"
      )
    if report.unexpected:
      # Weights left out would score another model than the checkpoint's
      # (a level-2 checkpoint under model.level=1 loses its finer split).
      raise ValueError(
        f"eval.torch_checkpoint: {path} holds {len(report.unexpected)} weights this model "
        f"does not use, e.g. {report.unexpected[:5]}; check that model.level "
        f"({config.model.level}) and model.kind ({config.model.kind!r}) are the "
        "checkpoint's."
      )
    source = {"torch_checkpoint": os.path.abspath(config.eval.torch_checkpoint)}
  else:
    manager = checkpointing.make_manager(
      workdir, keep_best=config.train.keep_best, read_only=True
    )  # the run may still be training
    try:
      model, step = _restore_checkpoint(manager, config, workdir)
    finally:
      manager.close()
    source = {"checkpoint_step": int(step)}
  model.eval()
  return model, source


def _restore_checkpoint(
  manager, config: ml_collections.ConfigDict, workdir: str
) -> tuple[nnx.Module, int]:
  """The model of the checkpoint ``config.eval`` picks, and its step."""
  if config.eval.step >= 0:
    step = config.eval.step
  elif config.eval.use_best:
    step = checkpointing.best_step(manager)
    if step is None and manager.all_steps():
      steps = list(manager.all_steps())
      raise FileNotFoundError(
        f"config.eval.use_best: no checkpoint in {workdir}/checkpoints was evaluated during "
        f"training (kept steps {steps} carry no mAP), so none is best. Evaluate the latest "
        f"(step {max(steps)}) by leaving eval.use_best unset, or pick one with "
        "--config.eval.step=N."
      )
  else:
    step = manager.latest_step()
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(
      f"{workdir}/checkpoints has no checkpoint "
      f"{'at step ' + str(step) if step is not None else 'to evaluate'}"
      f" (it has: {list(manager.all_steps())})."
    )
  meta = checkpointing.restore_meta(manager, step)
  checkpointing.check_compatible(
    meta,
    dict(meta, model=config.model.to_dict(), data=config.data.to_dict()),
    workdir,
    keys=checkpointing.EVAL_KEYS,
  )
  tx, _ = optim.make_optimizer(config, 1)
  # An abstract train state as the restore target: the checkpoint fills every array.
  graphdef, state = nnx.eval_shape(
    lambda: train_step.create_train_state(
      build_model(config.model, meta["num_classes"], rngs=nnx.Rngs(0)), tx
    )
  )
  on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), state)
  state, _ = checkpointing.restore(manager, step, state)
  return nnx.merge(graphdef, state.params, state.model_state), step
