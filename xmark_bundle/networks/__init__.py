"""Networks of the X-Mark bundle: watermark generators (and the lead's classifiers in :mod:`.classifier`)."""

from .generator import SSCLBWGenerator, XMarkGenerator, bounded_perturbation

__all__ = ["SSCLBWGenerator", "XMarkGenerator", "bounded_perturbation"]
