"""DICOM, 16-bit / float PNG and TIFF, and NIfTI volumes: read with pydicom / PIL / nibabel from the real scanner
files those libraries ship (pydicom's CT_small / MR_small in several transfer syntaxes, nibabel's anatomical.nii),
windowed by one rule (tpp_jax.data.medical), checked against pydicom's DICOM-standard windowing; then trained,
predicted and read back through the CLIs and the Python API."""
import csv
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from tpp_jax import predict
from tpp_jax.data import decode, sources

from conftest import run_cli

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_windowing  # noqa: E402

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
CT = ["CT_small.dcm", "693_J2KI.dcm"]  # CT, explicit VR little endian and JPEG 2000 (Hounsfield units by rescale)
MR = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"]


def _dicom(name):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pydicom warns about its deliberately odd test files
    return get_testdata_file(name)


def _mr_pixels():
  return pydicom.dcmread(_dicom("MR_small.dcm")).pixel_array


# -- the window rule against pydicom -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_a_dicom_files_own_window_matches_pydicoms_standard_windowing(name):
  ds = pydicom.dcmread(_dicom(name))
  ours = decode.read_image(_dicom(name))
  theirs = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)  # PS3.3 C.11.2.1.2, to the dtype's range
  lo, hi = (-(2 ** 15), 2 ** 15 - 1) if ds.PixelRepresentation else (0, 2 ** 16 - 1)
  expected = np.round((theirs - lo) / (hi - lo) * 255)
  assert ours.shape == (64, 64, 1) and ours.dtype == np.uint8
  assert np.abs(ours[..., 0].astype(int) - expected).max() <= 1  # the standard's (w - 1) and 0.5 offsets


def test_ct_values_are_rescaled_to_hounsfield_units_before_a_configured_window():
  ds = pydicom.dcmread(_dicom("CT_small.dcm"))
  hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  ours = decode.read_image(_dicom("CT_small.dcm"), window=(40, 400))  # soft tissue: -160..240 HU
  expected = np.round(np.clip((hu + 160) / 400, 0, 1) * 255)
  np.testing.assert_array_equal(ours[..., 0], expected)
  # without a window in the file or the config: the image's own min..max
  np.testing.assert_array_equal(decode.read_image(_dicom("CT_small.dcm"))[..., 0],
                                np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255))


def test_monochrome1_is_inverted(tmp_path):
  ds = pydicom.dcmread(_dicom("MR_small.dcm"))
  ds.PhotometricInterpretation = "MONOCHROME1"
  ds.save_as(tmp_path / "m1.dcm")
  np.testing.assert_array_equal(decode.read_image(tmp_path / "m1.dcm"), 255 - decode.read_image(_dicom("MR_small.dcm")))


def test_16_bit_png_and_float_tiff_are_read_at_full_depth(tmp_path):
  px = _mr_pixels().astype(np.uint16)
  Image.fromarray(px).save(tmp_path / "a.png")
  Image.fromarray(px.astype(np.float32) / 7).save(tmp_path / "a.tif")
  expected = np.round((px.astype(float) - px.min()) / (px.max() - px.min()) * 255)
  assert len(np.unique(px)) > 256  # more levels than 8 bits hold: a truncating reader would lose them
  for f in ("a.png", "a.tif"):
    got = decode.read_image(tmp_path / f)
    assert got.shape == (64, 64, 1) and got.dtype == np.uint8
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1, f
  windowed = decode.read_image(tmp_path / "a.png", window=(1000, 800))
  np.testing.assert_array_equal(windowed[..., 0], np.round(np.clip((px.astype(float) - 600) / 800, 0, 1) * 255))


# -- bad files: one line naming the file and the fix ------------------------------------------------

def test_bad_dicom_files_are_one_clear_error():
  with pytest.raises(ValueError, match=r"rtplan\.dcm holds no image \(no pixel data; modality RTPLAN"):
    decode.read_image(_dicom("rtplan.dcm"))
  with pytest.raises(ValueError, match=r"MR_truncated\.dcm: its pixel data cannot be decoded .*replace it"):
    decode.read_image(_dicom("MR_truncated.dcm"))
  with pytest.raises(ValueError, match=r"holds 30 frames"):
    decode.read_image(_dicom("examples_ybr_color.dcm"))


def test_a_compressed_dicom_without_its_decoder_names_the_plugin():
  try:
    pydicom.dcmread(_dicom("MR_small_jpeg_ls_lossless.dcm")).pixel_array
    pytest.skip("a JPEG-LS decoder is installed here")
  except RuntimeError:
    pass
  with pytest.raises(ValueError) as e:
    decode.read_image(_dicom("MR_small_jpeg_ls_lossless.dcm"))
  msg = str(e.value)
  assert "\n" not in msg and "JPEG-LS Lossless" in msg and "pip install pylibjpeg" in msg, msg


# -- NIfTI volumes in seg_folder ---------------------------------------------------------------------

def nifti_folder(root, empty_slices=3):
  """split.csv of nibabel's real anatomical.nii (33x41x25 int16): one volume per split (b is flipped), masks = the
  brightest quarter of each volume with its first `empty_slices` slices (last axis) left empty."""
  img = nib.load(os.path.join(NIB_DATA, "anatomical.nii"))
  vol = np.asanyarray(img.dataobj)
  root.mkdir(parents=True)
  rows = ["image,mask,split"]
  for name, split, data in (("a.nii", "train", vol), ("b.nii.gz", "val", vol[::-1].copy()),
                            ("c.nii.gz", "test", vol)):
    mask = (data > np.percentile(data, 75)).astype(np.uint8)
    mask[..., :empty_slices] = 0
    nib.save(nib.Nifti1Image(data, img.affine), str(root / name))
    nib.save(nib.Nifti1Image(mask, img.affine), str(root / f"mask_{name}"))
    rows.append(f"{name},mask_{name},{split}")
  (root / "split.csv").write_text("\n".join(rows) + "\n")
  return root


def test_volumes_become_slices_that_stay_in_their_split(tmp_path):
  root = nifti_folder(tmp_path / "vol")
  train = sources.SegFolderSource(root, "train", cache="off")
  assert len(train) == 25 and set(map(str, train.image_paths)) == {str(root / "a.nii")}
  vol = np.asanyarray(nib.load(str(root / "a.nii")).dataobj).astype(np.float64)
  rec = train[10]
  expected = np.round((vol[..., 10] - vol.min()) / (vol.max() - vol.min()) * 255)  # the volume's own scale
  np.testing.assert_array_equal(rec["image"][..., 0], expected)
  np.testing.assert_array_equal(rec["mask"], np.asanyarray(nib.load(str(root / "mask_a.nii")).dataobj)[..., 10])
  first_axis = sources.SegFolderSource(root, "val", cache="on", slice_axis=0)
  assert len(first_axis) == 33 and first_axis[0]["image"].shape == (41, 25, 1)
  mask = np.asanyarray(nib.load(str(root / "mask_b.nii.gz")).dataobj)
  kept = sources.SegFolderSource(root, "val", cache="off", skip_empty_slices=True)
  assert len(kept) == int(np.any(mask != 0, axis=(0, 1)).sum()) == 22


def test_bad_volumes_are_one_clear_error(tmp_path):
  root = nifti_folder(tmp_path / "vol")
  affine = np.eye(4)
  nib.save(nib.Nifti1Image(np.zeros((33, 41, 24), np.uint8), affine), str(root / "short.nii.gz"))
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), affine), str(root / "4d.nii.gz"))
  Image.fromarray(np.zeros((41, 33), np.uint8)).save(root / "m.png")
  cases = {"a.nii,short.nii.gz": r"mask_?.*short\.nii\.gz has shape \(33, 41, 24\) but its image .*\(33, 41, 25\)",
           "4d.nii.gz,4d.nii.gz": r"4d\.nii\.gz has shape \(4, 4, 4, 2\) \(4-D\); seg_folder takes 3-D volumes",
           "a.nii,m.png": r"a NIfTI volume pairs with a NIfTI mask volume only"}
  for row, match in cases.items():
    (root / "split.csv").write_text(f"image,mask,split\n{row},train\n")
    with pytest.raises(ValueError, match=match):
      sources.SegFolderSource(root, "train", cache="off")
  from tpp_jax.data import config as data_config
  with pytest.raises(ValueError, match=r"data.slice_axis=3 is out of range .* use 0, 1 or 2"):
    data_config.resolve({"slice_axis": 3})
  with pytest.raises(ValueError, match=r"data.window=.* must be \(center, width\)"):
    data_config.resolve({"window": "soft tissue"})


# -- through the CLIs and the Python API -----------------------------------------------------------

def dicom_class_folder(root):
  """train / val / test of two classes: CT (DICOM) and MR (DICOM in four transfer syntaxes, an extensionless DICOM,
  a 16-bit PNG and a float TIFF of the same real MR pixels)."""
  px = _mr_pixels()
  for split in ("train", "val", "test"):
    for cls, names in (("ct", CT), ("mr", MR)):
      (root / split / cls).mkdir(parents=True)
      for n in names:
        shutil.copy(_dicom(n), root / split / cls / n)
    shutil.copy(_dicom("MR_small.dcm"), root / split / "mr" / "IM0001")
    Image.fromarray(px.astype(np.uint16)).save(root / split / "mr" / "mr16.png")
    Image.fromarray(px.astype(np.float32) / 7).save(root / split / "mr" / "mrf.tif")
  return root


SMOKE = "configs/experiment.py:demo,smoke,px32,steps=2,batch_size=8,eval_every=0,checkpoint_every=0,progress=False"


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dicom")
  data, wd = dicom_class_folder(tmp / "data"), tmp / "run"
  r = run_cli(["--config", SMOKE, "--config.data.source=class_folder", f"--config.data.path={data}",
               "--workdir", str(wd)])
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  return wd, data


def test_a_dicom_and_16_bit_class_folder_trains_predicts_and_the_api_agrees(dicom_run, tmp_path):
  import tpp_jax
  wd, data = dicom_run
  out = tmp_path / "pred"
  predict.main([str(wd), str(data / "test"), str(out), "--no-progress"])
  with open(out / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 + 4 + 3 and {"prob_ct", "prob_mr"} <= set(rows[0])  # named by the class folders
  run = tpp_jax.load_run(wd)
  probs = run.predict([data / "test" / row["file"] for row in rows])
  cli = np.asarray([[float(row["prob_ct"]), float(row["prob_mr"])] for row in rows])
  assert probs.shape == (9, 2) and np.abs(probs - cli).max() < 1e-6
  # raw arrays of any dtype take the same rule: the 16-bit pixels as an array = the 16-bit PNG file
  px = _mr_pixels()
  arrays = run.predict([px.astype(np.uint16), px.astype(np.int16), px.astype(np.float32) / 7])
  by_file = dict(zip([row["file"] for row in rows], cli))
  for got, f in zip(arrays, ("mr/mr16.png", "mr/mr16.png", "mr/mrf.tif")):
    assert np.abs(got - by_file[f]).max() < 1e-6, f


def test_a_nifti_segmentation_trains_and_predicts_a_mask_volume_with_the_inputs_affine(tmp_path):
  data, wd, out = nifti_folder(tmp_path / "data"), tmp_path / "run", tmp_path / "pred"
  r = run_cli(["--config", "configs/experiment.py:kvasir,smoke,px32,steps=2,eval_every=0,checkpoint_every=0,"
               "progress=False", f"--config.data.path={data}", "--config.data.skip_empty_slices=True",
               "--workdir", str(wd)])
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  predict.main([str(wd), str(data / "c.nii.gz"), str(out), "--no-progress"])
  source, predicted = nib.load(str(data / "c.nii.gz")), nib.load(str(out / "masks" / "c.nii.gz"))
  assert predicted.shape == source.shape and np.array_equal(predicted.affine, source.affine)
  masks = np.asanyarray(predicted.dataobj)
  assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
  with open(out / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert [row["file"] for row in rows] == [f"c.nii.gz[{k}]" for k in range(25)]  # every slice, empty ones too
  fractions = np.asarray([float(row["frac_foreground"]) for row in rows])
  np.testing.assert_allclose(fractions, masks.mean(axis=(0, 1)), atol=1e-5)  # the table describes the volume
