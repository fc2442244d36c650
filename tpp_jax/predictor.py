"""A finished run as a function of images, shared by `python -m tpp_jax.predict` and the Python API
(`tpp_jax.load_run`): the run's checkpoint, its eval transform (data/transforms.make_transform(config.data,
train=False)) and its model, jitted with batches sharded over all devices.

Images come in as uint8 (H, W, 1|3) (decode.read_image / decode.as_image: the one rule for every format); results
go out per image: class probabilities (K,), or for segmentation the class-id mask at the image's own size, taken as
the argmax of the logits upsampled bilinearly from the model's grid.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

TASK_STAGES = ("finetune", "linear", "full")
# An input whose aspect ratio is further than this from the model's square input is distorted by the resize; one
# far smaller than the input is mostly interpolation. Both are worth a warning.
MAX_ASPECT_CHANGE = 1.25
MAX_UPSCALE = 8.0


class PredictError(ValueError):
  """A user mistake (input, run folder); the CLI prints it without a traceback and exits 2."""


def check_task_run(run_dir):
  """The run's config, or one error if it has no task head (a `pretrain` / `tpp` run)."""
  from tpp_jax.checkpoints import restore
  cfg = restore.read_run_config(run_dir)
  if cfg.stage not in TASK_STAGES:
    raise PredictError(f"{run_dir} is a {cfg.stage!r} run: it has no task head to predict with. Use a "
                       f"{' / '.join(TASK_STAGES)} run, e.g. a pipeline's tpp_finetune arm or a fine-tune started "
                       f"with --config.target_init={run_dir}.")
  return cfg


def distortion(shape: tuple[int, ...], size: int) -> str | None:
  """Why resizing an (H, W, ...) image to size x size is more than a small change, or None."""
  h, w = int(shape[0]), int(shape[1])
  if max(h, w) / max(min(h, w), 1) > MAX_ASPECT_CHANGE:
    return f"{h}x{w} (HxW) is squashed to {size}x{size}"
  if size / max(min(h, w), 1) > MAX_UPSCALE:
    return f"{h}x{w} is enlarged {size / max(min(h, w), 1):.0f}x to {size}x{size}"
  return None


def upsample_argmax(logits: np.ndarray, height: int, width: int) -> np.ndarray:
  """(S, S, K) logits -> uint8 (height, width) class ids: each class's logits resized bilinearly, then argmax."""
  from PIL import Image
  k = logits.shape[-1]
  up = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(logits[..., c], np.float32), mode="F")
                            .resize((width, height), Image.BILINEAR)) for c in range(k)], axis=-1)
  return up.argmax(-1).astype(np.uint8)


class Predictor:
  """predictor = Predictor(RUN); predictor.predict([uint8 images]) -> [result per image] (see the module doc)."""

  def __init__(self, run_dir, checkpoint: str = "best", batch_size: int | None = None):
    import jax

    from tpp_jax import build as build_lib
    from tpp_jax.checkpoints import restore
    from tpp_jax.data import config as data_config
    from tpp_jax.data import transforms
    self.run_dir = pathlib.Path(run_dir).expanduser().absolute()
    check_task_run(self.run_dir)
    if batch_size is not None and batch_size <= 0:
      raise PredictError(f"--batch-size {batch_size} must be positive.")
    self.run = restore.load_run(self.run_dir, checkpoint)
    self.config = self.run.config
    self.task = self.config.task.type
    self.data = data_config.resolve(self.config.data)
    self.mesh = build_lib.make_mesh()
    n_dev = self.mesh.devices.size
    self.batch_size = math.ceil(int(batch_size or self.config.eval_batch_size) / n_dev) * n_dev
    self._global_batch = build_lib.global_batch
    self._fn = self._jit()
    self._params = jax.device_put((self.run.params, self.run.aux),
                                  jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    self._transform = transforms.make_transform(self.config.data, train=False)

  def _jit(self):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    obj = self.run.objective
    if self.task == "segmentation":
      def fn(params, aux, images):
        del aux
        return obj.logits(params, images, False).astype(jnp.float32)
    else:
      def fn(params, aux, images):
        return jax.nn.softmax(obj.logits(params, aux, images, False)[0].astype(jnp.float32), axis=-1)
    repl, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
    return jax.jit(fn, in_shardings=(repl, repl, data), out_shardings=data)

  def prepare(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 1|3) -> the model's input (the run's eval transform: resize + normalise)."""
    return self._transform({"image": image})["image"]

  def predict_prepared(self, prepared: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """At most batch_size prepared inputs (and the (H, W) of their images) -> one result each."""
    import jax
    x = np.stack(prepared)
    if len(x) < self.batch_size:  # pad the last batch by repeating its last image
      x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - len(x), axis=0)])
    batch = self._global_batch({"image": x}, self.mesh)["image"]
    res = np.asarray(jax.device_get(self._fn(*self._params, batch)))[:len(prepared)]
    if self.task != "segmentation":
      return list(res)
    return [upsample_argmax(r, s[0], s[1]) for r, s in zip(res, shapes)]

  def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 (H, W, 1|3) images -> one result each, in batches of batch_size."""
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      out += self.predict_prepared([self.prepare(im) for im in chunk], [im.shape[:2] for im in chunk])
    return out
