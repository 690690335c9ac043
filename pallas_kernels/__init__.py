"""extrapolax.pallas_kernels: fused flash-attention kernels (see README.md).

Import the back ends as modules (``flash_gpu``, ``flash_tpu``); ``tiles``
holds the maths and the block schedule they share. ``flash_gpu_layout``,
``flash_gpu_backward`` and ``flash_tpu_layout`` are parts of the back ends.
"""
