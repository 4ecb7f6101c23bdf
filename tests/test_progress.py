"""Progress bars (stderr, process 0 only, TQDM_DISABLE) and quiet third-party log lines."""

import logging
import re

import jax
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from etils import epath
from tensorflow_datasets.core.utils import file_utils

from apnet_jax import checkpointing, progress  # noqa: F401  (their filters)
from apnet_jax.data import prepare  # noqa: F401


def draw(total=7):
  with progress.bar(total, "demo", "img") as bar:
    for _ in range(total):
      bar.update(1)


def test_bar_goes_to_stderr_with_its_total(capsys, monkeypatch):
  monkeypatch.delenv("TQDM_DISABLE", raising=False)
  draw()
  out, err = capsys.readouterr()
  assert out == ""
  assert re.search(r"demo: 100%\|[^|]*\| 7/7 \[[^]]*img", err), err


def test_no_bar_off_process_0_or_with_tqdm_disable(capsys, monkeypatch):
  monkeypatch.delenv("TQDM_DISABLE", raising=False)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  draw()
  assert capsys.readouterr() == ("", "")
  monkeypatch.undo()
  monkeypatch.setenv("TQDM_DISABLE", "1")
  draw()
  assert capsys.readouterr() == ("", "")


@pytest.fixture
def absl_records(caplog):
  """Records that pass the absl logger's filters; absl's verbosity is put back after."""
  verbosity = absl_logging.get_verbosity()
  caplog.set_level(logging.DEBUG)
  yield caplog
  absl_logging.set_verbosity(verbosity)


def test_third_party_notices_show_only_at_info(absl_records, tmp_path):
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  unfinished = tmp_path / "1.0.0"
  unfinished.mkdir()
  for verbosity, shown in ((absl_logging.WARNING, False), (absl_logging.INFO, True)):
    absl_logging.set_verbosity(verbosity)
    absl_records.clear()
    # The libraries' own calls log their notices: Orbax's (the same handler back,
    # so nothing changes) and TFDS's on a version folder without dataset_info.json.
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    assert not file_utils.is_valid_variant_dir(epath.Path(unfinished))
    for notice in ("Type handler registry type", "Variant folder"):
      assert (notice in absl_records.text) == shown, (verbosity, notice, absl_records.text)
  # Other warnings still show at the default verbosity.
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_records.clear()
  absl_logging.warning("Type handler of something else")
  assert "something else" in absl_records.text
