"""Tests of the Grain train and eval pipelines."""

import io

import numpy as np
import pytest
from PIL import Image

from apnet_jax.data import pipeline
from apnet_jax.data.sampler import RandomIdentitySampler

SRC_H, SRC_W = 12, 6  # Source image size.
H, W = 24, 12  # Network input size in these tests.
IMAGES_PER_ID = [1, 2, 3, 4, 5, 7, 2, 6]  # 30 records, 8 ids.


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _record(index, label, image=None):
  if image is None:
    # Constant colour encoding the record: bilinear resizing keeps it exact.
    pixel = np.array([index, 10 * label, 200], np.uint8)
    image = _png(np.broadcast_to(pixel, (SRC_H, SRC_W, 3)).copy())
  return {
    "image": image,
    "pid": 1000 + label,
    "camid": index % 3,
    "label": label,
    "filename": f"{1000 + label:04d}_c{index % 3 + 1}_{index:04d}.png",
  }


def _train_source(images_per_id=IMAGES_PER_ID, seed=0):
  labels = np.concatenate([np.full(n, label) for label, n in enumerate(images_per_id)])
  labels = np.random.default_rng(seed).permutation(labels)
  records = [_record(i, int(label)) for i, label in enumerate(labels)]
  return records, labels


def _loader(records, labels, **kwargs):
  args = dict(
    p=3,
    k=2,
    height=H,
    width=W,
    seed=0,
    num_epochs=2,
    process_index=0,
    process_count=1,
  )
  args.update(kwargs)
  return pipeline.train_loader(records, labels, **args)


def _check_batch_content(batch, records):
  """Images, labels, pids and camids belong to the listed records."""
  for j, i in enumerate(batch["index"]):
    record = records[i]
    assert batch["label"][j] == record["label"]
    assert batch["pid"][j] == record["pid"]
    assert batch["camid"][j] == record["camid"]
    np.testing.assert_array_equal(
      batch["image"][j],
      np.broadcast_to([i, 10 * record["label"], 200], (H, W, 3)),
    )


def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------- decoding


def _pil_style_bilinear(src, out_h, out_w):
  """Separable triangle filter scaled by the downscale factor (PIL's rule)."""

  def weights(in_size, out_size):
    scale = in_size / out_size
    support = max(scale, 1.0)
    m = np.zeros((out_size, in_size))
    for o in range(out_size):
      center = (o + 0.5) * scale
      for i in range(in_size):
        m[o, i] = max(0.0, 1.0 - abs((i + 0.5 - center) / support))
      m[o] /= m[o].sum()
    return m

  rows, cols = weights(src.shape[0], out_h), weights(src.shape[1], out_w)
  return np.einsum("oh,hwc,pw->opc", rows, src.astype(float), cols)


@pytest.mark.parametrize("src_hw, out_hw", [((5, 3), (15, 9)), ((40, 20), (12, 7))])
def test_decode_and_resize_is_bilinear_resize_of_the_rgb_image(src_hw, out_hw):
  rng = np.random.default_rng(0)
  src = rng.integers(0, 256, (*src_hw, 3), dtype=np.uint8)
  out = pipeline.decode_and_resize(_png(src), height=out_hw[0], width=out_hw[1])
  assert out.dtype == np.uint8 and out.shape == (*out_hw, 3)
  # PIL uses fixed-point weights: allow one grey level.
  reference = _pil_style_bilinear(src, *out_hw)
  assert np.abs(out.astype(float) - reference).max() <= 1.0


def test_decode_converts_grayscale_and_jpeg_to_rgb():
  gray = np.tile(np.arange(0, 240, 20, dtype=np.uint8)[:, None], (1, 6))
  buf = io.BytesIO()
  Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=100)
  out = pipeline.decode_and_resize(buf.getvalue(), height=12, width=6)
  assert out.shape == (12, 6, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  assert np.abs(out[..., 0].astype(int) - gray).max() <= 3


@pytest.mark.parametrize(
  "image, match",
  [
    (b"not an image at all", "x/0001_c1.jpg"),
    (_png(np.zeros((8, 4, 3), np.uint8))[:40], "x/0001_c1.jpg"),
    (np.zeros((4, 4, 3), np.uint8), "SkipDecoding"),
  ],
)
def test_decode_errors_name_the_file(image, match):
  with pytest.raises(ValueError, match=match) as info:
    pipeline.decode_and_resize(image, height=8, width=4, filename="x/0001_c1.jpg")
  assert "x/0001_c1.jpg" in str(info.value)


# ------------------------------------------------------------ train loader


def test_train_batches_are_p_by_k_and_carry_their_records():
  records, labels = _train_source()
  spe = pipeline.steps_per_epoch(labels, p=3, k=2)
  sampler = RandomIdentitySampler(labels, p=3, k=2, seed=0)
  batches = list(_loader(records, labels, num_epochs=2))
  assert len(batches) == 2 * spe
  for step, batch in enumerate(batches):
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape == (6, H, W, 3)
    for key in ("label", "pid", "camid"):
      assert batch[key].dtype == np.int32 and batch[key].shape == (6,)
    np.testing.assert_array_equal(batch["index"], sampler.batch(step))
    groups = batch["label"].reshape(3, 2)
    assert (groups == groups[:, :1]).all()
    assert len(set(groups[:, 0].tolist())) == 3
    _check_batch_content(batch, records)


def test_labels_are_read_from_the_source_when_omitted():
  records, labels = _train_source()
  _assert_same_batches(
    list(_loader(records, None, num_epochs=1)),
    list(_loader(records, labels, num_epochs=1)),
  )


def test_process_layout_defaults_to_this_jax_process():
  records, labels = _train_source()
  _assert_same_batches(
    list(_loader(records, labels, num_epochs=1, process_index=None, process_count=None)),
    list(_loader(records, labels, num_epochs=1)),  # Single process: 0 of 1.
  )


def test_endless_stream_continues_past_an_epoch():
  records, labels = _train_source()
  spe = pipeline.steps_per_epoch(labels, p=3, k=2)
  it = _loader(records, labels, num_epochs=None)
  endless = [next(it) for _ in range(2 * spe + 1)]
  _assert_same_batches(endless[: 2 * spe], list(_loader(records, labels)))


def test_a_loader_from_a_step_continues_exactly():
  """Resuming needs only the step: batches are a function of (seed, step)."""
  records, labels = _train_source()
  reference = list(_loader(records, labels))
  for start in (1, 7, len(reference)):
    _assert_same_batches(list(_loader(records, labels, start_step=start)), reference[start:])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_from_any_step():
  records, labels = _train_source()
  reference = list(_loader(records, labels))
  # Started at step 2, as a resumed run starts (worker start-up is the slow part).
  it = _loader(records, labels, num_workers=2, start_step=2)
  try:
    _assert_same_batches(list(it), reference[2:])
  finally:
    it.close()


@pytest.mark.parametrize("p, k, process_count", [(3, 2, 2), (4, 2, 4), (3, 4, 3)])
def test_process_slices_partition_the_global_batch(p, k, process_count):
  records, labels = _train_source()
  whole = list(_loader(records, labels, p=p, k=k, num_epochs=1))
  shards = [
    list(
      _loader(records, labels, p=p, k=k, num_epochs=1, process_index=i, process_count=process_count)
    )
    for i in range(process_count)
  ]
  for step, batch in enumerate(whole):
    parts = [shard[step] for shard in shards]
    assert all(len(part["index"]) == p * k // process_count for part in parts)
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), batch[key])


def test_undecodable_train_image_names_its_file():
  # Two ids x two images with p = k = 2: every batch holds every record.
  records = [_record(i, i // 2) for i in range(4)]
  records[3]["image"] = b"\xff\xd8\xff\xe0 truncated jpeg"
  with pytest.raises(ValueError, match=r"1001_c1_0003\.png \(record 3\)"):
    next(_loader(records, np.array([0, 0, 1, 1]), p=2, k=2))


def test_labels_that_disagree_with_the_source_name_the_record():
  records, labels = _train_source()
  wrong = (labels + 1) % len(IMAGES_PER_ID)  # Valid labels, wrong source.
  with pytest.raises(ValueError, match=r"\d{4}_c\d_\d{4}\.png.*labels\[\d+\]"):
    next(_loader(records, wrong))


@pytest.mark.parametrize(
  "kwargs, labels, match",
  [
    ({"p": 9}, None, r"p=9.*\b8\b"),
    ({"k": 0}, None, r"\bk\b.*\b0\b"),
    ({"height": 0}, None, r"height.*\b0\b"),
    ({"width": 1.5}, None, r"width.*1\.5"),
    ({"num_workers": -1}, None, r"num_workers.*-1"),
    ({"num_epochs": 0}, None, r"num_epochs.*\b0\b"),
    ({"start_step": -1}, None, r"start_step.*-1"),
    ({"start_step": 1000}, None, r"start_step=1000.*num_epochs=2"),
    ({"process_count": 4}, None, r"p=3 x k=2.*process_count=4"),
    ({"process_index": 2, "process_count": 2}, None, r"process_index.*\b2\b"),
    ({}, np.zeros(5, np.int64), r"labels.*\(5,\).*\b30\b"),
  ],
)
def test_invalid_train_arguments_raise_clear_errors(kwargs, labels, match):
  records, real_labels = _train_source()
  with pytest.raises(ValueError, match=match):
    _loader(records, real_labels if labels is None else labels, **kwargs)


# ------------------------------------------------------------- eval batches


def _eval_source(n=10):
  return [_record(i, i % 4) for i in range(n)]


def test_eval_batches_keep_order_and_pad_the_last_batch():
  records = _eval_source(10)
  batches = list(
    pipeline.eval_batches(
      records, batch_size=4, height=H, width=W, process_index=0, process_count=1
    )
  )
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (4, H, W, 3)
    assert batch["mask"].dtype == bool
  np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(10))
  np.testing.assert_array_equal(index[~mask], [-1, -1])
  last = batches[-1]
  assert (last["image"][2:] == 0).all()
  np.testing.assert_array_equal(last["pid"][2:], [-1, -1])
  np.testing.assert_array_equal(last["camid"][2:], [-1, -1])
  assert list(last["filename"][2:]) == ["", ""]
  filenames = np.concatenate([b["filename"] for b in batches])[mask]
  assert list(filenames) == [r["filename"] for r in records]
  for batch in batches:
    real = {k: v[batch["mask"]] for k, v in batch.items()}
    real["label"] = np.array([records[i]["label"] for i in real["index"]])
    _check_batch_content(real, records)


def test_eval_batches_shard_over_processes():
  records = _eval_source(10)  # Last global batch: records 8, 9 + 2 pads.
  whole = list(
    pipeline.eval_batches(
      records, batch_size=4, height=H, width=W, process_index=0, process_count=1
    )
  )
  shards = [
    list(
      pipeline.eval_batches(
        records,
        batch_size=4,
        height=H,
        width=W,
        process_index=i,
        process_count=2,
      )
    )
    for i in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) == len(whole) == 3
  for j, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
        np.concatenate([shards[0][j][key], shards[1][j][key]]), batch[key]
      )
  # Process 1's half of the last global batch is all padding.
  assert not shards[1][-1]["mask"].any()


@pytest.mark.slow
def test_eval_worker_batches_match_and_decode_errors_name_the_file():
  records = _eval_source(10)
  reference = list(
    pipeline.eval_batches(
      records, batch_size=4, height=H, width=W, process_index=0, process_count=1
    )
  )
  records[9]["image"] = b"garbage"  # In the third batch.
  it = pipeline.eval_batches(
    records,
    batch_size=4,
    height=H,
    width=W,
    num_workers=1,
    process_index=0,
    process_count=1,
  )
  try:
    _assert_same_batches([next(it), next(it)], reference[:2])
    with pytest.raises(ValueError, match=r"1001_c1_0009\.png \(record 9\)"):
      next(it)
  finally:
    it.close()


@pytest.mark.parametrize(
  "records, kwargs, match",
  [
    ([], {}, r"eval_batches.*\b0 records"),
    (_eval_source(3), {"batch_size": 0}, r"batch_size.*\b0\b"),
    (_eval_source(3), {"process_count": 3}, r"\b4\b.*batch_size.*process_count=3"),
  ],
)
def test_invalid_eval_arguments_raise_clear_errors(records, kwargs, match):
  args = dict(batch_size=4, height=H, width=W, process_index=0, process_count=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pipeline.eval_batches(records, **args)
