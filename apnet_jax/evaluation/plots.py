"""Pictures of an evaluation: the CMC curve and ranked lists.

Ranked lists follow the protocol: for each query, gallery images of the same
identity seen by the same camera are left out, and the rest is ranked by the
distance of the L2-normalized features.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI, Colab)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def plot_cmc(curves: dict[str, Sequence[float]], path: str, *, title: str = "") -> None:
  """CMC curves (rank-k accuracy in %, k = 1..len) of one or more runs, to a PNG."""
  fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
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
  fig.savefig(path)
  plt.close(fig)


def rank(query_features: np.ndarray, gallery_features: np.ndarray, *, top: int,
         exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-``top`` gallery indices and distances per query (L2-normalized, euclidean).

  ``exclude`` (Q, G) marks pairs left out of the ranking.
  """
  q = query_features / np.linalg.norm(query_features, axis=1, keepdims=True)
  g = gallery_features / np.linalg.norm(gallery_features, axis=1, keepdims=True)
  dist = np.sqrt(np.clip(2 - 2 * q @ g.T, 1e-12, None))
  if exclude is not None:
    dist[exclude] = np.inf
  order = np.argsort(dist, axis=1, kind="stable")[:, :top]
  return order, np.take_along_axis(dist, order, axis=1)


def ranked_lists(query_features: np.ndarray, gallery_features: np.ndarray,
                 query_pids: np.ndarray, gallery_pids: np.ndarray,
                 query_camids: np.ndarray, gallery_camids: np.ndarray, *,
                 top: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Top-``top`` gallery indices per query under the protocol, and which are true matches."""
  junk = (query_pids[:, None] == gallery_pids[None]) & (query_camids[:, None]
                                                        == gallery_camids[None])
  order, _ = rank(query_features, gallery_features, top=top, exclude=junk)
  return order, gallery_pids[order] == query_pids[:, None]


def plot_ranked_lists(query_images: Sequence[np.ndarray], gallery_images: Sequence[Sequence[Any]],
                      matches: np.ndarray | None, path: str, *,
                      query_labels: Sequence[str] | None = None) -> None:
  """Each query beside its top gallery images: true matches framed green, others red.

  Args:
    query_images: N images (H, W, 3) uint8.
    gallery_images: N rows of ``top`` images each.
    matches: (N, top) booleans, or None when identities are unknown (grey frames).
    path: the PNG to write.
    query_labels: optional caption under each query.
  """
  n, top = len(gallery_images), len(gallery_images[0])
  fig, axes = plt.subplots(n, top + 1, figsize=(0.9 * (top + 1), 1.9 * n), dpi=80,
                           squeeze=False)
  for i in range(n):
    show_image(axes[i, 0], query_images[i], "#333333")
    axes[i, 0].set_title(query_labels[i] if query_labels else "query", fontsize=6)
    for j in range(top):
      color = "#888888" if matches is None else "#1a9641" if matches[i, j] else "#d7191c"
      show_image(axes[i, j + 1], gallery_images[i][j], color)
      if i == 0:
        axes[i, j + 1].set_title(str(j + 1), fontsize=7)
  fig.tight_layout(pad=0.3)
  fig.savefig(path)
  plt.close(fig)


def show_image(ax, image, color: str, **imshow_kwargs) -> None:
  """An image (or any array ``imshow`` takes) without ticks, framed in ``color``."""
  ax.imshow(image, **imshow_kwargs)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(color)
    spine.set_linewidth(3)


def decode(image_bytes: bytes) -> np.ndarray:
  """An encoded record image as RGB uint8."""
  return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
