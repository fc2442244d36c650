"""The ``data`` config block: defaults, lookup and validation.

Fields (all optional except ``path`` / ``tfds_name``; missing or None fields
take the defaults below):

* ``source`` ('npz'): one of 'npz', 'seg_folder', 'class_folder', 'tfds',
  'jpeg_npz' (see ``tpp_jax.data.sources``).
* ``path`` (''): the .npz file or data folder (not used by 'tfds').
* ``image_size`` (224): side S of the square model input.
* ``channels`` (3): 1 (grey) or 3 (RGB) model input channels.
* ``mean`` / ``std`` (0.5 per channel): normalisation ``(x/255 - mean)/std``;
  a scalar, a 1-list (broadcast) or one value per channel.
* ``augment``: ``crop_scale`` ((lo, hi) area fractions for random-resized-crop,
  or None = plain resize), ``crop_ratio`` ((3/4, 4/3)), ``hflip`` (False),
  ``vflip`` (False), ``rotate`` (0.0, max degrees), ``intensity`` (0.0,
  brightness/contrast jitter strength).
* ``balance`` (False): class-balanced sampling of the training split.
* ``tfds_name`` (''), ``tfds_data_dir`` (None), ``tfds_image_key``
  ('image'), ``tfds_label_key`` ('label'), ``tfds_mask_key`` ('mask'),
  ``tfds_splits`` (None = the dataset's splits, 'validation' -> 'val'; or a
  dict like {'train': 'train[:90%]', 'val': 'train[90%:]'}).
* ``val_count`` (1000): 'jpeg_npz' validation images (the last ones).
* ``prefetch`` (2): batches prefetched by the training iterator.
* ``cache`` ('auto'): keep each split's decoded uint8 images in memory
  ('on' | 'off' | 'auto' = on when the decoded split fits ``CACHE_BUDGET``,
  2 GiB, and the run reads the whole split, i.e. no ``max_*_examples``); see
  ``tpp_jax.data.sources.ImageStore``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

SOURCES = ('npz', 'seg_folder', 'class_folder', 'tfds', 'jpeg_npz')
CACHE_MODES = ('auto', 'on', 'off')
CACHE_BUDGET = 2 << 30  # bytes of decoded images per split that 'auto' caches

AUGMENT_DEFAULTS = dict(crop_scale=None, crop_ratio=(3 / 4, 4 / 3),
                        hflip=False, vflip=False, rotate=0.0, intensity=0.0)
DEFAULTS = dict(source='npz', path='', image_size=224, channels=3, mean=None,
                std=None, augment=AUGMENT_DEFAULTS, balance=False,
                tfds_name='', tfds_data_dir=None, tfds_image_key='image',
                tfds_label_key='label', tfds_mask_key='mask',
                tfds_splits=None, val_count=1000, prefetch=2, cache='auto')


def lookup(cfg: Any, name: str, default: Any = None) -> Any:
  """``cfg.a.b`` of a ConfigDict / dict / object; None or missing -> default."""
  node = cfg
  for key in name.split('.'):
    if node is None:
      return default
    if isinstance(node, Mapping):
      node = node.get(key)
    elif callable(getattr(node, 'get', None)):  # ConfigDict
      node = node.get(key, None)
    else:
      node = getattr(node, key, None)
  return default if node is None else node


@dataclasses.dataclass(frozen=True)
class Augment:
  crop_scale: tuple[float, float] | None = None
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = False
  vflip: bool = False
  rotate: float = 0.0
  intensity: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Resolved and validated ``data`` config."""
  source: str = 'npz'
  path: str = ''
  image_size: int = 224
  channels: int = 3
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)
  augment: Augment = Augment()
  balance: bool = False
  tfds_name: str = ''
  tfds_data_dir: str | None = None
  tfds_image_key: str = 'image'
  tfds_label_key: str = 'label'
  tfds_mask_key: str = 'mask'
  tfds_splits: Mapping[str, str] | None = None
  val_count: int = 1000
  prefetch: int = 2
  cache: str = 'auto'


def _per_channel(value: Any, channels: int, field: str) -> tuple[float, ...]:
  if value is None:
    return (0.5,) * channels
  if isinstance(value, (int, float)):
    values = [float(value)]
  else:
    values = [float(v) for v in value]
  if len(values) == 1:
    values = values * channels
  if len(values) != channels:
    raise ValueError(f'data.{field}={list(value)} has {len(values)} values but '
                     f'data.channels={channels}; give 1 or {channels} values.')
  return tuple(values)


def _pair(value: Any, field: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{field}={value!r} must be a pair (lo, hi).') from e
  return lo, hi


def check_cache(value: Any) -> str:
  """``data.cache`` -> 'auto' | 'on' | 'off'; anything else raises one ValueError."""
  text = value.strip().lower() if isinstance(value, str) else None
  if text not in CACHE_MODES:
    raise ValueError(
        f"data.cache={value!r}: use 'auto' (decode a split into memory when it "
        f"fits {CACHE_BUDGET / 2**30:g} GiB), 'on' or 'off' "
        "(e.g. --config.data.cache=off).")
  return text


def resolve(data_cfg: Any) -> DataConfig:
  """Fills defaults into ``data_cfg`` (ConfigDict / dict / None); validates."""
  if isinstance(data_cfg, DataConfig):
    return data_cfg
  def get(name):
    return lookup(data_cfg, name, lookup(DEFAULTS, name))

  source = str(get('source'))
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is not one of {list(SOURCES)}.')
  size = get('image_size')
  if isinstance(size, (tuple, list)):
    if len(size) != 2 or size[0] != size[1]:
      raise ValueError(f'data.image_size={size!r}: only square inputs are '
                       'supported; give one int.')
    size = size[0]
  size = int(size)
  if size <= 0:
    raise ValueError(f'data.image_size={size} must be positive.')
  channels = int(get('channels'))
  if channels not in (1, 3):
    raise ValueError(f'data.channels={channels} must be 1 or 3.')
  mean = _per_channel(get('mean'), channels, 'mean')
  std = _per_channel(get('std'), channels, 'std')
  if min(std) <= 0:
    raise ValueError(f'data.std={list(std)} must be positive.')
  crop_scale = get('augment.crop_scale')
  if crop_scale is not None:
    crop_scale = _pair(crop_scale, 'data.augment.crop_scale')
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
      raise ValueError(f'data.augment.crop_scale={crop_scale} must satisfy '
                       '0 < lo <= hi <= 1 (fractions of the image area).')
  crop_ratio = _pair(get('augment.crop_ratio'), 'data.augment.crop_ratio')
  if not 0 < crop_ratio[0] <= crop_ratio[1]:
    raise ValueError(f'data.augment.crop_ratio={crop_ratio} must satisfy '
                     '0 < lo <= hi.')
  rotate = float(get('augment.rotate'))
  intensity = float(get('augment.intensity'))
  if rotate < 0 or intensity < 0 or intensity >= 1:
    raise ValueError('data.augment.rotate must be >= 0 degrees and '
                     'data.augment.intensity in [0, 1); got '
                     f'{rotate}, {intensity}.')
  augment = Augment(crop_scale=crop_scale, crop_ratio=crop_ratio,
                    hflip=bool(get('augment.hflip')),
                    vflip=bool(get('augment.vflip')),
                    rotate=rotate, intensity=intensity)
  splits = get('tfds_splits')
  if splits is not None:
    splits = dict(splits.items() if hasattr(splits, 'items') else splits)
  data_dir = get('tfds_data_dir')
  return DataConfig(
      source=source, path=str(get('path') or ''), image_size=size,
      channels=channels, mean=mean, std=std, augment=augment,
      balance=bool(get('balance')), tfds_name=str(get('tfds_name') or ''),
      tfds_data_dir=str(data_dir) if data_dir else None,
      tfds_image_key=str(get('tfds_image_key')),
      tfds_label_key=str(get('tfds_label_key')),
      tfds_mask_key=str(get('tfds_mask_key')),
      tfds_splits=splits, val_count=int(get('val_count')),
      prefetch=max(1, int(get('prefetch'))),
      cache=check_cache(get('cache')))


def default_config(**overrides: Any):
  """A ``ml_collections.ConfigDict`` with every data field and its default.

  Fields whose default is None are ``FieldReference``s so that they can be set
  from the command line (``--config.data.augment.crop_scale=(0.5,1.0)``).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  fr = ml_collections.FieldReference
  cfg = ml_collections.ConfigDict(dict(
      source='npz', path='', image_size=224, channels=3,
      mean=fr(None, field_type=Sequence), std=fr(None, field_type=Sequence),
      augment=dict(crop_scale=fr(None, field_type=tuple),
                   crop_ratio=(3 / 4, 4 / 3), hflip=False, vflip=False,
                   rotate=0.0, intensity=0.0),
      balance=False, tfds_name='', tfds_data_dir=fr(None, field_type=str),
      tfds_image_key='image', tfds_label_key='label', tfds_mask_key='mask',
      tfds_splits=fr(None, field_type=dict), val_count=1000, prefetch=2,
      cache='auto'))
  cfg.update(overrides)
  return cfg
