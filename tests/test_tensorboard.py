"""TensorBoard gets the report's images beside the scalars: MAE reconstructions (pretext stages) and
segmentation overlays (segmentation task stages), at every evaluation and at the end of a run; the run's config as
text and as hparams (with the final evaluation as their metrics); and a run prints its final metrics in one line.

The event files are read without TensorFlow / tensorboard: TFRecord framing (length, masked CRC-32C, data,
masked CRC-32C; checked with tensorboardX's own CRC) and tensorboardX's Event proto.
"""
import io
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tpp_jax import engine
from tpp_jax.logging_utils import final_line

from conftest import load_config


def read_events(workdir: pathlib.Path) -> list:
  """Every Event of the run's TensorBoard event files (workdir/tb/events.out.tfevents.*)."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.record_writer import masked_crc32c
  files = sorted((workdir / "tb").glob("events.out.tfevents.*"))
  assert files, f"no event file in {workdir / 'tb'}"
  events = []
  for f in files:
    data, pos = f.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header), f"{f}: bad length CRC"
      record = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(record), f
      events.append(Event.FromString(record))
      pos += 16 + length
  return events


def summaries(events, kind: str) -> dict:
  """{(tag, step): value} of the image (kind='image') or scalar (kind='simple_value') summaries."""
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.WhichOneof("value") == kind:
        out[(v.tag, e.step)] = v.image if kind == "image" else v.simple_value
  return out


def check_png(image, min_size=64) -> np.ndarray:
  png = image.encoded_image_string
  assert png.startswith(b"\x89PNG\r\n\x1a\n"), png[:8]
  img = Image.open(io.BytesIO(png))
  img.load()
  assert (img.height, img.width) == (image.height, image.width)
  assert min(img.size) >= min_size, img.size
  a = np.asarray(img.convert("RGB"))
  assert a.std() > 1.0, "blank image"
  return a


def test_tpp_run_writes_mae_reconstructions(tmp_path, capsys):
  c = load_config("experiment", "demo,smoke,stage=tpp,steps=4,eval_every=2,checkpoint_every=0,"
                  "data.max_train_examples=32,data.max_eval_examples=16")
  summary = engine.train(c, tmp_path / "tpp")
  final = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Final: ")]
  assert final == [final_line(summary["final"])], final  # one line, every final metric of every eval split
  assert all(f"{s}/{k} " in final[0] for s, res in summary["final"].items() for k in res), final
  events = read_events(tmp_path / "tpp")
  images = summaries(events, "image")
  # at the evaluation of step 2 and at the end (step 4), on validation images
  assert set(images) == {("val/mae_reconstructions", 2), ("val/mae_reconstructions", 4)}, set(images)
  for image in images.values():
    check_png(image)
  scalars = summaries(events, "simple_value")
  assert ("val/loss", 2) in scalars and ("train/loss", 4) in scalars  # the scalars are still there


def test_segmentation_run_writes_overlays(seg_run):
  events = read_events(seg_run[0])
  images = summaries(events, "image")
  assert set(images) == {("val/segmentation_overlays", 2)}, set(images)
  check_png(images[("val/segmentation_overlays", 2)])
  assert ("val/dice", 2) in summaries(events, "simple_value")


def test_classification_run_writes_scalars_only(cls_run):
  events = read_events(cls_run[0])
  assert not summaries(events, "image")
  assert ("test/accuracy", 30) in summaries(events, "simple_value")


def test_event_files_are_written_without_importing_torch(tmp_path):
  """tensorboardX's writer imports torch whenever it is installed (seconds at every run's start); the run's logger
  loads it without torch, and torch stays importable afterwards in that process."""
  pytest.importorskip("torch")
  code = (
      "import sys, pathlib\n"
      "from tpp_jax.logging_utils import MetricsLogger\n"
      f"m = MetricsLogger(pathlib.Path({str(tmp_path)!r}), 'finetune')\n"
      "m.log(3, 'train', {'loss': 0.25})\n"
      "m.close()\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n"
      "import torch\n"
      "print(torch.ones(2).sum().item())\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == "2.0", r.stderr[-2000:]
  assert summaries(read_events(tmp_path), "simple_value") == {("train/loss", 3): 0.25}


def test_final_line():
  assert final_line({"val": {"auc": 0.912345, "loss": 0.5}, "test": {"accuracy": 0.875, "n": 8}}) == \
      "Final: val/auc 0.9123, val/loss 0.5, test/accuracy 0.875, test/n 8"


def plugin_values(events, tag: str) -> list:
  """[(step, Summary.Value)] of one tag."""
  return [(e.step, v) for e in events for v in e.summary.value if v.tag == tag]


def test_config_is_text_and_hparams_with_the_final_metrics(cls_run):
  from tensorboardX.proto.api_pb2 import Status
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  wd, _ = cls_run
  events = read_events(wd)
  saved = json.loads((wd / "config.json").read_text())
  summary = json.loads((wd / "summary.json").read_text())
  # the config as a markdown code block (every line indented 4 spaces) on the text plugin, at the run's start
  [(step, text)] = plugin_values(events, "config/text_summary")
  assert step == 0 and text.metadata.plugin_data.plugin_name == "text"
  body = text.tensor.string_val[0].decode()
  assert all(l.startswith("    ") for l in body.splitlines())
  assert json.loads(body) == saved
  # hparams: the session start holds every scalar field of the config, dotted
  hp = lambda tag: [HParamsPluginData.FromString(v.metadata.plugin_data.content) for _, v in plugin_values(events, tag)]
  [start] = hp("_hparams_/session_start_info")
  got = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.session_start_info.hparams.items()}
  assert got["stage"] == "full" and got["steps"] == 30 and got["optim.lr"] == pytest.approx(3e-3)
  assert got["task.class_weights"] is True and got["data.max_eval_examples"] == 0
  assert "eval_splits" not in got and "config_history" not in got  # not scalars
  flat = {}
  def walk(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      elif isinstance(v, (bool, int, float, str)):
        flat[prefix + k] = v
  walk(saved)
  assert got == {k: v if isinstance(v, (bool, str)) else pytest.approx(float(v)) for k, v in flat.items()}
  # at the end: the experiment's metrics are the final evaluation's tags, whose scalars hold the final values
  [experiment], [end] = hp("_hparams_/experiment"), hp("_hparams_/session_end_info")
  assert end.session_end_info.status == Status.Value("STATUS_SUCCESS")
  assert {h.name for h in experiment.experiment.hparam_infos} == set(flat)
  tags = {m.name.tag for m in experiment.experiment.metric_infos}
  final = {f"test/{k}": v for k, v in summary["final"]["test"].items()}
  assert tags == set(final) and "test/accuracy" in tags
  scalars = summaries(events, "simple_value")
  for tag, value in final.items():
    if value is not None:
      assert scalars[(tag, 30)] == pytest.approx(value, rel=1e-6), tag
