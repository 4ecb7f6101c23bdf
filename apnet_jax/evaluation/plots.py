"""Pictures of an evaluation: the CMC curve and ranked lists.

Ranked lists follow the protocol: for each query, gallery images of the same
identity seen by the same camera are left out, and the rest is ranked by the
distance of the L2-normalized features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from apnet_jax import images
from apnet_jax.evaluation import metrics


def plot_cmc(
  curves: dict[str, Sequence[float]], path: str | None = None, *, title: str = ""
) -> np.ndarray:
  """CMC curves (rank-k accuracy in %, k = 1..len) of one or more runs.

  Returns the picture, uint8 (H, W, 3); writes it to ``path`` (a PNG) if given.
  """
  # The object-oriented API: no pyplot state, and the caller's backend (a
  # notebook's, say) is left alone. Imported here: loading matplotlib takes 0.4 s.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(5, 3.6), dpi=120)
  ax = fig.subplots()
  for label, cmc in curves.items():
    cmc = 100 * np.asarray(cmc, np.float64)
    ax.plot(np.arange(1, len(cmc) + 1), cmc, label=f"{label} (R1 {cmc[0]:.1f})")
  ax.set_xlabel("rank")
  ax.set_ylabel("matching rate (%)")
  ax.set_xscale("log")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  picture = np.asarray(canvas.buffer_rgba())[..., :3].copy()
  if path is not None:
    Image.fromarray(picture).save(path)
  return picture


def rank(
  query_features: np.ndarray,
  gallery_features: np.ndarray,
  *,
  top: int,
  exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-``top`` gallery indices and distances per query (L2-normalized, euclidean).

  ``exclude`` (Q, G) marks pairs left out of the ranking.
  """

  def normalized(x):
    # The evaluator's epsilon: an all-zero feature ranks at distance sqrt(2), not NaN.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), metrics.NORM_EPS)

  dist = np.sqrt(
    np.clip(2 - 2 * normalized(query_features) @ normalized(gallery_features).T, 1e-12, None)
  )
  if exclude is not None:
    dist[exclude] = np.inf
  order = np.argsort(dist, axis=1, kind="stable")[:, :top]
  return order, np.take_along_axis(dist, order, axis=1)


def ranked_lists(
  query_features: np.ndarray,
  gallery_features: np.ndarray,
  query_pids: np.ndarray,
  gallery_pids: np.ndarray,
  query_camids: np.ndarray,
  gallery_camids: np.ndarray,
  *,
  top: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-``top`` gallery indices per query under the protocol, and which are true matches."""
  junk = (query_pids[:, None] == gallery_pids[None]) & (
    query_camids[:, None] == gallery_camids[None]
  )
  order, _ = rank(query_features, gallery_features, top=top, exclude=junk)
  return order, gallery_pids[order] == query_pids[:, None]


# Ranked-list pictures: every image at one size (re-ID crops are about 2:1),
# in a frame of its verdict's colour, with a line of text above each row.
_CELL_HW = (128, 64)
_FRAME, _GAP, _QUERY_GAP, _TEXT = 3, 6, 10, 14
_MATCH, _MISMATCH, _UNKNOWN, _QUERY = "#1a9641", "#d7191c", "#888888", "#333333"


def plot_ranked_lists(
  query_images: Sequence[np.ndarray],
  gallery_images: Sequence[Sequence[Any]],
  matches: np.ndarray | None,
  path: str | None = None,
  *,
  query_labels: Sequence[str] | None = None,
) -> np.ndarray:
  """Each query beside its top gallery images: true matches framed green, others red.

  Drawn with PIL, image by image (matplotlib took ~2 s for a grid of 8 x 11).

  Args:
    query_images: N images (H, W, 3) uint8.
    gallery_images: N rows of ``top`` images each.
    matches: (N, top) booleans, or None when identities are unknown (grey frames).
    path: the PNG to write, if any.
    query_labels: optional caption above each query.

  Returns:
    The picture, uint8 (H, W, 3).
  """
  n, top = len(gallery_images), len(gallery_images[0])
  cell_h, cell_w = _CELL_HW
  framed_w, framed_h = cell_w + 2 * _FRAME, cell_h + 2 * _FRAME
  row_h = _TEXT + framed_h + _GAP
  canvas = Image.new(
    "RGB", (_GAP + _QUERY_GAP + (top + 1) * (framed_w + _GAP), _GAP + n * row_h), "white"
  )
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()

  def put(image, color, row, column, caption):
    x = _GAP + column * (framed_w + _GAP) + (_QUERY_GAP if column else 0)
    y = _GAP + row * row_h
    if caption:
      caption = _fit(draw, caption, font, framed_w + _GAP)
      draw.text(
        (x + (framed_w - draw.textlength(caption, font=font)) / 2, y),
        caption,
        fill="black",
        font=font,
      )
    draw.rectangle((x, y + _TEXT, x + framed_w - 1, y + _TEXT + framed_h - 1), fill=color)
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    canvas.paste(picture.resize((cell_w, cell_h), Image.BILINEAR), (x + _FRAME, y + _TEXT + _FRAME))

  for i in range(n):
    put(query_images[i], _QUERY, i, 0, query_labels[i] if query_labels else "query")
    for j in range(top):
      color = _UNKNOWN if matches is None else _MATCH if matches[i, j] else _MISMATCH
      put(gallery_images[i][j], color, i, j + 1, str(j + 1) if i == 0 else "")
  if path is not None:
    canvas.save(path)
  return np.asarray(canvas)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
  """``text``, cut short with an ellipsis where it is wider than ``width`` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


def show_image(ax, image, color: str, **imshow_kwargs) -> None:
  """An image (or any array ``imshow`` takes) without ticks, framed in ``color``."""
  ax.imshow(image, **imshow_kwargs)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(color)
    spine.set_linewidth(3)


def decode(image_bytes: bytes, name: str = "<record image>") -> np.ndarray:
  """An encoded image as RGB uint8, decoded as training and extraction decode it."""
  return np.asarray(images.decode_rgb(image_bytes, name))
