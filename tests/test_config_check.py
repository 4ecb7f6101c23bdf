"""Every config key has an allowed range, checked before a mode prepares, writes or compiles."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from apnet_jax import config_check, evaluate, inference, train, visualize, workdir
from configs import common
from configs.synthetic import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A value outside the allowed range of each key that has one, with any other
# settings it needs (drop_distractors is wrong only for a dataset without them).
OUT_OF_RANGE = {
  "model.depth": 19,
  "model.width": 0.0,
  "model.last_stride": 3,
  "model.level": 4,
  "model.kind": "both",
  "model.input_size": (64,),
  "model.eval_feature": "logit",
  "model.dtype": "float16",
  "data.name": "market",
  "data.data_dir": "",
  "data.p": 1,
  "data.k": 1,
  "data.num_workers": -1,
  "augment.pad": -1,
  "augment.flip_p": 1.5,
  "augment.erase_p": -0.1,
  "loss.margin": -1.0,
  "loss.label_smoothing": 2.0,
  "optim.base_lr": math.nan,
  "optim.weight_decay": -1e-3,
  "optim.bias_lr_factor": -1.0,
  "optim.weight_decay_bias": math.inf,
  "optim.betas": (0.9, 1.0),
  "optim.warmup_factor": 2.0,
  "optim.warmup_epochs": -1,
  "optim.milestones": (2, 1),
  "optim.gamma": 0.0,
  "train.epochs": 0,
  "train.max_steps": 0,
  "train.seed": -1,
  "train.log_every_steps": 0,
  "train.checkpoint_every_epochs": 0,
  "train.keep_best": -1,
  "train.eval_epochs": (3,),
  "train.allow_changes": "optim.lr",
  "eval.batch_size": 0,
  "eval.step": -2,
  "eval.drop_distractors": True,
  "eval.rerank_k1": 0,
  "eval.rerank_k2": 0,
  "eval.rerank_lambda": 1.5,
  "eval.max_rank": 0,
  "eval.datasets": "market1501,nosuchset",
  "eval.query_expansion_k": 0,
  "eval.query_expansion_alpha": -1.0,
  "data.manual_dir": "/downloads/market",
  "extract.top": 0,
  "extract.num_pictures": 0,
  "visualize.num_queries": 0,
}
NEEDS = {
  "eval.drop_distractors": {"data.name": "msmt17"},
  "data.manual_dir": {"data.name": "market1501+msmt17", "data.config": ""},
}
# Keys where every value of their type is allowed (paths are checked when opened).
ANY_VALUE = {
  "model.stem_relu",
  "model.init_from",
  "data.config",
  "eval.use_best",
  "eval.torch_checkpoint",
  "eval.rerank",
  "eval.query_expansion",
  "extract.input_dir",
  "extract.gallery_dir",
}


def flat_keys(config):
  return {f"{section}.{key}" for section in config for key in config[section]}


def tiny(tmp_path, **settings):
  config = get_config("tiny")
  config.data.data_dir = str(tmp_path / "tfds")
  for dotted, value in settings.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


def test_the_table_has_a_rule_for_exactly_the_keys_of_the_defaults():
  assert set(config_check.RULES) == flat_keys(common.get_config())
  assert set(OUT_OF_RANGE) | ANY_VALUE == set(config_check.RULES)


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_an_out_of_range_value_is_refused_by_name_before_anything_is_written(key, tmp_path):
  config = tiny(tmp_path, **{key: OUT_OF_RANGE[key]}, **NEEDS.get(key, {}))
  with pytest.raises(config_check.ConfigError, match=rf"\n  {key}=") as refusal:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert key in [name for name, _, _ in refusal.value.problems]
  assert sorted(os.listdir(tmp_path)) == []  # no workdir, no prepared dataset


@pytest.mark.parametrize("key", sorted(ANY_VALUE))
def test_keys_without_a_range_take_any_value_of_their_type(key, tmp_path):
  config = tiny(tmp_path)
  value = config.get(key.split(".")[0])[key.split(".")[1]]
  config_check.check(config, "train")
  assert config_check.RULES[key](value, config_check.Context(config)) is None
  assert (
    config_check.RULES[key](
      not value if isinstance(value, bool) else "x", config_check.Context(config)
    )
    is None
  )


def test_all_bad_keys_are_reported_together_with_value_and_what_is_allowed(tmp_path):
  config = tiny(
    tmp_path, **{"augment.erase_p": 1.5, "loss.margin": -1.0, "train.max_steps": 0, "data.k": 1}
  )
  with pytest.raises(config_check.ConfigError) as refusal:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(refusal.value)
  assert "augment.erase_p=1.5: a number in [0, 1]" in message
  assert "loss.margin=-1.0: a finite number > 0" in message
  assert "train.max_steps=0: -1 (no limit) or a whole number >= 1" in message
  assert "data.k=1: a whole number >= 2" in message
  assert not (tmp_path / "run").exists()


def test_a_key_the_table_does_not_know_is_refused(tmp_path):
  config = tiny(tmp_path)
  config.loss.margn = 0.5  # a config file may add keys; a typo must not pass silently
  with pytest.raises(config_check.ConfigError, match=r"loss\.margn=0\.5"):
    config_check.check(config, "train")


def test_the_batches_must_split_over_the_devices(tmp_path):
  config = tiny(tmp_path, **{"data.p": 3, "data.k": 2, "eval.batch_size": 12})
  with pytest.raises(config_check.ConfigError) as refusal:
    config_check.check_mode(config, "train")  # the suite runs on 8 devices
  assert [name for name, _, _ in refusal.value.problems] == ["data.k", "eval.batch_size"]


def test_schedule_keys_must_lie_inside_the_schedule(tmp_path):
  config = tiny(
    tmp_path, **{"train.epochs": 40, "optim.milestones": (10, 40), "train.eval_epochs": (40,)}
  )
  config_check.check(config, "train")  # the last epoch is inside
  config.train.eval_epochs = (40, 120)
  config.optim.milestones = (10, 41)
  with pytest.raises(config_check.ConfigError) as refusal:
    config_check.check(config, "train")
  assert [name for name, _, _ in refusal.value.problems] == [
    "optim.milestones",
    "train.eval_epochs",
  ]
  assert "epochs in [1, 40]" in str(refusal.value)


def test_one_way_to_pick_the_checkpoint_to_evaluate(tmp_path):
  config = tiny(tmp_path, **{"eval.use_best": True})
  config_check.check_mode(config, "eval")
  config.eval.step = 2  # use_best used to be ignored silently here
  with pytest.raises(config_check.ConfigError, match=r"eval\.use_best=True.*eval\.step=2"):
    config_check.check_mode(config, "eval")


def test_allow_changes_names_config_keys(tmp_path):
  config = tiny(tmp_path, **{"train.allow_changes": "optim.base_lr, train.epochs"})
  config_check.check(config, "train")
  config.train.allow_changes = "optim.base_lr,optim.lr"
  with pytest.raises(config_check.ConfigError, match=r"train\.allow_changes.*optim\.lr\b"):
    config_check.check(config, "train")


def parse_command_line(*overrides):
  """The config as run.py's --config flag (same definition) parses these arguments."""
  argv = ["run.py", "--config=configs/common.py", *overrides]
  flag_values = flags.FlagValues()
  # sys_argv: where the overrides are read from (run.py's: sys.argv).
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def test_the_bias_decay_is_unset_by_default_and_set_on_the_command_line(monkeypatch):
  monkeypatch.chdir(ROOT)
  assert parse_command_line().optim.weight_decay_bias is None
  for text in ("0.0005", "5e-4"):
    config = parse_command_line(f"--config.optim.weight_decay_bias={text}")
    assert config.optim.weight_decay_bias == 5e-4
    config_check.check(config, "train")
  config = parse_command_line("--config.optim.weight_decay_bias=-1")
  with pytest.raises(config_check.ConfigError, match=r"optim\.weight_decay_bias=-1\.0: .*None"):
    config_check.check(config, "train")


def test_an_unset_bias_decay_takes_the_weight_decay():
  config = common.get_config()
  config.optim.weight_decay = 5e-4
  assert config_check.effective_value(config, "optim.weight_decay_bias") == 5e-4
  assert config_check.effective_value(config.to_dict(), "optim.weight_decay_bias") == 5e-4
  config.optim.weight_decay_bias = 0.0
  assert config_check.effective_value(config, "optim.weight_decay_bias") == 0.0


def workdir_of_an_earlier_version(tmp_path, **optim):
  """A workdir whose config.json records the bias decay, as runs before it could be unset."""
  recorded = common.get_config().to_dict()
  recorded["optim"].update({"weight_decay_bias": 0.001}, **optim)
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(recorded))
  return str(tmp_path)


def test_resuming_an_earlier_workdir_with_the_same_effective_bias_decay(tmp_path):
  run = workdir_of_an_earlier_version(tmp_path)
  assert workdir.check_recipe(common.get_config(), run) == {}
  config = common.get_config()
  config.optim.weight_decay_bias = 1e-3
  assert workdir.check_recipe(config, run) == {}


def test_resuming_with_another_weight_decay_is_refused_unless_allowed(tmp_path):
  run = workdir_of_an_earlier_version(tmp_path)
  config = common.get_config()
  config.optim.weight_decay = 5e-4
  with pytest.raises(
    ValueError,
    match=r"optim\.weight_decay: workdir 0\.001, config 0\.0005"
    r".*allow_changes=optim\.weight_decay \(",
  ):
    workdir.check_recipe(config, run)
  config.train.allow_changes = "optim.weight_decay"
  # The unset bias decay followed weight_decay in the earlier run too: it changes with it.
  assert workdir.check_recipe(config, run) == {
    "optim.weight_decay": {"from": 0.001, "to": 5e-4},
    "optim.weight_decay_bias": {"from": 0.001, "to": 5e-4},
  }


def test_a_bias_decay_that_differed_from_weight_decay_is_not_changed_silently(tmp_path):
  run = workdir_of_an_earlier_version(tmp_path, weight_decay_bias=0.0)
  config = common.get_config()
  with pytest.raises(ValueError, match=r"optim\.weight_decay_bias: workdir 0\.0, config 0\.001"):
    workdir.check_recipe(config, run)
  config.optim.weight_decay_bias = 0.0
  assert workdir.check_recipe(config, run) == {}


def workdir_trained_on(tmp_path, name, builder_config=""):
  recorded = common.get_config().to_dict()
  recorded["data"].update(name=name, config=builder_config)
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(recorded))
  return str(tmp_path)


@pytest.mark.parametrize(
  "recorded, name, builder_config",
  [
    (("msmt17", ""), "msmt17:train", ""),  # MSMT17's default config written out
    (("msmt17", ""), "msmt17", "train"),
    (("msmt17:train", ""), "msmt17", ""),
    (("reid_folder", ""), "reid_folder:default", ""),
    (("market1501+msmt17", ""), " market1501 + msmt17:train ", "tiny"),  # unused when joined
  ],
)
def test_the_same_datasets_spelled_another_way_continue_the_run(
  tmp_path, recorded, name, builder_config
):
  run = workdir_trained_on(tmp_path, *recorded)
  config = common.get_config()
  config.data.name, config.data.config = name, builder_config
  assert workdir.check_recipe(config, run) == {}


@pytest.mark.parametrize(
  "recorded, name, builder_config, named",
  [
    (("msmt17", ""), "msmt17:trainval", "", "data.name"),
    (("msmt17", ""), "msmt17", "trainval", "data.config"),
    (("synthetic_reid", "tiny"), "synthetic_reid", "", "data.config"),  # the default is small
    (("market1501+msmt17", ""), "msmt17+market1501", "", "data.name"),  # the labels' order
  ],
)
def test_other_datasets_are_refused_by_name(tmp_path, recorded, name, builder_config, named):
  run = workdir_trained_on(tmp_path, *recorded)
  config = common.get_config()
  config.data.name, config.data.config = name, builder_config
  with pytest.raises(ValueError, match=re.escape(named) + ": workdir"):
    workdir.check_recipe(config, run)


@pytest.mark.parametrize(
  "mode, run, key, value",
  [
    ("eval", evaluate.evaluate_workdir, "eval.max_rank", 0),
    ("eval", evaluate.evaluate_workdir, "model.eval_feature", "logit"),
    ("eval", evaluate.evaluate_workdir, "eval.drop_distractors", True),
    ("extract", inference.extract_folder, "extract.num_pictures", 0),
    ("export", inference.export_workdir, "eval.batch_size", 0),
    ("visualize", visualize.visualize_workdir, "visualize.num_queries", 0),
  ],
)
def test_each_mode_checks_the_keys_it_uses_first(tmp_path, mode, run, key, value):
  config = tiny(tmp_path, **{key: value, "extract.input_dir": str(tmp_path)}, **NEEDS.get(key, {}))
  with pytest.raises(config_check.ConfigError, match=rf"{key}="):
    run(config, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == []
  assert key in config_check.keys_of(mode)


def test_a_mode_ignores_keys_it_does_not_use(tmp_path):
  config = tiny(tmp_path, **{"augment.erase_p": 1.5, "loss.margin": -1.0, "data.p": 1})
  assert "augment.erase_p" not in config_check.keys_of("eval")
  # Past the check: the (missing) checkpoint is what stops it.
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "run" / "checkpoints"))):
    evaluate.evaluate_workdir(config, str(tmp_path / "run"))


def test_extract_needs_an_input_folder(tmp_path):
  with pytest.raises(config_check.ConfigError, match=r"extract\.input_dir=''.*--mode extract"):
    inference.extract_folder(tiny(tmp_path), str(tmp_path / "run"))


@pytest.mark.slow
def test_the_command_line_ends_with_one_message_naming_every_bad_key(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
    [
      sys.executable,
      "run.py",
      "--config",
      "configs/synthetic.py:tiny",
      "--workdir",
      str(workdir),
      f"--config.data.data_dir={tmp_path / 'tfds'}",
      "--config.augment.erase_p=1.5",
      "--config.loss.label_smoothing=2",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert "augment.erase_p=1.5" in lines[-2] and "loss.label_smoothing=2.0" in lines[-1]
  assert "2 invalid config setting(s)" in lines[-3]
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
def test_summary_checks_the_model_keys():
  result = subprocess.run(
    [
      sys.executable,
      "run.py",
      "--config",
      "configs/synthetic.py:tiny",
      "--mode",
      "summary",
      "--config.model.depth=19",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert "model.depth=19" in last and "18, 34, 50, 101" in last
