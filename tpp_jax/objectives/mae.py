"""MAE pretext: visible-only encoder + light decoder, loss on masked patches."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tpp_jax.models.mae import MAEDecoder, MAEDecoderConfig, mae_loss, random_masking
from tpp_jax.objectives.base import Objective


class MAEObjective(Objective):
  default_metric = "loss"

  def __init__(self, config, encoder):
    super().__init__(config, encoder)
    p = config.pretext
    self.mask_ratio = float(p.mask_ratio)
    self.norm_pix = bool(p.norm_pix_loss)
    self.decoder = MAEDecoder(MAEDecoderConfig(p.decoder_width, p.decoder_depth, p.decoder_heads,
                                               p.decoder_mlp_dim, encoder.cfg.ln_eps), encoder.cfg)

  def init(self, rng, encoder_params, batch):
    images = batch["image"][:1]
    noise = jax.random.uniform(rng, (1, self.encoder.cfg.num_patches))
    keep, _, restore = random_masking(noise, self.mask_ratio)
    tokens = self.encode({"encoder": encoder_params}, images, False, None, keep)["tokens"]
    return {"decoder": self.decoder.init(rng, tokens, restore)["params"]}, {}

  def forward(self, params, images, noise, train, rng=None):
    keep, mask, restore = random_masking(noise, self.mask_ratio)
    tokens = self.encode(params, images, train, rng, keep)["tokens"]
    pred = self.decoder.apply({"params": params["decoder"]}, tokens, restore, train=train)
    return pred, mask

  def _noise(self, rng, b):
    return jax.random.uniform(rng, (b, self.encoder.cfg.num_patches))

  def loss(self, params, aux, batch, rng, train):
    r_noise, r_drop = jax.random.split(rng)
    pred, mask = self.forward(params, batch["image"], self._noise(r_noise, batch["image"].shape[0]), train, r_drop)
    loss = mae_loss(pred, batch["image"], mask, self.encoder.cfg.patch, self.norm_pix)
    return loss, ({"loss": loss}, aux)

  def eval_outputs(self, params, aux, batch):
    # Fixed masking noise per eval batch position, so eval losses are comparable across steps.
    images, valid = batch["image"], batch["valid"].astype(jnp.float32)
    pred, mask = self.forward(params, images, self._noise(jax.random.key(1234), images.shape[0]), False)
    per_image = jax.vmap(lambda p, x, m: mae_loss(p[None], x[None], m[None], self.encoder.cfg.patch,
                                                  self.norm_pix))(pred, images, mask)
    return {"loss_sum": (per_image * valid).sum(), "count": valid.sum()}
