"""Black-box ownership verification (X-Mark step 3), split by role.

:mod:`.queries` (which samples, how loaded), :mod:`.blackbox` (suspect models and their label columns),
:mod:`.ttest` (the paired t-test and WSR), :mod:`.controls` (the control and the "specific" rule), :mod:`.report`
(figure and summary), :mod:`.verify` (the run that ties them together), :mod:`.server` (a loopback reference endpoint).
"""

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
from .controls import control_comparison, control_queries, other_key_control, unkeyed_control
from .queries import QuerySettings, load_letterboxed, query_samples
from .server import serve
from .ttest import ProbabilityError, check_probabilities, ownership_test, watermark_success_rate
from .verify import VerificationSettings, run_verification, verify_ownership

__all__ = [
    "HTTPSuspect",
    "ProbabilityError",
    "QuerySettings",
    "SuspectConnectionError",
    "SuspectModel",
    "SuspectModelError",
    "TorchSuspect",
    "VerificationSettings",
    "WireFormatError",
    "check_probabilities",
    "control_comparison",
    "control_queries",
    "decode_images",
    "encode_images",
    "load_letterboxed",
    "open_suspect",
    "other_key_control",
    "ownership_test",
    "query_samples",
    "run_verification",
    "serve",
    "unkeyed_control",
    "verify_ownership",
    "watermark_success_rate",
]
