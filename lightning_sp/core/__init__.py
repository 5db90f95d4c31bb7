"""The core: configuration and mesh, token layouts, communication, block kernels, the distributed
attention and the exact loss. It imports torch and einops only, never Lightning or Hydra."""
