"""Where APNet looks (the paper's Fig. 2), and runs side by side with the paper.

For a few images and each of the five stages (the stem and the four ResNet
stages, each after its attention pyramid) this shows two things:

* Grad-CAM (Selvaraju et al., ICCV 2017) of the stage output: the stage's
  channels weighted by the spatially averaged gradient of one identity
  logit, summed, clipped at zero and scaled to a peak of 1 per image.
* The attention pyramid's own weights: APNet-C's SAMS weights of each channel
  group and its SE gate, APNet-S's spatial gate of each stripe.

`attention_maps` computes both for a model, `plot_attention` draws the grid
and `visualize_workdir` is ``python run.py --mode visualize``: the query
images of a trained run, written to ``WORKDIR/attention.png``.
`compare_runs` puts the ``results.json`` of several runs beside the paper's
numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from flax import nnx

from apnet_jax import config_check, progress, restore
from apnet_jax import workdir as workdir_lib
from apnet_jax.data import augment, pipeline, sources
from apnet_jax.evaluation import evaluator as evaluator_lib
from apnet_jax.evaluation import plots

matplotlib.use("Agg")  # files only; no display needed (servers, CI, Colab)

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")

# The paper's R1 / mAP (ResNet-50, no re-ranking; Chen et al., TIP 2021,
# arXiv 2108.05340), as in the README's benchmark table, keyed as
# results.json's protocol.dataset. CUHK03's is the labeled 767/700 figure the
# authors quote; MSMT17's is for the standard train split.
PAPER_RESULTS = {
  "market1501": {"R1": 96.2, "mAP": 90.5},
  "dukemtmc_reid": {"R1": 90.4, "mAP": 81.5},
  "cuhk03/labeled": {"R1": 87.4, "mAP": 85.3},
  "msmt17/train": {"R1": 83.7, "mAP": 63.5},
}


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
  """Grad-CAM and attention weights of N images (numpy arrays).

  Attributes:
    images: (N, H, W, 3) uint8, the images as the network saw them.
    target: (N,) the identity logit (train label) each Grad-CAM explains.
    grad_cam: per stage, (N, h, w) float32 in [0, 1] at the stage's
      resolution; each image's map peaks at 1 (all 0 if nothing in the stage
      speaks for the target).
    attention: per stage, the pyramid's weights in call order: SAMS
      (N, parts, C/parts) and SE (N, C) for APNet-C; spatial gates
      (N, h, w) for APNet-S.
    parts: the parts each pyramid attention splits the map into, finest
      first (1 = the whole map): channel groups or horizontal stripes.
    kind: 'channel' (APNet-C) or 'spatial' (APNet-S).
  """

  images: np.ndarray
  target: np.ndarray
  grad_cam: list[np.ndarray]
  attention: list[list[np.ndarray]]
  parts: tuple[int, ...]
  kind: str


@functools.partial(jax.jit, static_argnums=0)
def _maps(graphdef, state, images, labels):
  model = nnx.merge(graphdef, state)
  model.eval()
  x = augment.normalize(images)

  def target_logit(offsets):
    out = model(x, stage_offsets=offsets, return_stages=True, return_attention=True)
    # Unknown identities (-1) take the top logit; argmax has no gradient.
    target = jnp.where(labels >= 0, labels, jnp.argmax(out["logits"], axis=-1))
    return jnp.take_along_axis(out["logits"], target[:, None], 1).sum(), (out, target)

  shapes = jax.eval_shape(lambda: model(x, return_stages=True)["stages"])
  zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  # Images are independent in eval mode, so the gradient of the summed target
  # logits holds each image's own gradient.
  grads, (out, target) = jax.grad(target_logit, has_aux=True)(zeros)
  cams = [grad_cam_of(a, g) for a, g in zip(out["stages"], grads)]
  return cams, out["attention"], target


def grad_cam_of(activation: jax.Array, gradient: jax.Array) -> jax.Array:
  """Grad-CAM of a (B, h, w, C) map given the target's gradient: (B, h, w) in [0, 1]."""
  activation = activation.astype(jnp.float32)
  channel_weights = gradient.astype(jnp.float32).mean(axis=(1, 2), keepdims=True)
  cam = jax.nn.relu((activation * channel_weights).sum(axis=-1))
  peak = cam.max(axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1), 0)


def attention_maps(
  model: nnx.Module, images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None
) -> AttentionMaps:
  """Grad-CAM of every stage and the attention weights for ``images``.

  Runs in eval mode (the model's own mode is not changed).

  Args:
    model: an APNet.
    images: (N, H, W, 3) uint8, resized to the model's input size.
    labels: (N,) train labels whose logit each Grad-CAM explains; -1 (or
      None for all) takes the top logit. Query and gallery identities are
      never training classes in re-ID, so for them the map explains the
      training identity the image looks most like.

  Returns:
    An `AttentionMaps`.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(
      f"attention_maps takes uint8 images (N, H, W, 3), got {images.dtype} {images.shape}"
    )
  if len(images) == 0:
    raise ValueError("attention_maps got no images (N = 0)")
  num_classes = model.classifier.out_features
  labels = np.full(len(images), -1) if labels is None else np.asarray(labels)
  if (
    labels.shape != (len(images),)
    or labels.min(initial=-1) < -1
    or labels.max(initial=-1) >= num_classes
  ):
    raise ValueError(
      f"labels must be {len(images)} train labels in [-1, {num_classes}), got {labels.tolist()}"
    )
  graphdef, state = nnx.split(model)
  # One image per call (eval mode: images are independent), so one compilation
  # serves any count and the bar moves image by image.
  per_image = []
  with progress.bar(len(images), "attention maps", "img") as bar:
    for image, label in zip(images, labels):
      per_image.append(
        jax.device_get(
          _maps(graphdef, state, jnp.asarray(image[None]), jnp.asarray(label[None], jnp.int32))
        )
      )
      bar.update(1)
  cams, weights, target = jax.tree.map(lambda *parts: np.concatenate(parts), *per_image)
  squeeze = (lambda w: w[..., 0]) if model.kind == "spatial" else (lambda w: w)
  return AttentionMaps(
    images=images,
    target=np.asarray(target),
    grad_cam=[np.asarray(c) for c in cams],
    attention=[[np.asarray(squeeze(w)) for w in stage] for stage in weights],
    parts=tuple(model.pyramids[0].parts),
    kind=model.kind,
  )


def plot_attention(
  maps: AttentionMaps, path: str, *, query_labels: Sequence[str] | None = None
) -> None:
  """The grid of `attention_maps` as a PNG: per image, one block of rows.

  Columns: the image, then the five stages. Rows of a block: Grad-CAM over
  the image, then one row per pyramid attention, finest split first. APNet-C
  rows are heat strips of the per-channel weights in channel order (white
  lines between SAMS groups); APNet-S rows overlay each stripe's spatial gate
  on the image (white lines between stripes). Weights are drawn on a fixed
  0-1 scale, Grad-CAM per image peaking at 1.
  """
  n, stages = len(maps.images), len(maps.grad_cam)
  spatial = maps.kind == "spatial"
  attention_rows = len(maps.parts)
  ratios = ([2.0] + [2.0 if spatial else 0.4] * attention_rows) * n
  fig, axes = plt.subplots(
    len(ratios),
    stages + 1,
    dpi=80,
    squeeze=False,
    figsize=(0.95 * (stages + 1), 0.95 * sum(ratios)),
    gridspec_kw={"height_ratios": ratios},
  )
  height, width = maps.images.shape[1:3]
  overlay = {
    "cmap": "jet",
    "alpha": 0.5,
    "vmin": 0,
    "vmax": 1,
    "interpolation": "bilinear",
    "extent": (-0.5, width - 0.5, height - 0.5, -0.5),
  }
  for i in range(n):
    top = i * (attention_rows + 1)
    plots.show_image(axes[top, 0], maps.images[i], "#333333")
    axes[top, 0].set_title(query_labels[i] if query_labels else "query", fontsize=6)
    axes[top, 0].set_xlabel(f"Grad-CAM of train id {maps.target[i]}", fontsize=5)
    for s in range(stages):
      plots.show_image(axes[top, s + 1], maps.images[i], "#333333")
      axes[top, s + 1].imshow(maps.grad_cam[s][i], **overlay)
      if i == 0:
        axes[top, s + 1].set_title(STAGE_NAMES[s], fontsize=7)
    for r, parts in enumerate(maps.parts):
      row = axes[top + 1 + r]
      row[0].axis("off")
      if spatial:
        name = f"RGA-S, {parts} stripes" if parts > 1 else "RGA-S, whole"
      else:
        name = f"SAMS, {parts} groups" if parts > 1 else "SE"
      row[0].text(0.5, 0.5, name, fontsize=6, ha="center", va="center", transform=row[0].transAxes)
      for s in range(stages):
        weights = maps.attention[s][r][i]
        if spatial:
          plots.show_image(row[s + 1], maps.images[i], "#333333")
          row[s + 1].imshow(weights, **overlay)
          for k in range(1, parts):
            row[s + 1].axhline(k * height / parts - 0.5, color="white", linewidth=0.8)
        else:
          strip = weights.reshape(1, -1)  # SAMS groups side by side, in channel order
          plots.show_image(
            row[s + 1],
            strip,
            "#333333",
            cmap="viridis",
            vmin=0,
            vmax=1,
            aspect="auto",
            interpolation="nearest",
          )
          for k in range(1, parts):
            row[s + 1].axvline(k * strip.shape[1] / parts - 0.5, color="white", linewidth=0.8)
  fig.tight_layout(pad=0.3)
  fig.savefig(path)
  plt.close(fig)


def visualize_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode visualize``: attention maps of query images to ``workdir/attention.png``.

  The model is restored as ``--mode eval`` does (see `restore.restore_model`);
  the ``visualize.num_queries`` queries are spread evenly over the query
  split of the evaluator's first dataset. Returns the PNG's path (written by
  process 0 only).
  """
  config_check.check_mode(config, "visualize")
  num_queries = config.visualize.num_queries
  workdir = os.path.abspath(os.path.expanduser(workdir))
  model, _ = restore.restore_model(config, workdir)
  dataset = evaluator_lib.open_eval_dataset(config, evaluator_lib.eval_entries(config)[0])
  query = sources.load_split(dataset.builder, "query")
  picked = np.linspace(0, len(query) - 1, min(num_queries, len(query))).astype(int)
  height, width = config.model.input_size
  batch = next(
    iter(
      pipeline.eval_batches(
        [query[int(i)] for i in picked],
        batch_size=len(picked),
        height=height,
        width=width,
        process_index=0,
        process_count=1,
      )
    )
  )
  maps = attention_maps(model, batch["image"])
  path = os.path.join(workdir, "attention.png")
  if jax.process_index() == 0:
    workdir_lib.ensure_workdir(workdir)  # a torch_checkpoint run may not have one yet
    with workdir_lib.replace_file(path) as staging:  # a kill mid-write keeps the last one
      plot_attention(maps, staging, query_labels=[f"pid {pid}" for pid in batch["pid"]])
    print(f"attention maps of {len(picked)} queries -> {path}")
  return path


def compare_runs(runs: Sequence[str]) -> str:
  """A table of several runs' R1 / mAP beside the paper's (`PAPER_RESULTS`).

  Args:
    runs: workdirs, or their ``results.json`` files.

  Returns:
    The table as text; runs of datasets without a paper figure show '-'.
  """
  rows = [("run", "dataset", "distractors", "R1", "mAP", "paper R1", "paper mAP")]
  for run in runs:
    path = os.path.expanduser(run)
    if os.path.isdir(path):
      path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"no results.json at {path}; evaluate the run first "
        "(python run.py --mode eval --workdir ...)"
      )
    with open(path) as f:
      results = json.load(f)
    try:
      dataset = results["protocol"]["dataset"]
      distractors = results["protocol"]["distractors"].split(" ")[0]
      measured = (f"{results['R1']:.1f}", f"{results['mAP']:.1f}")
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path} lacks {e} (not a results.json of apnet-jax?)") from None
    paper = PAPER_RESULTS.get(dataset)
    published = (f"{paper['R1']:.1f}", f"{paper['mAP']:.1f}") if paper else ("-", "-")
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    rows.append((name, dataset, distractors, *measured, *published))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join(
    "  ".join(
      cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
    )
    for row in rows
  )
