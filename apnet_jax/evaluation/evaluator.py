"""The re-ID evaluator: every evaluation of a model, whichever mode asks for it.

A run evaluates on a list of datasets, set in one place: ``eval.datasets``
(comma-separated ``name[:config]`` entries), or the training dataset(s) when
it is empty. `open_eval_datasets` opens that list; a `ReidEvaluator` then
scores a model on each entry the same way: query and gallery features (image
+ horizontal flip, summed), CMC, mAP and mINP, the same again after
k-reciprocal re-ranking or alpha query expansion when ``config.eval`` asks,
and the report's pictures. Training (at its evaluation epochs and at the end),
``--mode eval`` and the notebook call `ReidEvaluator.run`; ``--mode extract``
and ``--mode visualize`` use its feature extractor and its datasets.

Results (``results.json``): ``"datasets": {entry: {R1, R5, R10, mAP, mINP, cmc,
num_valid_queries, protocol, [rerank], [query_expansion]}}``, and the first
entry's metrics once more at the top level, for tools that read one dataset.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from apnet_jax import workdir as workdir_lib
from apnet_jax.data import entries, opening, prepare, sources
from apnet_jax.evaluation import plots
from apnet_jax.evaluation.features import extract_features
from apnet_jax.evaluation.metrics import evaluate

# The metrics logged at each evaluation (TensorBoard, metrics.jsonl) and tabled.
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
# Extra rows of an entry: results key -> row title.
VARIANTS = {"rerank": "re-ranked", "query_expansion": "query exp."}
# The pictures of each entry of a report.
PICTURES = ("cmc", "ranked_list")


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One entry of the evaluation list: a prepared dataset's query and gallery splits."""

  entry: str  # as results.json names it: 'name' or 'name:config'
  builder: tfds.core.DatasetBuilder


def eval_entries(config: ml_collections.ConfigDict) -> tuple[entries.DatasetEntry, ...]:
  """The datasets the run evaluates on, in order: ``eval.datasets``, else the training data."""
  if config.eval.datasets:
    return entries.parse_entries(
      config.eval.datasets, separator=",", known=sources.BUILDERS, key="eval.datasets"
    )
  return entries.data_entries(config.data, known=sources.BUILDERS)


def open_eval_datasets(config: ml_collections.ConfigDict) -> list[EvalDataset]:
  """Opens (or prepares, when that needs no download) every dataset of `eval_entries`.

  Raises:
    FileNotFoundError: an entry is not prepared and needs a download; the
      message names it and the command that prepares it. Training calls this
      before its first step.
    ValueError: two entries name the same prepared dataset (``msmt17`` and
      ``msmt17:train``), or an entry has no query that can be scored; the
      message names them.
  """
  datasets, seen = [], {}
  for entry in eval_entries(config):
    dataset = open_eval_dataset(config, entry)
    _check_scorable(dataset, "eval.datasets" if config.eval.datasets else "data.name")
    path = str(dataset.builder.data_path)
    if path in seen:
      raise ValueError(
        f"eval.datasets: {seen[path]!r} and {dataset.entry!r} are the same prepared dataset "
        f"({path}); list it once."
      )
    seen[path] = dataset.entry
    datasets.append(dataset)
  return datasets


def open_eval_dataset(
  config: ml_collections.ConfigDict, entry: entries.DatasetEntry
) -> EvalDataset:
  """Opens one entry of `eval_entries` (the training dataset as training opens it)."""
  if is_trained_on(config, [entry]) and len(trained_entries(config)) == 1:
    builder = opening.open_dataset(config.data)  # prepared from data.manual_dir if need be
  else:
    key = "eval.datasets" if config.eval.datasets else "data.name"
    builder = opening.open_dataset(config.data, entry, key=key)
  return EvalDataset(str(entry), builder)


def _check_scorable(dataset: EvalDataset, key: str) -> None:
  """Refuses a dataset none of whose queries has a true match under another camera.

  The protocol scores a query only against gallery images of its identity
  from other cameras: without any, the evaluation would fail only when it
  runs, perhaps hours into training. Reads the annotations, not the images.
  """
  query = sources.split_annotations(dataset.builder, "query")
  gallery = sources.split_annotations(dataset.builder, "gallery")
  cameras: dict[int, set[int]] = {}
  for pid, camid in zip(gallery.pid.tolist(), gallery.camid.tolist()):
    cameras.setdefault(pid, set()).add(camid)
  if not any(
    cameras.get(pid, set()) - {camid}
    for pid, camid in zip(query.pid.tolist(), query.camid.tolist())
  ):
    raise ValueError(
      f"{key}: {dataset.entry} ({dataset.builder.data_path}) has no query whose identity is in "
      "the gallery under another camera, so the protocol can score none of them; give the "
      "gallery images of the query identities from other cameras."
    )


def trained_entries(config: ml_collections.ConfigDict) -> tuple[entries.DatasetEntry, ...]:
  """The datasets ``data.name`` trains on."""
  return entries.data_entries(config.data, known=sources.BUILDERS)


def is_trained_on(config: ml_collections.ConfigDict, evaluated: Sequence[Any]) -> bool:
  """Whether every one of ``evaluated`` (entries, or their text) is a training dataset.

  However spelled: ``msmt17:train`` is the ``msmt17`` a run trains on.
  """
  trained = {sources.resolved(e) for e in trained_entries(config)}
  return all(
    sources.resolved(e if isinstance(e, entries.DatasetEntry) else _parse(e)) in trained
    for e in evaluated
  )


def _parse(entry: str) -> entries.DatasetEntry:
  return entries.parse_entries(entry, separator=",", known=sources.BUILDERS)[0]


@dataclasses.dataclass
class Report:
  """What `ReidEvaluator.run` returns: results per entry, and the features behind them."""

  results: dict[str, Any]
  features: dict[str, dict[str, dict[str, np.ndarray]]]

  selected_by: tuple[str, ...] = ()

  @property
  def main(self) -> dict[str, Any]:
    """The first entry's results (the training dataset's by default)."""
    return next(iter(self.results["datasets"].values()))

  @property
  def selection_map(self) -> float:
    """The mAP that picks the best checkpoint: the mean over `selected_by`.

    Those are the evaluated entries that are training datasets, so that no
    checkpoint is chosen on another domain's test set; all entries when none is.
    """
    per_entry = self.results["datasets"]
    chosen = [e for e in self.selected_by if e in per_entry] or list(per_entry)
    return float(np.mean([per_entry[e]["mAP"] for e in chosen]))

  def scalars(self) -> dict[str, float]:
    """`METRICS` of each entry: ``R1``, ... for one entry, ``<entry>/R1``, ... for several.

    An entry's ':' is written '-' (TensorBoard tags allow no colon).
    """
    per_entry = self.results["datasets"]
    if len(per_entry) == 1:
      return {k: self.main[k] for k in METRICS if k in self.main}
    return {
      f"{_slug(entry)}/{k}": r[k] for entry, r in per_entry.items() for k in METRICS if k in r
    }


def _slug(entry: str) -> str:
  return entry.replace(":", "-")


class ReidEvaluator:
  """Scores models on the query/gallery splits of a list of datasets.

  Settings come from the config: ``model.eval_feature`` and
  ``model.input_size`` (the features), ``eval.batch_size``,
  ``data.num_workers``, ``eval.drop_distractors``, ``eval.max_rank``,
  ``eval.rerank*`` and ``eval.query_expansion*``.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    datasets: Sequence[EvalDataset],
    *,
    mesh: jax.sharding.Mesh | None = None,
  ):
    self.config = copy.deepcopy(config)  # the settings of now, not of a later edit
    self.datasets = list(datasets)
    self.selected_by = tuple(d.entry for d in self.datasets if is_trained_on(config, [d.entry]))
    self.mesh = mesh

  def features(self, model, source: Any, *, desc: str) -> dict[str, np.ndarray]:
    """Evaluation features, pids and camids of every record of ``source``, in order."""
    return extract_features(
      model,
      source,
      eval_feature=self.config.model.eval_feature,
      input_size=tuple(self.config.model.input_size),
      batch_size=self.config.eval.batch_size,
      mesh=self.mesh,
      num_workers=self.config.data.num_workers,
      desc=desc,
    )

  def run(self, model) -> Report:
    """Extracts and scores every dataset of the list."""
    results, features = {}, {}
    for dataset in self.datasets:
      features[dataset.entry] = self._query_gallery(model, dataset)
      results[dataset.entry] = self.score(features[dataset.entry], dataset)
    return Report(
      dict(results[self.datasets[0].entry], datasets=results), features, self.selected_by
    )

  def _query_gallery(self, model, dataset: EvalDataset) -> dict[str, dict[str, np.ndarray]]:
    several = len(self.datasets) > 1
    features = {}
    for split in ("query", "gallery"):
      features[split] = self.features(
        model,
        sources.load_split(dataset.builder, split),
        desc=f"{dataset.entry} {split}" if several else split,
      )
      features[split]["index"] = np.arange(len(features[split]["pid"]))
    if self.config.eval.drop_distractors:
      keep = features["gallery"]["pid"] != 0
      features["gallery"] = {k: v[keep] for k, v in features["gallery"].items()}
    return features

  def score(
    self, features: dict[str, dict[str, np.ndarray]], dataset: EvalDataset
  ) -> dict[str, Any]:
    """CMC, mAP and mINP (in percent) of one entry's features, with the protocol used.

    Returns ``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``, ``cmc``,
    ``num_valid_queries``, ``protocol``, and the same under ``rerank`` and
    ``query_expansion`` when ``eval.rerank`` and ``eval.query_expansion`` are set.
    """
    ev = self.config.eval
    query, gallery = features["query"], features["gallery"]
    args = (
      query["features"],
      gallery["features"],
      query["pid"],
      gallery["pid"],
      query["camid"],
      gallery["camid"],
    )
    results = _summary(evaluate(*args, max_rank=ev.max_rank))
    if ev.rerank:
      rerank = dict(k1=ev.rerank_k1, k2=ev.rerank_k2, lambda_value=ev.rerank_lambda)
      results["rerank"] = _summary(evaluate(*args, max_rank=ev.max_rank, rerank=rerank))
    if ev.query_expansion:
      expansion = dict(k=ev.query_expansion_k, alpha=ev.query_expansion_alpha)
      results["query_expansion"] = _summary(
        evaluate(*args, max_rank=ev.max_rank, query_expansion=expansion)
      )
    results["protocol"] = {
      "dataset": prepare.dataset_key(dataset.builder),
      "distractors": "dropped" if ev.drop_distractors else "kept (standard)",
      "eval_feature": self.config.model.eval_feature,
      "flip": "image + horizontal flip, summed, L2-normalized",
      "num_query": int(len(query["pid"])),
      "num_gallery": int(len(gallery["pid"])),
    }
    return results

  def pictures(self, report: Report, *, num_queries: int = 8) -> dict[str, np.ndarray]:
    """The report's pictures, uint8 (H, W, 3), of each entry: ``cmc`` and ``ranked_list``.

    Named ``cmc`` and ``ranked_list`` for one entry, ``cmc_<entry>`` and
    ``ranked_list_<entry>`` for several (a ':' in the entry becomes '-').
    """
    several = len(self.datasets) > 1
    out = {}
    for dataset in self.datasets:
      suffix = "_" + _slug(dataset.entry) if several else ""
      pictures = _pictures(
        report.results["datasets"][dataset.entry],
        report.features[dataset.entry],
        dataset.builder,
        num_queries=num_queries,
      )
      out.update({name + suffix: picture for name, picture in pictures.items()})
    return out


def _pictures(
  results: dict[str, Any], features: dict[str, dict[str, Any]], builder, *, num_queries: int
) -> dict[str, np.ndarray]:
  """The CMC curve (and its variants), and queries spread over the split beside their top 10."""
  curves = {"APNet": results["cmc"]}
  for key, title in VARIANTS.items():
    if key in results:
      curves[title] = results[key]["cmc"]
  query, gallery = features["query"], features["gallery"]
  picked = np.linspace(0, len(query["pid"]) - 1, min(num_queries, len(query["pid"]))).astype(int)
  order, matches = plots.ranked_lists(
    query["features"][picked],
    gallery["features"],
    query["pid"][picked],
    gallery["pid"],
    query["camid"][picked],
    gallery["camid"],
    top=min(10, len(gallery["pid"])),
  )
  query_source = sources.load_split(builder, "query")
  gallery_source = sources.load_split(builder, "gallery")
  return {
    "cmc": plots.plot_cmc(curves, title=results["protocol"]["dataset"]),
    "ranked_list": plots.plot_ranked_lists(
      [plots.decode(query_source[int(query["index"][i])]["image"]) for i in picked],
      [
        [plots.decode(gallery_source[int(gallery["index"][j])]["image"]) for j in row]
        for row in order
      ],
      matches,
      query_labels=[f"pid {query['pid'][i]}" for i in picked],
    ),
  }


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
  cmc = np.asarray(metrics["cmc"])
  out = {f"R{k}": 100 * float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)}
  out.update(
    mAP=100 * float(metrics["mAP"]),
    mINP=100 * float(metrics["mINP"]),
    num_valid_queries=int(metrics["num_valid_queries"]),
    cmc=cmc.tolist(),
  )
  return out


def format_results(results: dict[str, Any]) -> str:
  """A table: one row per dataset, and one per re-ranking or query expansion under it."""
  per_entry = results.get("datasets") or {results["protocol"]["dataset"]: results}
  rows = []
  for entry, r in per_entry.items():
    rows.append((entry, r))
    rows += [(f"  {title}", r[key]) for key, title in VARIANTS.items() if key in r]
  width = max(len("dataset"), *(len(title) for title, _ in rows)) + 2
  lines = [f"{'dataset':<{width}}" + "".join(f"{n:>8}" for n in METRICS)]
  for title, r in rows:
    lines.append(f"{title:<{width}}" + "".join(f"{r[n]:>8.2f}" for n in METRICS if n in r))
  return "\n".join(lines)


def write_report(workdir: str, results: dict[str, Any], pictures: dict[str, np.ndarray]) -> None:
  """Prints the table; writes results.json and ``<name>.png`` of each picture (process 0).

  Each file is written beside its place and renamed into it when complete.
  The pictures of the report this one replaces that it does not write again
  (``cmc_<entry>.png`` of a dataset no longer evaluated, say) are removed, so
  that every picture in ``workdir`` belongs to its results.json.
  """
  if jax.process_index() != 0:
    return
  print(format_results(results))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.json")
  previous = _report_pictures(path)
  with workdir_lib.replace_file(path) as staging:
    with open(staging, "w") as f:
      json.dump(results, f, indent=2, default=str)
  for name, picture in pictures.items():
    with workdir_lib.replace_file(os.path.join(workdir, f"{name}.png")) as staging:
      PIL.Image.fromarray(picture).save(staging)
  for name in previous - set(pictures):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, f"{name}.png"))


def _report_pictures(results_path: str) -> set[str]:
  """The names of the pictures `ReidEvaluator.pictures` gave for the report at ``results_path``.

  They follow from its datasets; a report older than ``"datasets"`` had one.
  Nothing when there is no readable report.
  """
  try:
    with open(results_path) as f:
      per_entry = json.load(f).get("datasets") or {"": None}
  except (OSError, ValueError, AttributeError):
    return set()
  several = len(per_entry) > 1
  return {
    name + ("_" + _slug(entry) if several else "") for name in PICTURES for entry in per_entry
  }
