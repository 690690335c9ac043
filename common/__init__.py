"""Pieces every other package may import: validation and attention geometry.

``extrapolax.common`` sits below the rest (attention, pallas_kernels, models
and experiments all import it; it imports none of them), so shared helpers
live here instead of as private names of one package that others reach into.

* :mod:`~extrapolax.common.checks`: argument checks that raise one
  ``ValueError`` naming the bad value and what is allowed.
* :mod:`~extrapolax.common.geometry`: block labels (EMPTY / PARTIAL / FULL),
  the block classifier over any mask with ``block_visibility``, the default
  position alignment, and ``AttentionStatics``, the hashable settings every
  attention implementation closes over.
* :mod:`~extrapolax.common.nonfinite`: how every attention implementation
  keeps a non-finite value row out of the rows the mask hides it from.
"""

from . import checks
from . import geometry
from . import nonfinite

__all__ = ["checks", "geometry", "nonfinite"]
