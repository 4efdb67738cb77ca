"""The keyed watermark variants (``keyed_grating``, ``keyed_carrier``): secret key fields (:mod:`.keys`) and key
vetting (:mod:`.vetting`).

Research variant behind flags; the bundle's default method is the paper's unkeyed X-Mark.
"""
