"""``--mode eval``: scores a checkpoint of a workdir (or an official PyTorch one) and reports it.

The model comes from `apnet_jax.restore.restore_model`; the datasets and the
scores from the one re-ID evaluator (`apnet_jax.evaluation.evaluator`), as in
training's own evaluations.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from apnet_jax import config_check, restore, sharding
from apnet_jax import workdir as workdir_lib
from apnet_jax.evaluation import evaluator as evaluator_lib

EVAL_FOLDER = "eval"  # --mode eval's report while a training holds the workdir


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode eval``: evaluates a checkpoint (see `restore.restore_model`); writes the report.

  Evaluates on every dataset of the evaluator's list (``eval.datasets``, or
  the training dataset(s)). The report (``results.json`` and the pictures, see
  `evaluator.ReidEvaluator.pictures`) goes into ``workdir`` itself, replacing
  training's, when it scores exactly the training dataset(s) and no training
  holds the workdir (eval holds the lock while writing). Otherwise (another
  list of datasets, whose report must not pass for the run's own; or a
  training holds the workdir) it goes into ``workdir/eval/``, a folder
  replaced whole at each evaluation.
  """
  config_check.check_mode(config, "eval")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  evaluator = evaluator_lib.ReidEvaluator(
    config, evaluator_lib.open_eval_datasets(config), mesh=sharding.make_mesh()
  )
  model, source = restore.restore_model(config, workdir)
  report = evaluator.run(model)
  results = dict(report.results, **source, config=config.to_dict())
  if jax.process_index() != 0:
    return results
  pictures = evaluator.pictures(report)
  workdir = workdir_lib.ensure_workdir(workdir)  # new when evaluating eval.torch_checkpoint
  aside = os.path.join(workdir, EVAL_FOLDER)
  evaluated = [d.entry for d in evaluator.datasets]
  # The training datasets exactly (however spelled): entries are distinct datasets.
  trained = evaluator_lib.trained_entries(config)
  if not (evaluator_lib.is_trained_on(config, evaluated) and len(evaluated) == len(trained)):
    with workdir_lib.replace_folder(aside) as folder:
      evaluator_lib.write_report(folder, results, pictures)
    print(f"the report on {', '.join(evaluated)} went to {aside}/, beside the run's own.")
    return results
  try:
    held = workdir_lib.WorkdirLock.acquire(workdir, "evaluation")
  except workdir_lib.WorkdirBusyError as e:
    with workdir_lib.replace_folder(aside) as folder:
      evaluator_lib.write_report(folder, results, pictures)
    print(
      f"{workdir} is in use ({e.holder}): the report went to {aside}/, "
      "not beside the training's files."
    )
  else:
    with held:
      evaluator_lib.write_report(workdir, results, pictures)
  return results
