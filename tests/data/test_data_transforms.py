"""Tests for tpp_jax.data.transforms (joint geometry, normalisation)."""
import numpy as np
import pytest

from tpp_jax.data import config, transforms


def _blocky_pair(seed, size=64, cells=8):
  """A random blocky mask and a grey image encoding it (1 -> 230, 0 -> 20)."""
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, 2, (cells, cells)).astype(np.uint8)
  mask = np.kron(mask, np.ones((size // cells, size // cells), np.uint8))
  image = np.where(mask == 1, 230, 20).astype(np.uint8)[..., None]
  return {"image": image, "mask": mask}


# A partial block takes base_config's augment (crop + hflip): start from none.
NO_AUG = dict(crop_scale=None, hflip=False, vflip=False, rotate=0.0,
              intensity=0.0)


def _cfg(**augment):
  return {"image_size": 48, "channels": 1, "mean": 0.0, "std": 1.0,
          "augment": dict(NO_AUG, **augment)}


def _disagreement(out):
  """(fraction of pixels, pixels away from mask edges) where image != mask."""
  # Image value > 0.5 (after /255) <=> mask 1; rotation fills both with 0.
  m = out["mask"]
  dis = (out["image"][..., 0] > 0.5) != (m == 1)
  p = np.pad(m, 1, mode="edge")
  c = p[1:-1, 1:-1]
  edge = ((c != p[:-2, 1:-1]) | (c != p[2:, 1:-1]) | (c != p[1:-1, :-2]) |
          (c != p[1:-1, 2:]))
  return dis.mean(), int((dis & ~edge).sum())


@pytest.mark.parametrize("augment", [
    dict(hflip=True), dict(vflip=True), dict(crop_scale=(0.3, 0.6)),
    dict(rotate=30.0),
    dict(crop_scale=(0.2, 1.0), hflip=True, vflip=True, rotate=20.0)])
def test_joint_geometry_keeps_mask_aligned(augment):
  fn = transforms.make_transform(_cfg(**augment), train=True)
  for seed in range(6):
    rec = _blocky_pair(seed)
    out = fn(rec, np.random.default_rng(seed))
    assert out["image"].shape == (48, 48, 1)
    assert out["image"].dtype == np.float32
    assert out["mask"].shape == (48, 48) and out["mask"].dtype == np.int32
    # Bilinear vs nearest may differ only on the mask's edges.
    frac, off_edge = _disagreement(out)
    assert frac < 0.05 and off_edge == 0, (augment, seed, frac, off_edge)
    assert 0 < out["mask"].mean() < 1


def test_flip_is_exact_and_joint():
  rec = _blocky_pair(0, size=48)
  rec["image"] = rec["image"] + np.arange(48, dtype=np.uint8)[None, :, None]
  fn = transforms.make_transform(_cfg(hflip=True, vflip=True), train=True)
  ref = transforms.make_transform(_cfg(), train=False)(rec)
  seen = set()
  for seed in range(16):
    out = fn(rec, np.random.default_rng(seed))
    for h in (False, True):
      for v in (False, True):
        def flip(x, h=h, v=v):
          return x[::-1 if v else 1, ::-1 if h else 1]
        if (np.array_equal(out["image"], flip(ref["image"])) and
            np.array_equal(out["mask"], flip(ref["mask"]))):
          seen.add((h, v))
  assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_crop_box_within_bounds_and_scale():
  rng = np.random.default_rng(0)
  for _ in range(200):
    l, t, r, b = transforms.crop_box(rng, 60, 80, (0.2, 0.5))
    assert 0 <= l < r <= 80 and 0 <= t < b <= 60
    assert 0.15 <= (r - l) * (b - t) / (60 * 80) <= 0.55
  # Impossible ratio -> central fallback, still inside the image.
  l, t, r, b = transforms.crop_box(rng, 10, 100, (0.9, 1.0), (1.0, 1.0))
  assert (l, t, r, b) == (45, 0, 55, 10)


def test_channels_grey_to_rgb_and_back():
  grey = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
  rgb = transforms.to_channels(grey, 3)
  assert rgb.shape == (4, 4, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  np.testing.assert_array_equal(transforms.to_channels(rgb, 1), grey)
  pix = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
  luma = transforms.to_channels(pix, 1)[0, :, 0]
  np.testing.assert_array_equal(luma, [76, 150, 29])  # ITU-R 601
  fn = transforms.make_transform({"image_size": 4, "channels": 3}, train=False)
  out = fn({"image": grey, "label": np.uint8(1)})
  assert out["image"].shape == (4, 4, 3) and out["label"].dtype == np.int32
  np.testing.assert_allclose(out["image"][..., 1], grey[..., 0] / 127.5 - 1,
                             atol=1e-6)


def test_normalisation_values():
  image = np.zeros((2, 2, 3), np.uint8)
  image[0] = 255
  cfg = {"image_size": 2, "channels": 3, "mean": [0.5, 0.4, 0.3],
         "std": [0.5, 0.2, 0.1]}
  out = transforms.make_transform(cfg, train=False)({"image": image,
                                                     "label": 0})["image"]
  np.testing.assert_allclose(out[0, 0], [1.0, 3.0, 7.0], rtol=1e-6)
  np.testing.assert_allclose(out[1, 1], [-1.0, -2.0, -3.0], rtol=1e-6)
  # Defaults: mean = std = 0.5 -> [-1, 1].
  out = transforms.make_transform({"image_size": 2}, False)({"image": image})
  np.testing.assert_allclose(out["image"][0], 1.0)
  np.testing.assert_allclose(out["image"][1], -1.0)
  with pytest.raises(ValueError, match="data.mean"):
    config.resolve({"channels": 3, "mean": [0.1, 0.2]})
  with pytest.raises(ValueError, match="data.augment.crop_scale"):
    config.resolve({"augment": {"crop_scale": (0.5, 2.0)}})


def test_determinism_and_eval():
  rng = np.random.default_rng(1)
  rec = {"image": rng.integers(0, 256, (40, 30, 3), dtype=np.uint8),
         "mask": rng.integers(0, 3, (40, 30)).astype(np.uint8)}
  cfg = {"image_size": 32, "channels": 3,
         "augment": dict(crop_scale=(0.3, 1.0), hflip=True, vflip=True,
                         rotate=15.0, intensity=0.3)}
  fn = transforms.make_transform(cfg, train=True)
  a = fn(rec, np.random.default_rng(7))
  b = fn(rec, np.random.default_rng(7))
  c = fn(rec, np.random.default_rng(8))
  for k in ("image", "mask"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (32, 32, 3) and a["mask"].shape == (32, 32)
  assert set(np.unique(a["mask"])) <= {0, 1, 2}
  ev = transforms.make_transform(cfg, train=False)
  e1, e2 = ev(rec), ev(rec, np.random.default_rng(3))
  np.testing.assert_array_equal(e1["image"], e2["image"])
  np.testing.assert_array_equal(
      e1["mask"], transforms.resize(rec, 32)["mask"].astype(np.int32))
  # Inputs are not modified (sources may hand out cached arrays).
  rec["image"].setflags(write=False)
  fn(rec, np.random.default_rng(0))


def test_intensity_jitter_range():
  rng = np.random.default_rng(0)
  x = np.full((8, 8, 1), 100, np.uint8)
  x[0] = 200
  for _ in range(20):
    y = transforms.intensity_jitter(x, rng, 0.4)
    assert y.dtype == np.float32 and 0 <= y.min() and y.max() <= 255
  np.testing.assert_array_equal(transforms.intensity_jitter(x, rng, 0.0), x)


@pytest.mark.parametrize("cfg", [
    # the demo (configs/default.py) and stage-0 (configs/house_backbone.py) training transforms
    {"image_size": 64, "channels": 3, "mean": (0.485, 0.456, 0.406),
     "std": (0.229, 0.224, 0.225),
     "augment": dict(crop_scale=(0.8, 1.0), hflip=False)},
    {"image_size": 64, "channels": 3, "mean": (0.485, 0.456, 0.406),
     "std": (0.229, 0.224, 0.225),
     "augment": dict(crop_scale=(0.35, 1.0), hflip=True)},
    {"image_size": 32, "channels": 1, "augment": dict(
        crop_scale=(0.3, 1.0), hflip=True, vflip=True, rotate=15.0,
        intensity=0.3)},
    {"image_size": 40, "channels": 3,
     "augment": dict(crop_scale=None, hflip=True, vflip=True)},
    {"image_size": 24, "channels": 3},  # base_config's augment
])
def test_transform_is_bit_identical_to_the_chained_steps(cfg):
  """The fused fast path = random_resized_crop / resize, hflip, vflip, rotate,
  to_channels, intensity_jitter, normalize applied one after the other."""
  c = config.resolve(cfg)
  aug, size = c.augment, c.image_size
  fn = transforms.make_transform(cfg, train=True)
  ev = transforms.make_transform(cfg, train=False)
  data = np.random.default_rng(0)
  for seed in range(24):
    shape = [(64, 64, 1), (64, 64, 3), (40, 40, 3), (37, 53, 3)][seed % 4]
    rec = {"image": data.integers(0, 256, shape, dtype=np.uint8), "label": 1}
    if seed % 2:
      rec["mask"] = data.integers(0, 3, shape[:2]).astype(np.uint8)
    rng = np.random.default_rng(seed)
    ref = (transforms.random_resized_crop(rec, rng, size, aug.crop_scale,
                                          aug.crop_ratio)
           if aug.crop_scale else transforms.resize(rec, size))
    ref = transforms.hflip(ref, rng) if aug.hflip else ref
    ref = transforms.vflip(ref, rng) if aug.vflip else ref
    ref = transforms.rotate(ref, rng, aug.rotate)
    image = transforms.to_channels(ref["image"], c.channels)
    if aug.intensity:
      image = transforms.intensity_jitter(image, rng, aug.intensity)
    image = transforms.normalize(image, c.mean, c.std)
    out = fn(rec, np.random.default_rng(seed))
    assert out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["image"], image)
    if "mask" in rec:
      np.testing.assert_array_equal(out["mask"], ref["mask"].astype(np.int32))
    plain = transforms.normalize(transforms.to_channels(
        transforms.resize(rec, size)["image"], c.channels), c.mean, c.std)
    np.testing.assert_array_equal(ev(rec)["image"], plain)
