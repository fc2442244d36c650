"""Our MAE (models/mae.py: masking, decoder, loss) against HF ViTMAEForPreTraining with the same noise.

Weights come from the HF model through checkpoints/convert.py. Run with -s to see the differences.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tpp_jax.checkpoints.convert import convert, infer_decoder_config  # pylint: disable=wrong-import-position
from tpp_jax.models.mae import MAEDecoder, mae_forward  # pylint: disable=wrong-import-position
from tpp_jax.models.vit import ViT, ViTConfig  # pylint: disable=wrong-import-position

# name -> (width, depth, heads, mlp, patch, decoder width, depth, heads, mlp)
SIZES = {"w64d2": (64, 2, 4, 128, 8, 32, 2, 2, 64), "w48d3": (48, 3, 3, 96, 4, 48, 1, 4, 96)}


def report(name, diff):
  print(f"\nMAXDIFF {name}: {diff:.3g}")
  return diff


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_and_logits_match_hf(size, norm_pix_loss):
  w, d, h, m, p, dw, dd, dh, dm = SIZES[size]
  mask_ratio, image_size, eps = 0.75, 32, 1e-12
  hcfg = transformers.ViTMAEConfig(hidden_size=w, num_hidden_layers=d, num_attention_heads=h, intermediate_size=m,
                                   patch_size=p, image_size=image_size, decoder_hidden_size=dw,
                                   decoder_num_hidden_layers=dd, decoder_num_attention_heads=dh,
                                   decoder_intermediate_size=dm, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
                                   layer_norm_eps=eps, hidden_act="gelu")
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(hcfg).eval()
  with torch.no_grad():  # HF leaves LayerNorms at (1, 0) and the decoder pos-emb at 0: make them all distinct
    for prm in model.parameters():
      prm.add_(torch.randn_like(prm) * 0.05)

  cfg = ViTConfig(width=w, depth=d, heads=h, mlp_dim=m, patch=p, image_size=image_size, ln_eps=eps, pos_emb="sincos")
  enc, dec = convert(model.state_dict(), cfg)
  dcfg = infer_decoder_config(dec, heads=dh, ln_eps=eps)

  rs = np.random.RandomState(1)
  x = rs.rand(3, 3, image_size, image_size).astype(np.float32)
  noise = rs.rand(3, (image_size // p) ** 2).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), noise=torch.from_numpy(noise))
  loss, pred, mask = mae_forward(ViT(cfg), MAEDecoder(dcfg, cfg), {"encoder": enc, "decoder": dec},
                                 x.transpose(0, 2, 3, 1), noise, mask_ratio, norm_pix_loss)
  np.testing.assert_array_equal(np.asarray(mask), ref.mask.numpy())
  tag = f"MAE {size} norm_pix_loss={norm_pix_loss}"
  assert report(f"{tag} logits", np.abs(np.asarray(pred) - ref.logits.numpy()).max()) <= 1e-4
  assert report(f"{tag} loss (ours {float(loss):.9g}, HF {ref.loss.item():.9g})",
                abs(float(loss) - ref.loss.item())) <= 1e-4
