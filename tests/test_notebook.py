"""notebooks/apnet_colab.ipynb runs end to end on the CPU, so it cannot rot.

A notebook is JSON: its code cells run here in order in one namespace with
``exec``, without Jupyter. The cells tagged ``install`` and ``drive`` (the
pip install and the Google Drive mount) are skipped; any other shell (``!``)
or magic (``%``) line fails the test. After the ``parameters`` cell, the run
is switched to the tiny synthetic config, two steps, in a temporary workdir.
IPython's ``display`` is replaced by a recorder, so the test checks the
pictures the notebook shows.
"""

import builtins
import json
import os
import re
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "apnet_colab.ipynb")
SKIPPED_TAGS = {"install", "drive"}


def load_cells():
  with open(NOTEBOOK) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  return notebook["cells"]


def install_cell():
  (cell,) = [c for c in load_cells() if "install" in c["metadata"].get("tags", [])]
  return "".join(cell["source"])


def test_the_repository_address_is_one_variable():
  assignments = [
    line
    for cell in load_cells()
    if cell["cell_type"] == "code"
    for line in "".join(cell["source"]).splitlines()
    if "REPO_URL =" in line
  ]
  assert len(assignments) == 1 and assignments[0] in install_cell().splitlines()
  clone = [line for line in install_cell().splitlines() if "git clone" in line]
  assert len(clone) == 1 and "{REPO_URL} /content/apnet-jax" in clone[0]
  code = "".join("".join(c["source"]) for c in load_cells() if c["cell_type"] == "code")
  assert code.count("github.com") == 1  # the assignment alone


@pytest.mark.slow
def test_the_install_line_keeps_the_installed_jax(tmp_path):
  # The install cell's own pip line, run as Colab's shell would (here against
  # this environment: Colab's versions in CI's floor run), as a dry run: it must
  # install the package and move neither jax nor jaxlib, whose replacement would
  # strand Colab's CUDA plugin.
  (line,) = [
    line.lstrip("!") for line in install_cell().splitlines() if line.startswith("!pip install")
  ]
  report = tmp_path / "report.json"
  command = line.replace("/content/apnet-jax", ROOT).replace(
    "pip install", f"pip install --dry-run --report {report}", 1
  )
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  done = subprocess.run(
    ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stdout + done.stderr
  moved = {
    item["metadata"]["name"].lower(): item["metadata"]["version"]
    for item in json.loads(report.read_text())["install"]
  }
  assert "apnet-jax" in moved
  assert not {name for name in moved if re.fullmatch(r"jax|jaxlib|jax-cuda\d+-\w+", name)}, moved


def test_notebook_is_committed_without_outputs():
  for i, cell in enumerate(load_cells()):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  monkeypatch.chdir(ROOT)  # Colab's working directory is the clone (`%cd` in the install cell)
  # The cells' own `from IPython.display import ...` gets a recorder (IPython is not a
  # dependency, and a fake IPython in sys.modules would confuse libraries probing for it).
  shown = []
  recorder = types.ModuleType("IPython.display")
  recorder.Image = lambda filename: filename
  recorder.display = shown.append

  def cell_import(name, globals=None, locals=None, fromlist=(), level=0):
    if name.split(".")[0] == "IPython":
      assert name == "IPython.display" and fromlist, "only `from IPython.display import`"
      return recorder
    return builtins.__import__(name, globals, locals, fromlist, level)

  namespace = {
    "__name__": "__notebook__",
    "__builtins__": dict(vars(builtins), __import__=cell_import),
  }
  skipped, parameters = set(), False
  for i, cell in enumerate(load_cells()):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    tags = set(cell["metadata"].get("tags", []))
    if tags & SKIPPED_TAGS:
      skipped |= tags & SKIPPED_TAGS
      continue
    for line in source.splitlines():
      if line.lstrip().startswith(("!", "%")):
        pytest.fail(f"cell {i} has a shell or magic line outside the install cell: {line}")
    exec(compile(source, f"<notebook cell {i}>", "exec"), namespace)  # noqa: S102
    if "parameters" in tags:
      parameters = True
      config = namespace["config"] = namespace["synthetic"].get_config("tiny")
      config.data.data_dir = str(tmp_path / "tfds")
      config.model.input_size = (128, 64)  # XLA's CPU convolutions crawl on 64x32's thin maps
      config.train.max_steps = 2
      namespace["WORKDIR"] = str(workdir)
  assert skipped == SKIPPED_TAGS and parameters

  # The pictures it showed, in order, exist; the tables were printed.
  assert shown == [str(workdir / name) for name in ("cmc.png", "ranked_list.png", "attention.png")]
  for path in shown:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  out = capsys.readouterr().out
  assert "mAP" in out and "synthetic_reid/tiny" in out
  assert out.rstrip().splitlines()[-1].split()[:3] == ["run", "synthetic_reid/tiny", "kept"]
  assert 0 <= namespace["results"]["mAP"] <= 100
  assert "benchmark_results" not in namespace  # part 2 did nothing with DATA_ON_DRIVE unset
