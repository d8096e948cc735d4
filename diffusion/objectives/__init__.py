"""The mathematics of training and sampling, one module per formulation, each behind ``training_losses`` and
``sample`` and declaring its samplers' own options (``SAMPLER_OPTIONS``): ``vp`` (U-ViT's continuous VP SDE and
Stable Diffusion's discrete schedule, noise prediction), ``iddpm`` (DiT's improved DDPM), ``transport`` (SiT's
interpolants on ``paths``, with REPA's time direction from ``repa_time``), ``repa`` (REPA's projectors, tap and
alignment loss) and ``guidance`` (classifier-free guidance in one batched call). Pure functions of tensors and
networks: nothing here reads configs, files or data.
"""
