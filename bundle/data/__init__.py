"""Data loading for the X-Mark bundle."""

from .xray_io import LoadXRay, LoadXRayd, XRayLoadError, XRayMeta, load_xray, to_stored

__all__ = ["LoadXRay", "LoadXRayd", "XRayLoadError", "XRayMeta", "load_xray", "to_stored"]
