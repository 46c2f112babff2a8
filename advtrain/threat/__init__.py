"""Threat models: norms, dual norms, steepest-ascent directions, projections and sampling.

This package is the only place in advtrain that branches on a norm. Strings such as ``"linf"`` are parsed
once, at the boundary, into a :class:`Norm` and then into a :class:`Geometry` object whose methods carry the
norm-specific math; attacks and maximizers call those methods and never look at the norm again.
"""

from advtrain.threat.geometry import Geometry, L1Geometry, L2Geometry, LinfGeometry, geometry_for
from advtrain.threat.norms import Norm, as_eps_tensor, clip_to_box, flat_norm

__all__ = [
    "Geometry",
    "L1Geometry",
    "L2Geometry",
    "LinfGeometry",
    "Norm",
    "as_eps_tensor",
    "clip_to_box",
    "flat_norm",
    "geometry_for",
]
