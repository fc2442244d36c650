"""Input data: sources, numpy transforms and grain pipelines."""
from tpp_jax.data.config import DataConfig, resolve
from tpp_jax.data.pipeline import (
                                   balanced_probabilities,
                                   build_sources,
                                   class_weights,
                                   eval_batches,
                                   num_eval_batches,
                                   train_iter,
)
from tpp_jax.data.sources import ClassFolderSource, JpegNpzSource, NpzSource, SegFolderSource, TfdsSource, source_labels
from tpp_jax.data.transforms import RecordTransform, make_transform
