"""Black-box ownership verification (X-Mark step 3): suspect-model adapters, the paired t-test, reports, HTTP server."""

from .blackbox import (
    HTTPSuspect,
    SuspectConnectionError,
    SuspectModel,
    SuspectModelError,
    TorchSuspect,
    WireFormatError,
    decode_images,
    encode_images,
    open_suspect,
)
from .server import serve
from .ttest import ProbabilityError, check_probabilities, ownership_test, watermark_success_rate
from .verify import generator_key_cells, other_key_control, run_verification, unkeyed_control, verify_ownership

__all__ = [
    "HTTPSuspect",
    "ProbabilityError",
    "SuspectConnectionError",
    "SuspectModel",
    "SuspectModelError",
    "TorchSuspect",
    "WireFormatError",
    "check_probabilities",
    "decode_images",
    "encode_images",
    "generator_key_cells",
    "open_suspect",
    "ownership_test",
    "unkeyed_control",
    "run_verification",
    "serve",
    "other_key_control",
    "verify_ownership",
    "watermark_success_rate",
]
