"""Gutout: Cutout that erases what the model (or its ensemble peers) finds important.

Core library: Grad-CAM, the canonical-frame saliency cache, and the cut stage. CuPy is imported lazily.
"""

from .cache import CacheSnapshotError, SaliencyCache, bytes_per_member
from .config import ConfigError
from .cut import CutConfig, cut
from .fingerprint import dataset_fingerprint
from .gradcam import ActivationCapture, GradCAM, cam_from_activations, normalise_maps
from .stage import GutoutStage, StageConfig
from .warp import warp_to_canonical, warp_to_crop

__version__ = "0.1.0"

__all__ = [
    "ActivationCapture",
    "CacheSnapshotError",
    "ConfigError",
    "CutConfig",
    "GradCAM",
    "GutoutStage",
    "SaliencyCache",
    "StageConfig",
    "bytes_per_member",
    "cam_from_activations",
    "cut",
    "dataset_fingerprint",
    "normalise_maps",
    "warp_to_canonical",
    "warp_to_crop",
]
