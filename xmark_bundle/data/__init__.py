"""Data loading for the X-Mark bundle."""

from .xray_io import (
    LoadXRay,
    LoadXRayd,
    XRayLoadError,
    XRayMeta,
    XRayReader,
    find_xray_files,
    load_xray,
    series_file,
    to_stored,
)
from .xray_writer import (
    XRayWriteError,
    check_output_path,
    max_stored_change,
    quantisation_step,
    write_stored,
    write_xray,
)

__all__ = [
    "LoadXRay",
    "LoadXRayd",
    "XRayLoadError",
    "find_xray_files",
    "XRayMeta",
    "XRayReader",
    "XRayWriteError",
    "check_output_path",
    "load_xray",
    "max_stored_change",
    "quantisation_step",
    "series_file",
    "to_stored",
    "write_stored",
    "write_xray",
]
