"""Builds demo_cxr_64.npz from the shared pneumonia_cxr_128 set (run from the repository root).

  python tpp_jax/assets/demo_cxr_64/build.py ../shared/data/pneumonia_cxr_128/pneumonia_cxr_128.npz

A fixed random subset (numpy default_rng(0)) of each split, bicubic-resized 128 -> 64 px, uint8 grey,
MedMNIST layout ({split}_images (N,64,64), {split}_labels (N,1)).
"""
import sys

import numpy as np
from PIL import Image

COUNTS = {"train": 1600, "val": 400, "test": 624}


def main(src, dst="tpp_jax/assets/demo_cxr_64/demo_cxr_64.npz"):
  d = np.load(src)
  rng = np.random.default_rng(0)
  out = {}
  for split, n in COUNTS.items():
    x, y = d[f"{split}_images"], d[f"{split}_labels"]
    idx = np.sort(rng.permutation(len(x))[:n])
    out[f"{split}_images"] = np.stack([np.asarray(Image.fromarray(im).resize((64, 64), Image.BICUBIC))
                                       for im in x[idx]]).astype(np.uint8)
    out[f"{split}_labels"] = y[idx].astype(np.uint8).reshape(-1, 1)
    print(split, out[f"{split}_images"].shape, np.bincount(out[f"{split}_labels"][:, 0]))
  np.savez_compressed(dst, **out)


if __name__ == "__main__":
  main(*sys.argv[1:])
