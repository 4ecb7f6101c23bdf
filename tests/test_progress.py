"""Progress bars: on stderr, on process 0 only, off with TQDM_DISABLE."""

import re

import jax

from apnet_jax import progress


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

