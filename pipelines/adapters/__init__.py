"""Adapters that turn third-party model formats into tfft flow models (``model.target`` factories).

They import diffusers/transformers, which the library (``tfft/``) never does. ``stable_diffusion``: a
diffusers text-to-image pipeline directory (UNet + CLIP text encoder, VP schedule) as a flow on latents;
``tiny``: a tiny random pipeline and CLIP model written to disk for tests and demos.
"""

__all__: list[str] = []
