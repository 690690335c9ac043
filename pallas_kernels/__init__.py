"""extrapolax.pallas_kernels: fused flash-attention kernels (see README.md).

Import the back ends as modules (``flash_gpu``, ``flash_tpu``); ``tiles``
holds the maths and the block schedule they share.
"""
