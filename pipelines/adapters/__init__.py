"""Adapters that turn third-party model formats into tfft flow models (``model.target`` factories).

They import diffusers/transformers, which the library (``tfft/``) never does:

- ``stable_diffusion``: a diffusers text-to-image pipeline directory (UNet, CLIP text encoder, VP schedule) as a
  flow on latents, by ``tfft.diffusion.VPDiffusionFlow``;
- ``stable_diffusion_3``: a rectified-flow pipeline directory (SD3 transformer, CLIP encoders, flow-matching
  scheduler), already a flow up to the sign and direction of time;
- ``tiny``: tiny random pipelines and a CLIP model written to disk, for tests and demos.
"""

__all__: list[str] = []
