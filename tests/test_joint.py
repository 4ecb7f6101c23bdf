"""Joint training data: name[:config] entries."""

import ml_collections
import pytest

from apnet_jax import config_check
from apnet_jax.data import sources
from apnet_jax.data.entries import DatasetEntry, data_entries, parse_entries
from configs import joint as joint_config

# --- Entries ----------------------------------------------------------------------


def test_entries_keep_their_order_and_configs():
  assert parse_entries("market1501+dukemtmc_reid+msmt17:train", separator="+",
                       known=sources.BUILDERS) == (
      DatasetEntry("market1501", ""), DatasetEntry("dukemtmc_reid", ""),
      DatasetEntry("msmt17", "train"))
  assert parse_entries("dukemtmc_reid, msmt17,reid_folder:mycams", separator=",") == (
      DatasetEntry("dukemtmc_reid"), DatasetEntry("msmt17"),
      DatasetEntry("reid_folder", "mycams"))
  assert [str(e) for e in parse_entries("cuhk03:detected+market1501", separator="+")] == [
      "cuhk03:detected", "market1501"]


@pytest.mark.parametrize("text, match", [
    ("market1501++msmt17", r"data\.name='market1501\+\+msmt17': entry 2 is empty"),
    ("market1501+", "entry 2 is empty"),
    ("", "entry 1 is empty"),
    ("msmt17:", r"entry 'msmt17:' is not name\[:config\]"),
    (":train", r"entry ':train' is not name\[:config\]"),
    ("market1501+duke", r"entry 'duke' names no known dataset; known: cuhk03, dukemtmc_reid"),
    ("msmt17:train+market1501+msmt17:train", "entry 'msmt17:train' is given twice"),
])
def test_bad_entries_are_refused_by_entry(text, match):
  with pytest.raises(ValueError, match=match):
    parse_entries(text, separator="+", known=sources.BUILDERS, key="data.name")


def data(name, config=""):
  return ml_collections.ConfigDict({"name": name, "config": config})


def test_the_datasets_of_a_data_section():
  assert data_entries(data("cuhk03", "detected")) == (DatasetEntry("cuhk03", "detected"),)
  assert data_entries(data("market1501")) == (DatasetEntry("market1501", ""),)
  assert data_entries(data("msmt17:trainval")) == (DatasetEntry("msmt17", "trainval"),)
  assert data_entries(data("market1501+cuhk03:labeled"), known=sources.BUILDERS) == (
      DatasetEntry("market1501"), DatasetEntry("cuhk03", "labeled"))


@pytest.mark.parametrize("name", ["market1501+cuhk03", "cuhk03:labeled"])
def test_data_config_beside_entries_that_carry_configs_is_refused_naming_both(name):
  with pytest.raises(ValueError, match=r"data\.config='detected'.*data\.name="):
    data_entries(data(name, "detected"))


# --- Config -----------------------------------------------------------------------


def test_the_joint_config_checks_and_names_the_three_benchmarks():
  config = joint_config.get_config()
  config_check.check(config, "train", datasets=sources.BUILDERS)
  assert data_entries(config.data, known=sources.BUILDERS) == (
      DatasetEntry("market1501"), DatasetEntry("dukemtmc_reid"), DatasetEntry("msmt17", "train"))
  with pytest.raises(ValueError, match="configs/joint.py takes no argument"):
    joint_config.get_config("bn")


def test_the_config_check_refuses_bad_entries_and_a_config_beside_them():
  config = joint_config.get_config()
  config.data.name = "market1501+msmt"
  config.data.config = "train"
  with pytest.raises(config_check.ConfigError) as refusal:
    config_check.check(config, "prepare", datasets=sources.BUILDERS)
  assert [key for key, _, _ in refusal.value.problems] == ["data.name", "data.config"]
  message = str(refusal.value)
  assert "entry 'msmt' names no known dataset" in message
  assert "data.config='train': '' while data.name='market1501+msmt'" in message
