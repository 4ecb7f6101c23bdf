"""The training job end to end on the tiny synthetic dataset, and its failure paths."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
from test_metric_writers import tensorboard_view

from apnet_jax import build_model, checkpointing, errors, evaluate, preemption, restore, train
from apnet_jax import workdir as workdir_lib
from apnet_jax.data import opening, sources
from configs.synthetic import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGTERM_AT_IMPORT = signal.getsignal(signal.SIGTERM)  # before any training in this process
SIGINT_AT_IMPORT = signal.getsignal(signal.SIGINT)


def tiny_config(data_dir, **train_overrides):
  config = get_config("tiny")
  config.data.data_dir = data_dir
  config.train.log_every_steps = 1
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  return config


def saved_state(workdir, step):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored["state"]


@pytest.fixture(scope="module")
def straight_run(tiny_data_dir, tmp_path_factory):
  """4 steps of the tiny config in one go: (workdir, results)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = tiny_config(tiny_data_dir, max_steps=4, eval_epochs=(1, 2), keep_best=2)
  return workdir, train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_restart_resumes_exactly(tiny_data_dir, straight_run, tmp_path):
  """2N steps == N steps + restart + N steps, parameter for parameter.

  The restart decodes in a worker process (the first half in-process): the
  input pipeline resumes from the step alone, whatever the worker count.
  """
  (straight, results), split = straight_run, str(tmp_path / "split")
  config = tiny_config(tiny_data_dir, max_steps=2, eval_epochs=(1, 2), keep_best=2)
  train.train_and_evaluate(config, split)
  config.train.max_steps = 4
  config.data.num_workers = 1
  train.train_and_evaluate(config, split)
  a, b = saved_state(straight, 4), saved_state(split, 4)
  leaves_a, leaves_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
  assert leaves_a.keys() == leaves_b.keys() and len(leaves_a) > 100
  for key in leaves_a:
    np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=str(key))

  # The run's records: config, metrics, TensorBoard, results.
  assert set(results) >= {"R1", "R5", "R10", "mAP", "mINP", "protocol"}
  assert 0 <= results["mAP"] <= 100
  with open(os.path.join(straight, "results.json")) as f:
    assert json.load(f)["step"] == 4
  with open(os.path.join(split, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == [1, 2, 3, 4]  # the restart continued at step 3
  for key in (
    "loss",
    "ce",
    "triplet",
    "acc",
    "lr",
    "img_per_s",
    "grad_norm",
    "param_norm",
    "epoch",
  ):
    assert key in records[0], key
  assert any(r["kind"] == "eval" and "mAP" in r for r in records)
  assert os.listdir(os.path.join(split, "tensorboard"))
  with open(os.path.join(split, "config.json")) as f:
    saved = json.load(f)
  assert saved["train"]["max_steps"] == 4 and saved["data"]["num_workers"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(
  "section, key, value, expected",
  [
    ("model", "level", 1, r"model\.level: checkpoint 2, config 1"),
    ("train", "seed", 1, r"train\.seed: checkpoint 0, config 1"),
    # A rerun with a shorter schedule: nothing to train, and not this config's model.
    (
      "train",
      "max_steps",
      2,
      r"holds step 4, past this config's last step 2 "
      r"\(config\.train\.max_steps=2\).*config\.train\.max_steps to at least 4",
    ),
    (
      "train",
      "epochs",
      1,
      r"holds step 4, past this config's last step 2 \(config\.train\."
      r"epochs=1 x 2 steps per epoch\).*config\.train\.epochs to at least 2.*--mode eval",
    ),
  ],
  ids=["level", "seed", "max_steps", "epochs"],
)
def test_resume_refuses_another_run(
  tiny_data_dir, straight_run, tmp_path, section, key, value, expected
):
  workdir = tmp_path / "run"  # a copy: a refusal that fails must not harm the other tests
  shutil.copytree(straight_run[0], workdir)
  before = {
    name: (workdir / name).read_bytes() for name in ("config.json", "results.json", "metrics.jsonl")
  }
  other = tiny_config(tiny_data_dir, max_steps=6, eval_epochs=(1,))
  setattr(other[section], key, value)
  checkpoints = re.escape(str(workdir / "checkpoints"))
  with pytest.raises(ValueError, match=expected.format(checkpoints=checkpoints)):
    train.train_and_evaluate(other, str(workdir))
  for name, content in before.items():  # the run's own records are untouched
    assert (workdir / name).read_bytes() == content, name
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_records_without_seed_still_resume():
  """Records written before the seed was checked are let through, not refused."""
  current = {"seed": 3, "num_classes": 8, "model": {}, "data": {"num_workers": 2}}
  checkpointing.check_compatible({"num_classes": 8, "model": {}, "data": {}}, current, "w")
  # ... while a seed that is recorded, and differs, is refused by name.
  with pytest.raises(ValueError, match=r"train\.seed: checkpoint 2, config 3"):
    checkpointing.check_compatible(
      {"seed": 2, "num_classes": 8, "model": {}, "data": {}}, current, "w"
    )


def test_a_checkpoint_of_the_same_datasets_spelled_another_way_is_the_run_own():
  saved = {"seed": 0, "num_classes": 1041, "model": {}, "data": {"name": "msmt17", "config": ""}}
  current = dict(saved, data={"name": "msmt17:train", "config": ""})
  checkpointing.check_compatible(saved, current, "w")  # TFDS opens msmt17 as msmt17:train
  current = dict(saved, data={"name": "msmt17", "config": "trainval"})
  with pytest.raises(ValueError, match=r"data\.config: checkpoint '', config 'trainval'"):
    checkpointing.check_compatible(saved, current, "w")


@pytest.mark.slow
def test_training_gives_the_signals_back(straight_run):
  """After train_and_evaluate returns (in a notebook, say), SIGTERM and SIGINT act as before."""
  assert signal.getsignal(signal.SIGTERM) == SIGTERM_AT_IMPORT
  assert signal.getsignal(signal.SIGINT) == SIGINT_AT_IMPORT


def test_a_first_signal_is_a_flag_and_a_second_ends_the_process_at_once():
  def mine(signum, frame):
    del signum, frame

  previous = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with pytest.raises(SystemExit) as stopped:
      with preemption.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.set
        # The default action: a second Ctrl-C ends the process even inside XLA.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL)
        stop.exit_if_set("saved step 3")  # what the loop does after saving
    assert stopped.value.code == 130
    assert signal.getsignal(signal.SIGTERM) == mine and signal.getsignal(signal.SIGINT) == mine
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def test_non_finite_loss_names_the_step():
  window = [{"loss": np.float32(1.0)}, {"loss": np.float32(np.nan)}]
  with pytest.raises(errors.NonFiniteLossError, match=r"\bstep 8\b"):
    train._reduce_window(window, first_step=6)


def test_missing_imagenet_file_says_which_and_where(tiny_model, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothere\.pth.*resnet50-19c8e357\.pth"):
    restore.init_from_imagenet(tiny_model, str(tmp_path / "nothere.pth"))


def test_unprepared_benchmark_says_how_to_prepare(tmp_path):
  from configs.market1501 import get_config as market

  config = market()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(
    FileNotFoundError, match=rf"market1501.*{re.escape(str(tmp_path))}.*manual_dir"
  ):
    opening.open_dataset(config.data)


def test_command_line_rejects_an_unknown_key():
  result = subprocess.run(
    [
      sys.executable,
      "run.py",
      "--config",
      "configs/synthetic.py",
      "--config.model.levle=3",
      "--mode",
      "summary",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "levle" in result.stderr and "level" in result.stderr


@pytest.mark.slow
def test_run_writes_the_report(straight_run):
  workdir, results = straight_run
  for picture in ("cmc.png", "ranked_list.png"):
    with open(os.path.join(workdir, picture), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert results["protocol"]["distractors"] == "kept (standard)"
  # TensorBoard, read by its own reader, shows each evaluation (epochs 1 and 2 of
  # 2 steps): its metrics and its pictures, the last ones those of the report.
  scalars, images = tensorboard_view(os.path.join(workdir, "tensorboard"))
  assert [step for step, _ in scalars["eval/mAP"]] == [2, 4]
  assert scalars["eval/mAP"][-1][1] == pytest.approx(results["mAP"], rel=1e-6)
  assert scalars["eval/R1"][-1][1] == pytest.approx(results["R1"], rel=1e-6)
  ranked = PIL.Image.open(os.path.join(workdir, "ranked_list.png"))
  assert images["eval/ranked_list"] == [(2, *ranked.size), (4, *ranked.size)]
  assert [step for step, _, _ in images["eval/cmc"]] == [2, 4]


@pytest.mark.slow
def test_eval_mode_restores_the_chosen_checkpoint(tiny_data_dir, straight_run, tmp_path, capsys):
  workdir, results = straight_run
  config = tiny_config(tiny_data_dir)
  capsys.readouterr()  # not the training run's bars
  latest = evaluate.evaluate_workdir(config, workdir)
  assert latest["checkpoint_step"] == 4
  # Progress on stderr, a bar per split counting its images (each fits one batch of 32).
  err = capsys.readouterr().err
  builder = opening.open_dataset(config.data)
  for split in ("query", "gallery"):
    n = len(sources.load_split(builder, split))
    assert re.search(rf"{split}: 100%\|[^|]*\| {n}/{n} \[[^]]*img", err), (split, n, err)
  assert latest["mAP"] == pytest.approx(results["mAP"], abs=1e-6)
  config.eval.step = 2
  assert evaluate.evaluate_workdir(config, workdir)["checkpoint_step"] == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if '"eval"' in line]
  best = max(evals, key=lambda r: r["mAP"])["step"]
  config.eval.step, config.eval.use_best = -1, True
  assert evaluate.evaluate_workdir(config, workdir)["checkpoint_step"] == best
  config.eval.step, config.eval.use_best = 3, False
  with pytest.raises(FileNotFoundError, match=r"\bstep 3\b.*\[2, 4\]"):
    evaluate.evaluate_workdir(config, workdir)
  config.eval.step = -1
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
    evaluate.evaluate_workdir(config, str(tmp_path / "empty"))


@pytest.mark.slow
def test_eval_mode_takes_an_official_pytorch_checkpoint(
  tiny_data_dir, straight_run, tiny_model, tmp_path
):
  """--mode eval on eval.torch_checkpoint scores the model as its Orbax checkpoint does.

  The .pth is written by save_torch_weights, so this is the eval path, not the
  file format: test_weights.py reads files real PyTorch wrote and checks the
  official key list.
  """
  from flax import nnx

  from apnet_jax import optim, save_torch_weights, train_step

  workdir, results = straight_run
  config = tiny_config(tiny_data_dir)
  graphdef, template = train_step.create_train_state(tiny_model, optim.make_optimizer(config, 2)[0])
  state, _ = checkpointing.restore(checkpointing.make_manager(workdir, keep_best=2), 4, template)
  save_torch_weights(
    nnx.merge(graphdef, state.params, state.model_state), tmp_path / "official.pth"
  )
  config.eval.torch_checkpoint = str(tmp_path / "official.pth")
  from_torch = evaluate.evaluate_workdir(config, str(tmp_path / "report"))
  assert from_torch["torch_checkpoint"].endswith("official.pth")
  assert from_torch["mAP"] == pytest.approx(results["mAP"], abs=1e-6)


@pytest.mark.slow
def test_features_are_image_plus_flip(tiny_data_dir, straight_run):
  import jax.numpy as jnp
  from flax import nnx

  from apnet_jax.data import augment, pipeline, sources
  from apnet_jax.evaluation.features import extract_features

  config = tiny_config(tiny_data_dir)
  model = build_model(config.model, 8, rngs=nnx.Rngs(3))
  model.eval()
  builder = opening.open_dataset(config.data)
  query = sources.load_split(builder, "query")
  out = extract_features(model, query, eval_feature="bn", input_size=(64, 32), batch_size=16)
  assert out["features"].shape == (len(query), model.feature_dim)  # padding dropped
  batch = next(
    iter(
      pipeline.eval_batches(
        query, batch_size=4, height=64, width=32, process_index=0, process_count=1
      )
    )
  )
  x = augment.normalize(jnp.asarray(batch["image"]))
  expected = model(x)["feat"] + model(x[:, :, ::-1])["feat"]
  np.testing.assert_allclose(out["features"][:4], expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out["pid"][:4], batch["pid"])
  with pytest.raises(ValueError, match="eval_feature"):
    extract_features(model, query, eval_feature="pooled", input_size=(64, 32), batch_size=16)
  with pytest.raises(ValueError, match=r"eval\.batch_size=12\b.*\b8\b"):
    extract_features(model, query, eval_feature="bn", input_size=(64, 32), batch_size=12)


@pytest.mark.slow
def test_drop_distractors_switch(tiny_data_dir, straight_run):
  from flax import nnx

  from apnet_jax.evaluation import evaluator as evaluator_lib

  config = tiny_config(tiny_data_dir)
  model = build_model(config.model, 8, rngs=nnx.Rngs(0))
  entry = f"{config.data.name}:{config.data.config}"
  standard = evaluator_lib.ReidEvaluator(config, evaluator_lib.open_eval_datasets(config))
  standard_gallery = standard.run(model).features[entry]["gallery"]
  config.eval.drop_distractors = True
  dropped = evaluator_lib.ReidEvaluator(config, evaluator_lib.open_eval_datasets(config))
  report = dropped.run(model)
  dropped_gallery = report.features[entry]["gallery"]
  assert (standard_gallery["pid"] == 0).sum() == 4  # the tiny config's distractors
  assert (dropped_gallery["pid"] != 0).all()
  assert len(dropped_gallery["pid"]) == len(standard_gallery["pid"]) - 4
  assert report.results["datasets"][entry]["protocol"]["distractors"] == "dropped"


def test_init_from_loads_a_torchvision_backbone(tmp_path):
  from flax import nnx

  from apnet_jax import torch_io, weights

  config = get_config("tiny")
  source = build_model(config.model, 8, rngs=nnx.Rngs(1))
  torchvision = {
    k[len("base.") :]: v
    for k, v in weights.torch_state_dict(source).items()
    if k.startswith("base.")
  }
  torch_io.write_pth(torchvision, tmp_path / "resnet.pth")
  model = build_model(config.model, 8, rngs=nnx.Rngs(2))
  restore.init_from_imagenet(model, str(tmp_path / "resnet.pth"))
  np.testing.assert_array_equal(
    model.backbone.layer4[1].conv2.kernel[...], source.backbone.layer4[1].conv2.kernel[...]
  )
  # A whole official checkpoint is not an ImageNet backbone: refused by name.
  torch_io.write_pth(weights.torch_state_dict(source), tmp_path / "apnet.pth")
  with pytest.raises(ValueError, match=r"model\.init_from: .*apnet\.pth.*eval\.torch_checkpoint"):
    restore.init_from_imagenet(model, str(tmp_path / "apnet.pth"))
  del torchvision["layer2.0.conv1.weight"]
  torch_io.write_pth(torchvision, tmp_path / "partial.pth")
  with pytest.raises(ValueError, match=r"partial\.pth.*\['layer2\.0\.conv1"):
    restore.init_from_imagenet(model, str(tmp_path / "partial.pth"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "signum, returncode", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_saves_a_checkpoint_and_stops(tiny_data_dir, tmp_path, signum, returncode):
  import time

  workdir, log = tmp_path / "preempted", tmp_path / "preempted.log"
  with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the run
    process = subprocess.Popen(
      [
        sys.executable,
        "run.py",
        "--config",
        "configs/synthetic.py:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.train.epochs=1000",
        "--config.train.log_every_steps=1",
      ],
      cwd=ROOT,
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  deadline = time.time() + 240
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    assert process.poll() is None, log.read_text(errors="replace")[-2000:]
    time.sleep(0.5)
  process.send_signal(signum)
  try:
    process.wait(timeout=120)
  finally:  # a hang fails the test; no training process outlives it
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == returncode, log.read_text(errors="replace")[-2000:]
  steps = ocp.CheckpointManager(str(workdir / "checkpoints")).all_steps()
  logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps and steps[-1] >= logged[-1] >= 1  # the step it stopped at was saved


def test_eval_refuses_an_incomplete_official_checkpoint(tiny_model, tmp_path):
  """The model is restored abstractly: a checkpoint must fill all of it, or be refused."""
  from apnet_jax import torch_io, weights

  config = get_config("tiny")
  state = weights.torch_state_dict(tiny_model)
  del state["bottleneck.running_var"]  # the BNNeck's: no alias stands in for it
  torch_io.write_pth(state, tmp_path / "partial.pth")
  config.eval.torch_checkpoint = str(tmp_path / "partial.pth")
  with pytest.raises(ValueError, match=r"partial\.pth.*bottleneck\.running_var"):
    restore.restore_model(config, str(tmp_path))
  del state["classifier.weight"]
  torch_io.write_pth(state, tmp_path / "headless.pth")
  config.eval.torch_checkpoint = str(tmp_path / "headless.pth")
  with pytest.raises(ValueError, match=r"headless\.pth.*classifier\.weight"):
    restore.restore_model(config, str(tmp_path))


# --- One run per workdir, and only the run that wrote its records continues them ----------


def copy_of(straight_run, tmp_path):
  """A copy of the straight run's workdir, and its records' bytes (a test must not harm it)."""
  workdir = tmp_path / "run"
  shutil.copytree(straight_run[0], workdir)
  records = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
  return workdir, records


def assert_records_unchanged(workdir, records):
  assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == records


@pytest.mark.slow
def test_a_workdir_in_training_is_refused_to_a_second_training_and_eval_writes_aside(
  tiny_data_dir, straight_run, tmp_path
):
  workdir, records = copy_of(straight_run, tmp_path)
  held = workdir_lib.WorkdirLock.acquire(str(workdir), "training")  # the running training
  records = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
  try:
    with pytest.raises(
      workdir_lib.WorkdirBusyError, match=rf"{re.escape(str(workdir))}.*training.*pid \d+"
    ):
      train.train_and_evaluate(tiny_config(tiny_data_dir, max_steps=6), str(workdir))
    results = evaluate.evaluate_workdir(tiny_config(tiny_data_dir), str(workdir))
    assert_records_unchanged(workdir, records)  # results.json and pictures untouched
    with open(workdir / "eval" / "results.json") as f:
      assert json.load(f)["checkpoint_step"] == results["checkpoint_step"] == 4
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == [
      "cmc.png",
      "ranked_list.png",
      "results.json",
    ]
  finally:
    held.release()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_eval_accepts_a_config_that_differs_only_in_what_eval_does_not_use(
  tiny_data_dir, straight_run
):
  config = tiny_config(tiny_data_dir)
  config.data.p, config.data.k = 2, 8  # another P x K: the same model and dataset
  assert evaluate.evaluate_workdir(config, straight_run[0])["checkpoint_step"] == 4


def test_logs_without_a_checkpoint_of_another_run_are_refused(tiny_data_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  other = tiny_config(tiny_data_dir)
  other.model.level = 1
  (workdir / "config.json").write_text(other.to_json_best_effort(indent=2))
  (workdir / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 9.0}\n')
  records = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
  with pytest.raises(
    ValueError, match=rf"{re.escape(str(workdir))}.*model\.level: workdir 1, config 2"
  ):
    train.train_and_evaluate(tiny_config(tiny_data_dir, max_steps=1), str(workdir))
  assert_records_unchanged(workdir, {**records, ".lock": (workdir / ".lock").read_bytes()})
  assert not (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_resuming_with_a_changed_recipe_is_refused_unless_allowed_and_recorded(
  tiny_data_dir, straight_run, tmp_path
):
  workdir, records = copy_of(straight_run, tmp_path)
  changed = tiny_config(tiny_data_dir, epochs=3, eval_epochs=(1, 2), keep_best=2)  # 6 steps
  changed.optim.base_lr = 5e-3
  with pytest.raises(
    ValueError,
    match=r"optim\.base_lr: workdir 0\.001, config 0\.005.*"
    r"--config\.train\.allow_changes=optim\.base_lr",
  ):
    train.train_and_evaluate(changed, str(workdir))
  assert_records_unchanged(workdir, {**records, ".lock": (workdir / ".lock").read_bytes()})
  changed.train.allow_changes = "optim.base_lr,optim.gamma"
  train.train_and_evaluate(changed, str(workdir))
  logged = [
    json.loads(line) for line in (workdir / "config_changes.jsonl").read_text().splitlines()
  ]
  assert [(r["step"], r["changes"]) for r in logged] == [
    (4, {"optim.base_lr": {"from": 1e-3, "to": 5e-3}})
  ]
  assert json.loads((workdir / "config.json").read_text())["optim"]["base_lr"] == 5e-3
  steps = [
    json.loads(line)["step"]
    for line in (workdir / "metrics.jsonl").read_text().splitlines()
    if '"train"' in line
  ]
  assert steps == [1, 2, 3, 4, 5, 6]  # appended to the same run's log
  changed.train.allow_changes = "optim.base_rate"
  with pytest.raises(ValueError, match=r"train\.allow_changes.*optim\.base_rate"):
    train.train_and_evaluate(changed, str(workdir))


def test_a_workdir_that_is_a_file_is_named(tiny_data_dir, tmp_path):
  (tmp_path / "run").write_text("my notes")
  with pytest.raises(NotADirectoryError, match=re.escape(str(tmp_path / "run"))):
    train.train_and_evaluate(tiny_config(tiny_data_dir), str(tmp_path / "run"))
  assert (tmp_path / "run").read_text() == "my notes"


def test_use_best_without_an_evaluated_checkpoint_says_so():
  class Unscored:  # a manager whose only checkpoint was saved between evaluations
    directory = "w/checkpoints"

    def all_steps(self):
      return [2]

    def metrics(self, step):
      return None

  config = tiny_config("unused")
  config.eval.use_best = True
  with pytest.raises(
    FileNotFoundError, match=r"config\.eval\.use_best.*w/checkpoints.*\[2\].*step 2.*eval\.step"
  ):
    restore._restore_checkpoint(Unscored(), config, "w")


@pytest.mark.parametrize("config_file", ["common", "market1501", "dukemtmc"])
def test_a_config_file_that_takes_no_argument_refuses_one_by_name(config_file):
  import importlib

  get = importlib.import_module(f"configs.{config_file}").get_config
  with pytest.raises(ValueError, match=rf"configs/{config_file}\.py.*'typo'"):
    get("typo")
  assert get() is not None and get("") is not None


def test_the_command_line_refuses_a_config_argument_by_name():
  result = subprocess.run(
    [sys.executable, "run.py", "--config", "configs/market1501.py:typo", "--mode", "summary"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "configs/market1501.py" in result.stderr and "'typo'" in result.stderr


@pytest.mark.slow
def test_a_failed_evaluation_keeps_the_step_it_evaluated(tiny_data_dir, tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("the evaluation broke")

  from apnet_jax.evaluation import evaluator as evaluator_lib

  monkeypatch.setattr(evaluator_lib.ReidEvaluator, "run", broken)
  config = tiny_config(tiny_data_dir, max_steps=2, eval_epochs=(1,), checkpoint_every_epochs=2)
  with pytest.raises(RuntimeError, match="the evaluation broke"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints")).all_steps() == [2]
