"""tpp_jax/figures.py: which figure files count as drawn (a rerun redraws the others)."""
import io

import numpy as np
from PIL import Image

from tpp_jax import figures


def test_readable_png_accepts_a_whole_png_only(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buf, format="PNG")
  whole = buf.getvalue()
  (tmp_path / "ok.png").write_bytes(whole)
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "torn.png").write_bytes(whole[: len(whole) // 2])
  (tmp_path / "text.png").write_text("not a png")
  assert figures.readable_png(tmp_path / "ok.png")
  for name in ("empty.png", "torn.png", "text.png", "missing.png"):
    assert not figures.readable_png(tmp_path / name), name
