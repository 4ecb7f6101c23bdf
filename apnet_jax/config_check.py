"""The allowed values of every config key, checked before a mode touches anything.

``RULES`` maps each dotted key of ``configs/common.py`` to a rule: a function
``rule(value, context) -> None | str`` that returns what is allowed when the
value is not. `check` applies the rules of the keys a mode uses and raises one
`ConfigError` that lists every bad key, its value and what is allowed, so that
a wrong recipe is refused before a dataset is prepared, a workdir is written or
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import ml_collections

from apnet_jax.data import entries, sources


class ConfigError(ValueError):
  """Settings outside their allowed range; the message lists every one of them."""

  def __init__(self, problems: Sequence[tuple[str, Any, str]]):
    self.problems = list(problems)
    lines = [f"  {key}={value!r}: {allowed}" for key, value, allowed in self.problems]
    super().__init__(
      f"{len(lines)} invalid config setting(s); nothing was run or written:\n" + "\n".join(lines)
    )


@dataclasses.dataclass(frozen=True)
class Context:
  """What a rule may look at besides its value: the whole config and the run's devices."""

  config: ml_collections.ConfigDict
  num_devices: int | None = None
  datasets: Collection[str] | None = None

  def get(self, dotted: str) -> Any:
    """The value of another key, or None when the config lacks it."""
    node = self.config
    for part in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return None
      node = node[part]
    return node


Rule = Callable[[Any, Context], "str | None"]

# Keys whose unset value (None) stands for another key's value.
FOLLOWS: dict[str, str] = {"optim.weight_decay_bias": "optim.weight_decay"}


def effective_value(config: Any, dotted: str) -> Any:
  """The value of ``dotted`` in ``config``, or of the key it `FOLLOWS` when unset.

  ``config`` is a ConfigDict or its ``to_dict()`` (a workdir's config.json).
  A key the config lacks is None.
  """
  value = _lookup(config, dotted)
  if value is None and dotted in FOLLOWS:
    return _lookup(config, FOLLOWS[dotted])
  return value


def _lookup(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      return None
  return node


# --- Rule builders -------------------------------------------------------------


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int) -> Rule:
  """A whole number >= ``minimum``."""

  def rule(value, context):
    del context
    if not _is_int(value) or value < minimum:
      return f"a whole number >= {minimum}"
    return None

  return rule


def number(
  low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> Rule:
  """A finite number in the interval; ``*_open`` excludes that end."""
  if high == math.inf:
    allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
  else:
    allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

  def rule(value, context):
    del context
    if (
      not _is_number(value)
      or value < low
      or value > high
      or (low_open and value == low)
      or (high_open and value == high)
    ):
      return allowed
    return None

  return rule


PROBABILITY = number(0.0, 1.0)


def unset_or(rule: Rule, follows: str) -> Rule:
  """None (the value of ``follows`` then applies) or a value that passes ``rule``."""

  def unset_or_rule(value, context):
    allowed = None if value is None else rule(value, context)
    return None if allowed is None else f"{allowed}, or None (unset: {follows} applies)"

  return unset_or_rule


def one_of(*options: Any) -> Rule:
  """One of ``options`` (compared with their type: True is not 1)."""

  def rule(value, context):
    del context
    if not any(type(value) is type(o) and value == o for o in options):
      return f"one of {', '.join(repr(o) for o in options)}"
    return None

  return rule


def boolean(value, context):
  del context
  return None if isinstance(value, bool) else "True or False"


def text(value, context):
  del context
  return None if isinstance(value, str) else "a string"


def nonempty_text(value, context):
  del context
  return None if isinstance(value, str) and value else "a non-empty string"


def pair(element: Rule, what: str) -> Rule:
  """A pair (tuple or list of two) of values that each pass ``element``."""

  def rule(value, context):
    if (
      not isinstance(value, (tuple, list))
      or len(value) != 2
      or any(element(v, context) for v in value)
    ):
      return f"a pair of {what}"
    return None

  return rule


def epochs_of_the_schedule(*, increasing: bool) -> Rule:
  """Epochs in [1, train.epochs] (a tuple, possibly empty); ``increasing``: strictly."""

  def rule(value, context):
    last = context.get("train.epochs")
    bound = f"{last}" if _is_int(last) and last >= 1 else "train.epochs"
    allowed = (
      f"a tuple of {'increasing ' if increasing else ''}epochs in [1, {bound}] (train.epochs)"
    )
    if not isinstance(value, (tuple, list)) or not all(_is_int(e) and e >= 1 for e in value):
      return allowed
    if increasing and any(a >= b for a, b in zip(value, value[1:])):
      return allowed
    if _is_int(last) and any(e > last for e in value):
      return allowed
    return None

  return rule


def max_steps(value, context):
  del context
  # 0 would train nothing and still report a result: refused, not read as "no limit".
  if not _is_int(value) or not (value == -1 or value >= 1):
    return "-1 (no limit) or a whole number >= 1"
  return None


def identities_per_batch(value, context):
  del context
  # One identity per batch leaves the triplet loss no negatives, one image per
  # identity no positives: it would be 0 and the recipe silently changed.
  if not _is_int(value) or value < 2:
    return "a whole number >= 2 (the triplet loss needs 2 identities of 2 images per batch)"
  return None


def images_per_identity(value, context):
  allowed = identities_per_batch(value, context)
  p, devices = context.get("data.p"), context.num_devices
  if allowed is None and devices and _is_int(p) and (p * value) % devices:
    return (
      f"a value that makes data.p x data.k = {p * value} images a multiple of the {devices} devices"
    )
  return allowed


def eval_batch_size(value, context):
  if not _is_int(value) or value < 1:
    return "a whole number >= 1"
  if context.num_devices and value % context.num_devices:
    return f"a multiple of the {context.num_devices} devices"
  return None


def dataset_name(value, context):
  # One builder name, or the datasets of joint training as name[:config] entries joined by '+'.
  try:
    entries.parse_entries(value, separator="+", known=context.datasets)
  except (TypeError, ValueError) as e:
    return f"a dataset name or name[:config] entries joined by '+': {e}"
  return None


def dataset_config(value, context):
  # Any name: a joined data.name carries each dataset's config and leaves this one unused.
  del context
  return None if isinstance(value, str) else "a string"


# Datasets whose gallery marks distractors with pid 0: Market-1501, and the
# synthetic benchmark and reid_folder that follow its conventions. Elsewhere
# (MSMT17) pid 0 is a real person, and dropping it would quietly change the
# benchmark.
DATASETS_WITH_DISTRACTORS = ("market1501", "synthetic_reid", "reid_folder")


def eval_datasets(value, context):
  if not isinstance(value, str):
    return "comma-separated name[:config] entries, or '' for the training dataset(s)"
  if value:
    try:
      entries.parse_entries(value, separator=",", known=context.datasets)
    except ValueError as e:
      return f"comma-separated name[:config] entries: {e}"
  return None


def use_best(value, context):
  # Two ways to pick the checkpoint: the other one would be silently ignored.
  if not isinstance(value, bool):
    return "True or False"
  step = context.get("eval.step")
  if value and _is_int(step) and step >= 0:
    return f"False while eval.step={step} picks the checkpoint (set one or the other)"
  return None


def drop_distractors(value, context):
  if not isinstance(value, bool):
    return "True or False"
  if not value:
    return None
  # The datasets evaluated: eval.datasets, else the training ones.
  listed = context.get("eval.datasets") or context.get("data.name")
  separator = "," if context.get("eval.datasets") else "+"
  try:
    names = [e.name for e in entries.parse_entries(listed, separator=separator)]
  except (TypeError, ValueError):
    return None  # that key's own rule names the problem
  others = sorted({n for n in names if n not in DATASETS_WITH_DISTRACTORS})
  if others:
    return (
      f"False while evaluating {', '.join(others)}: only "
      f"{', '.join(DATASETS_WITH_DISTRACTORS)} mark distractors with pid 0; elsewhere "
      "pid 0 is a real person"
    )
  return None


def manual_dir(value, context):
  if not isinstance(value, str):
    return "a string"
  name = context.get("data.name")
  if value and isinstance(name, str) and "+" in name:
    return (
      f"'' while data.name={name!r} joins several datasets (one folder cannot hold "
      "them all): prepare each with --mode prepare first"
    )
  return None


def dotted_keys(value, context):
  del context
  allowed = "'' or a comma-separated list of config keys (such as optim.base_lr)"
  if not isinstance(value, str):
    return allowed
  unknown = [k for k in (k.strip() for k in value.split(",")) if k and k not in RULES]
  return f"{allowed}; not config keys: {', '.join(unknown)}" if unknown else None


# --- The table -----------------------------------------------------------------

RULES: dict[str, Rule] = {
  "model.depth": one_of(18, 34, 50, 101),
  "model.width": number(0.0, low_open=True),
  "model.last_stride": one_of(1, 2),
  "model.stem_relu": boolean,
  "model.level": one_of(0, 1, 2, 3),
  "model.kind": one_of("channel", "spatial"),
  "model.input_size": pair(integer(1), "whole numbers >= 1 (height, width)"),
  "model.eval_feature": one_of("bn", "global", "logits"),
  "model.dtype": one_of("float32", "bfloat16"),
  "model.init_from": text,
  "data.name": dataset_name,
  "data.config": dataset_config,
  "data.data_dir": nonempty_text,
  "data.manual_dir": manual_dir,
  "data.p": identities_per_batch,
  "data.k": images_per_identity,
  "data.num_workers": integer(0),
  "augment.pad": integer(0),
  "augment.flip_p": PROBABILITY,
  "augment.erase_p": PROBABILITY,
  "loss.margin": number(0.0, low_open=True),
  # 1 would make every target uniform: no identity is learned.
  "loss.label_smoothing": number(0.0, 1.0, high_open=True),
  "optim.base_lr": number(0.0, low_open=True),
  "optim.weight_decay": number(0.0),
  "optim.bias_lr_factor": number(0.0),
  "optim.weight_decay_bias": unset_or(number(0.0), FOLLOWS["optim.weight_decay_bias"]),
  "optim.betas": pair(number(0.0, 1.0, high_open=True), "numbers in [0, 1)"),
  "optim.warmup_factor": number(0.0, 1.0),
  "optim.warmup_epochs": integer(0),
  "optim.milestones": epochs_of_the_schedule(increasing=True),
  "optim.gamma": number(0.0, 1.0, low_open=True),
  "train.epochs": integer(1),
  "train.max_steps": max_steps,
  "train.seed": integer(0),
  "train.log_every_steps": integer(1),
  "train.checkpoint_every_epochs": integer(1),
  "train.keep_best": integer(0),
  "train.eval_epochs": epochs_of_the_schedule(increasing=False),
  "train.allow_changes": dotted_keys,
  "eval.datasets": eval_datasets,
  "eval.batch_size": eval_batch_size,
  "eval.step": integer(-1),
  "eval.use_best": use_best,
  "eval.torch_checkpoint": text,
  "eval.drop_distractors": drop_distractors,
  "eval.rerank": boolean,
  "eval.rerank_k1": integer(1),
  "eval.rerank_k2": integer(1),
  "eval.rerank_lambda": PROBABILITY,
  "eval.query_expansion": boolean,
  "eval.query_expansion_k": integer(1),
  "eval.query_expansion_alpha": number(0.0),
  "eval.max_rank": integer(1),
  "extract.input_dir": text,
  "extract.gallery_dir": text,
  "extract.top": integer(1),
  "extract.num_pictures": integer(1),
  "visualize.num_queries": integer(1),
}

# The keys each mode reads: a section name covers all of its keys.
_DATASET = ("data.name", "data.config", "data.data_dir", "data.manual_dir", "data.num_workers")
_RESTORE = ("model", "train.keep_best", "eval")
MODE_KEYS: dict[str, tuple[str, ...]] = {
  "train": tuple(sorted({k.split(".")[0] for k in RULES})),
  "eval": _RESTORE + _DATASET,
  "extract": _RESTORE + ("extract",),
  "export": _RESTORE,
  "visualize": _RESTORE + _DATASET + ("visualize",),
  "prepare": _DATASET,
  "summary": ("model",) + _DATASET,
}

# Keys a mode cannot do without, and what to give.
_REQUIRED = {
  "extract": {"extract.input_dir": "--mode extract needs --config.extract.input_dir=FOLDER"}
}


def keys_of(mode: str) -> list[str]:
  """The dotted keys ``mode`` checks, in table order."""
  if mode not in MODE_KEYS:
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODE_KEYS)}")
  wanted = MODE_KEYS[mode]
  return [k for k in RULES if k in wanted or k.split(".")[0] in wanted]


def check(
  config: ml_collections.ConfigDict,
  mode: str,
  *,
  num_devices: int | None = None,
  datasets: Collection[str] | None = None,
) -> None:
  """Refuses every key ``mode`` uses that is missing, unknown or out of range.

  Args:
    config: the whole config.
    mode: a key of `MODE_KEYS` ('train', 'eval', ...).
    num_devices: when given, batch sizes must split evenly over this many devices.
    datasets: when given, the builder names the entries of ``data.name`` may take.

  Raises:
    ConfigError: naming every bad key with its value and what is allowed.
  """
  context = Context(config, num_devices=num_devices, datasets=datasets)
  keys = keys_of(mode)
  problems = []
  sections = {k.split(".")[0] for k in keys}
  for section in sorted(sections):  # a key the table does not know is a typo in a config file
    node = config.get(section)
    if isinstance(node, ml_collections.ConfigDict):
      problems += [
        (f"{section}.{k}", node[k], "not a config key of apnet-jax")
        for k in node.keys()
        if f"{section}.{k}" not in RULES
      ]
  for key in keys:
    if not _has(config, key):
      problems.append((key, None, "missing from the config"))
      continue
    value = context.get(key)
    allowed = RULES[key](value, context)
    if allowed is None and value == "" and key in _REQUIRED.get(mode, {}):
      allowed = _REQUIRED[mode][key]
    if allowed is not None:
      problems.append((key, value, allowed))
  if problems:
    raise ConfigError(problems)


def _has(config: ml_collections.ConfigDict, dotted: str) -> bool:
  section, key = dotted.split(".")
  return isinstance(config.get(section), ml_collections.ConfigDict) and key in config[section]


def check_mode(config: ml_collections.ConfigDict, mode: str) -> None:
  """`check` with this run's devices and the known datasets: what every mode calls first.

  Raises:
    ConfigError: naming each bad key, its value and what is allowed.
  """
  check(config, mode, num_devices=jax.device_count(), datasets=tuple(sources.BUILDERS))
