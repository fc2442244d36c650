"""grain pipelines: sharded shuffled training iterator, padded eval batches.

``build_sources(data_cfg)`` turns the ``data`` config block into one source per
split; its fields and defaults are ``tpp_jax.config.base_config().data``
(resolved by ``tpp_jax.data.config.resolve``).

Batches are dicts of numpy arrays: ``image`` float32 (B, S, S, C) and
``label`` int32 (B,) or ``mask`` int32 (B, S, S); eval batches add ``valid``
bool (B,).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import grain
import numpy as np

from tpp_jax.data import config as config_lib
from tpp_jax.data import sources as sources_lib

Record = dict[str, Any]
Transform = Callable[[Record, np.random.Generator], Record]

__all__ = ["train_iter", "eval_batches", "build_sources", "class_weights",
           "balanced_probabilities", "check_eval_splits"]


class _RandomMap(grain.transforms.RandomMap):
  """Wraps ``fn(record, rng)`` as a grain RandomMap (picklable if fn is)."""

  def __init__(self, fn: Transform):
    self.fn = fn

  def random_map(self, element, rng: np.random.Generator):
    return self.fn(element, rng)

  def __repr__(self) -> str:
    return f"RandomMap({self.fn!r})"


class _Lookup(grain.transforms.Map):
  """index -> source[index]."""

  def __init__(self, source):
    self.source = source

  def map(self, element):
    return self.source[int(element)]


class _WeightedIndex(grain.transforms.RandomMap):
  """Ignores the element; draws an index with probabilities given by cdf."""

  def __init__(self, cdf: np.ndarray):
    self.cdf = cdf

  def random_map(self, element, rng: np.random.Generator):
    del element
    i = int(np.searchsorted(self.cdf, rng.random() * self.cdf[-1],
                            side="right"))
    return min(i, len(self.cdf) - 1)


class _Subset:
  """Random-access view ``source[indices[i]]``, optional ``valid`` flags.

  Keeps the source's ``num_classes`` / ``class_names`` / ``task`` and the
  matching ``labels`` (class weights and balanced sampling read them).
  """

  def __init__(self, source, indices: np.ndarray, num_valid: int | None = None):
    self.source, self.indices, self.num_valid = source, np.asarray(indices), num_valid
    for a in ("num_classes", "class_names", "task"):
      if hasattr(source, a):
        setattr(self, a, getattr(source, a))
    if getattr(source, "labels", None) is not None:
      self.labels = np.asarray(source.labels)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def gather(self, i: np.ndarray) -> Record | None:
    """The source's ``gather`` of these view positions (None where it has none, or with ``valid`` flags)."""
    gather = getattr(self.source, "gather", None)
    if gather is None or self.num_valid is not None:
      return None
    return gather(self.indices[np.asarray(i)])

  def __getitem__(self, i: int) -> Record:
    rec = self.source[int(self.indices[i])]
    if self.num_valid is not None:
      rec = dict(rec)
      rec["valid"] = np.bool_(i < self.num_valid)
    return rec


def random_subset(source: Any, n: int) -> _Subset:
  """A fixed random subset of ``n`` examples (seed 0, the same for every run;
  quick runs keep the class balance), in source order."""
  n = min(int(n), len(source))
  return _Subset(source, np.sort(np.random.default_rng(0).permutation(len(source))[:n]))


def stratified_indices(labels: np.ndarray, fraction: float,
                       seed: int) -> np.ndarray:
  """Sorted indices of a stratified ``fraction`` of ``labels`` (see
  ``stratified_subset``)."""
  fraction = float(fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"data.label_fraction={fraction} must be in (0, 1] "
                     "(e.g. 0.05 for 5% of the training labels).")
  labels = np.asarray(labels, np.int64)
  classes, inverse = np.unique(labels, return_inverse=True)
  counts = np.bincount(inverse, minlength=len(classes))
  exact = fraction * counts
  take = np.floor(exact).astype(np.int64)
  # Largest remainder: the total is round(fraction * N), each class within 1
  # of its exact share; then at least one example per class.
  extra = int(math.floor(fraction * len(labels) + 0.5)) - int(take.sum())
  order = np.argsort(-(exact - take), kind="stable")
  take[order[:max(extra, 0)]] += 1
  take = np.maximum(take, 1)
  rng = np.random.default_rng(int(seed))
  # One permutation per class, drawn in class order whatever the fraction:
  # the subsets of one seed are nested (5% inside 20% inside 100%).
  picked = [rng.permutation(np.flatnonzero(inverse == k))[:take[k]]
            for k in range(len(classes))]
  return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def stratified_subset(source: Any, fraction: float, seed: int) -> _Subset:
  """A labelled ``fraction`` of ``source``, stratified by class, in source
  order: per class ``fraction`` of its examples (within 1, the total
  ``round(fraction * N)``) and at least one. The same (fraction, seed) gives
  the same examples; one seed's subsets are nested across fractions.
  Segmentation sources (no class labels) get a plain random fraction (at
  least one image)."""
  if getattr(source, "task", None) == sources_lib.SEGMENTATION:
    labels = np.zeros(len(source), np.int64)
  else:
    labels = sources_lib.source_labels(source)
  return _Subset(source, stratified_indices(labels, fraction, seed))


def _shard_indices(n: int, shard_index: int, shard_count: int) -> np.ndarray:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in "
                     f"[0, shard_count={shard_count}).")
  return np.arange(shard_index, n, shard_count)


def class_weights(source: Any, num_classes: int | None = None) -> np.ndarray:
  """Inverse-frequency class weights ``N / (K * n_c)``, float32 (K,).

  Their mean over the training examples is 1 (so a weighted loss keeps its
  scale); K counts the classes present. Absent classes get weight 0.
  """
  labels = sources_lib.source_labels(source)
  k = num_classes or getattr(source, "num_classes", None) or (
      int(labels.max()) + 1 if len(labels) else 0)
  counts = np.bincount(labels, minlength=k).astype(np.float64)
  present = counts > 0
  weights = np.zeros(len(counts), np.float64)
  weights[present] = len(labels) / (present.sum() * counts[present])
  return weights.astype(np.float32)


def balanced_probabilities(labels: np.ndarray) -> np.ndarray:
  """Per-example sampling probabilities that make every class equally likely."""
  labels = np.asarray(labels, np.int64)
  counts = np.bincount(labels)
  p = 1.0 / counts[labels]
  return p / p.sum()


class _EpochBatch(grain.transforms.MapWithIndex):
  """Batch ``index`` of an endless run of epochs, each a fresh seeded permutation of the shard cut into
  ``len // batch_size`` batches (drop remainder), read by one ``gather`` of the shard (``batch_gather``)."""

  def __init__(self, shard: _Subset, batch_size: int, seed: int):
    self.shard, self.batch_size, self.seed = shard, batch_size, seed
    self.per_epoch = len(shard) // batch_size
    self._perm: tuple[int, np.ndarray] | None = None

  def map_with_index(self, index: int, element):
    epoch, j = divmod(int(index), self.per_epoch)
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.shard)))
    return self.shard.gather(self._perm[1][j * self.batch_size:(j + 1) * self.batch_size])

  def __repr__(self) -> str:
    return f"_EpochBatch(batch_size={self.batch_size}, seed={self.seed})"


def batch_gather(shard: _Subset, transform: Transform) -> bool:
  """True when whole batches can be read with one fancy index of the cached split: the transform is the training
  transform with data.augment.on_device (no host randomness; uint8 out) and is the identity on the split's records
  (already image_size x image_size x channels, decoded into memory with one shape, class labels), so a gathered
  batch is what per-example reads and grain's batching would stack. grain's per-example work (shuffle, read,
  transform, batch: ~95 us an image in one process) is then one gather per batch."""
  aug = getattr(transform, "augment", None)
  if not (getattr(transform, "train", False) and getattr(aug, "on_device", False)):
    return False
  probe = shard.gather(np.arange(1))
  if probe is None:
    return False
  record = {"image": probe["image"][0], "label": probe["label"][0]}
  out = transform(record, np.random.default_rng(0))
  return (set(out) == {"image", "label"} and out["image"].dtype == np.uint8
          and out["image"].shape == record["image"].shape and np.array_equal(out["image"], record["image"]))


def train_iter(source: Any, transform: Transform, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1,
               balance: bool = False, prefetch: int = 2,
               num_threads: int = 1,
               num_workers: int = 0) -> grain.DatasetIterator:
  """Endless shuffled, augmented, batched training iterator (grain).

  Pipeline: source -> this host's shard ``[shard_index::shard_count]`` ->
  seeded shuffle (a new order each epoch) -> repeat forever -> random_map
  (``transform(record, rng)``, a per-example rng derived from seed and
  position) -> batch (drop remainder) -> in-process prefetch. With
  ``balance=True`` each example is instead drawn i.i.d. from the shard with
  probability inversely proportional to its class frequency (deterministic
  given the seed). Where ``batch_gather`` holds (data.augment.on_device with
  a split cached in memory), each batch is instead one gather of a seeded
  per-epoch permutation, read in-process whatever ``num_workers``.

  Args:
    source: random-access source (``__len__`` / ``__getitem__``).
    transform: ``fn(record, rng) -> record`` (e.g. ``make_transform``).
    batch_size: per-host batch size.
    seed: pipeline seed (order, sampling and augmentation).
    shard_index: this host's index (``jax.process_index()``).
    shard_count: number of hosts (``jax.process_count()``).
    balance: class-balanced sampling (classification sources only).
    prefetch: batches read ahead by the background thread.
    num_threads: reader threads (1 is fastest on small CPUs).
    num_workers: > 0 adds grain multiprocessing prefetch with that many
      spawned workers (needs a ``__main__`` guard and parsed absl flags; the
      source and transform must be picklable, as ours are).

  Returns:
    A ``grain.DatasetIterator`` of batch dicts; ``get_state()`` /
    ``set_state()`` resume exactly.
  """
  indices = _shard_indices(len(source), shard_index, shard_count)
  if len(indices) < batch_size:
    raise ValueError(
        f"shard {shard_index}/{shard_count} has {len(indices)} examples, fewer "
        f"than batch_size={batch_size}; lower batch_size.")
  shard = _Subset(source, indices)
  if not balance and batch_gather(shard, transform):
    ds = (grain.MapDataset.range(len(shard) // batch_size).repeat(None)
          .map_with_index(_EpochBatch(shard, batch_size, seed)))
    # in-process: a batch is one memory copy, which worker processes would only add a hand-over to
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
  if balance:
    labels = sources_lib.source_labels(source)[indices]
    cdf = np.cumsum(balanced_probabilities(labels))
    ds = (grain.MapDataset.range(len(shard)).seed(seed).repeat(None)
          .random_map(_WeightedIndex(cdf)).map(_Lookup(shard)))
  else:
    ds = grain.MapDataset.source(shard).seed(seed).shuffle().repeat(None)
  ds = ds.random_map(_RandomMap(transform))
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def resolve_workers(workers: str | int) -> int:
  """``data.workers`` -> a process count: 'auto' = cores - 2 (at most 16; 0 below 4 cores), else int >= 0."""
  import os
  text = str(workers).strip().lower()
  if text == "auto":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 4 else min(cores - 2, 16)
  try:
    n = int(text)
  except ValueError:
    n = -1
  if n < 0:
    raise ValueError(f"data.workers={workers!r}: use 'auto', '0' (read in-process) or a number of processes.")
  return n


def num_eval_batches(n: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches every shard yields in ``eval_batches`` (equal across shards)."""
  return max(1, math.ceil(math.ceil(n / shard_count) / batch_size))


def eval_batches(source: Any, transform: Transform, batch_size: int,
                 shard_index: int = 0, shard_count: int = 1,
                 prefetch: int = 2) -> Iterator[Record]:
  """Deterministic batches over this shard of the whole split, in order.

  Every batch has exactly ``batch_size`` rows; the tail is padded by
  repeating the last example and ``valid`` (bool (B,)) marks real rows. All
  shards yield the same number of batches (``num_eval_batches``) so hosts
  stay in lock-step. ``transform`` is called with ``rng=None``.
  """
  n = len(source)
  if n == 0:
    raise ValueError("eval_batches: the source is empty.")
  indices = _shard_indices(n, shard_index, shard_count)
  total = num_eval_batches(n, batch_size, shard_count) * batch_size
  last = indices[-1] if len(indices) else n - 1
  padded = np.concatenate(
      [indices, np.full(total - len(indices), last, indices.dtype)])
  view = _Subset(source, padded, num_valid=len(indices))
  ds = (grain.MapDataset.source(view)
        .map(lambda rec: transform(rec, None))
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset(grain.ReadOptions(num_threads=1,
                                           prefetch_buffer_size=prefetch)))
  yield from ds


def check_eval_splits(sources: dict[str, Any], eval_splits: Any, where: str,
                      needs_eval: bool) -> list[str]:
  """Warning lines for the ``eval_splits`` that ``sources`` lacks.

  Args:
    sources: ``{split: source}`` (e.g. from ``build_sources``).
    eval_splits: the ``eval_splits`` config field (a tuple, or 'val,test').
    where: names the data in messages (e.g. 'data.path=/x.npz').
    needs_eval: the run reports final metrics, so at least one split must be
      there.

  Returns:
    One ``warning: ...`` line per missing split (empty when all are there).

  Raises:
    ValueError: none of ``eval_splits`` is in the data and ``needs_eval``.
  """
  if isinstance(eval_splits, str):
    eval_splits = [s.strip() for s in eval_splits.split(",") if s.strip()]
  wanted = list(dict.fromkeys(str(s) for s in eval_splits or ()))
  missing = [s for s in wanted if s not in sources]
  if needs_eval and wanted and len(missing) == len(wanted):
    have = sorted(sources)
    held_out = [s for s in have if s != "train"]
    fix = (f'--config.eval_splits="{tuple(held_out)!r}"'
           if held_out else '--config.eval_splits="()" (no final metrics)')
    raise ValueError(
        f'{where} has none of eval_splits={wanted} (its splits: {have}), so '
        'the final metrics would be empty. Add a '
        f'{" / ".join(repr(s) for s in wanted)} split to the data or set '
        f'{fix}.')
  return [f"warning: {where} has no {s!r} split; eval_splits asks for it, so "
          "final metrics skip it" for s in missing]


def _tfds_splits(cfg: config_lib.DataConfig) -> dict[str, str]:
  if cfg.tfds_splits:
    return dict(cfg.tfds_splits)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir,
                           file_format="array_record")
    names = list(builder.info.splits.keys())
  except Exception:  # pylint: disable=broad-except
    names = ["train"]  # TfdsSource raises the clear error.
  return {("val" if s == "validation" else s): s for s in names}


def build_sources(data_cfg: Any, num_classes: int | None = None
                  ) -> dict[str, Any]:
  """One source per split found in the data, keyed 'train' / 'val' / 'test'.

  Args:
    data_cfg: the ``data`` config block (ConfigDict or dict).
    num_classes: ``task.num_classes`` if known; labels / mask values outside
      ``[0, num_classes)`` raise a clear error.

  Returns:
    dict split -> source.
  """
  cfg = config_lib.resolve(data_cfg)
  kind = cfg.source

  def cache(split: str) -> str:
    """'auto' is 'off' for a split the run cuts to data.max_*_examples."""
    limit = (cfg.max_train_examples if split == "train"
             else cfg.max_eval_examples)
    return "off" if cfg.cache == "auto" and limit else cfg.cache

  if kind == "npz":
    p = sources_lib.check_path(
        cfg.path, "data.path", "a MedMNIST-style .npz file")
    if p.is_dir():
      raise ValueError(f"data.path: {p} is a folder; data.source=npz needs a "
                       ".npz file.")
    with sources_lib.open_npz(p, "data.path") as npz:
      keys = set(npz.files)
    if num_classes is not None:  # a labelled stage: images without their labels name the missing key
      sources_lib.check_npz_labels(keys, "train", p, "data.path")
    splits = [s for s in ("train", "val", "test")
              if f"{s}_images" in keys and f"{s}_labels" in keys]
    if not splits:
      raise ValueError(f"data.path: {p} has no {{split}}_images / "
                       f"{{split}}_labels pairs (keys: {sorted(keys)}).")
    return {s: sources_lib.NpzSource(p, s, num_classes=num_classes,
                                     cache=cache(s))
            for s in splits}
  if kind == "seg_folder":
    root = sources_lib.check_path(
        cfg.path, "data.path", "a folder with images/, masks/ and split.csv")
    csv_path = root / "split.csv"
    if not csv_path.exists():
      raise FileNotFoundError(f"data.path: {csv_path} not found; "
                              "data.source=seg_folder needs split.csv.")
    import csv  # pylint: disable=g-import-not-at-top
    with open(csv_path, newline="") as f:
      found = {r.get("split") for r in csv.DictReader(f)}
    splits = [s for s in ("train", "val", "test") if s in found] + sorted(
        s for s in found if s and s not in ("train", "val", "test"))
    return {s: sources_lib.SegFolderSource(root, s, num_classes=num_classes, cache=cache(s), window=cfg.window,
                                           slice_axis=cfg.slice_axis, skip_empty_slices=cfg.skip_empty_slices)
            for s in splits}
  if kind == "class_folder":
    root = sources_lib.check_path(
        cfg.path, "data.path", "a folder root/<split>/<class_name>/*.png")
    found = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and not d.name.startswith("."))
    mapping = {("val" if s == "validation" else s): s for s in found}
    return {k: sources_lib.ClassFolderSource(root, s, num_classes=num_classes, cache=cache(k), window=cfg.window)
            for k, s in mapping.items()}
  if kind == "tfds":
    return {k: sources_lib.TfdsSource(
        cfg.tfds_name, s, data_dir=cfg.tfds_data_dir,
        image_key=cfg.tfds_image_key, label_key=cfg.tfds_label_key,
        mask_key=cfg.tfds_mask_key, num_classes=num_classes)
            for k, s in _tfds_splits(cfg).items()}
  if kind == "jpeg_npz":
    return {s: sources_lib.JpegNpzSource(cfg.path, s, val_count=cfg.val_count,
                                         cache=cache(s))
            for s in ("train", "val")}
  raise ValueError(f"data.source={kind!r} is not one of "
                   f"{list(config_lib.SOURCES)}.")
