"""Make pydicom-seg 0.4.1 importable under pydicom 3 in the MONAI Label environment (``make test-monailabel``).

monailabel 0.8.5 imports pydicom-seg at start-up (``monailabel.datastore.utils.convert``, for DICOM SEG labels), and
pydicom-seg 0.4.1, its last release, imports ``SegmentationStorage`` from ``pydicom._storage_sopclass_uids``, a module
that pydicom 3 removed (the UID is ``pydicom.uid.SegmentationStorage`` there). pydicom 2 is no way out: the bundle
reads and writes DICOM through pydicom 3's pixel API and encoders. So this script rewrites that one import in the
installed package, checks that nothing else there uses the removed module, and fails naming the file otherwise.

    python scripts/patch_pydicom_seg.py   # run with the environment's interpreter; idempotent
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

VERSION = "0.4.1"
OLD = "from pydicom._storage_sopclass_uids import SegmentationStorage"
NEW = "from pydicom.uid import SegmentationStorage  # pydicom 3 (patched by the X-Mark bundle's Makefile)"


def main() -> int:
    version = importlib.metadata.version("pydicom-seg")
    if version != VERSION:
        print(f"pydicom-seg {version}: this patch is for {VERSION}; check whether it still needs one", file=sys.stderr)
        return 1
    spec = importlib.util.find_spec("pydicom_seg")  # finds the package without importing it
    package = Path(spec.origin).parent
    patched = 0
    for path in sorted(package.glob("*.py")):
        text = path.read_text()
        if OLD in text:
            path.write_text(text.replace(OLD, NEW))
            patched += 1
            text = path.read_text()
        if "_storage_sopclass_uids" in text.replace(NEW, ""):
            print(f"{path}: still uses pydicom._storage_sopclass_uids after the patch", file=sys.stderr)
            return 1
    print(f"pydicom-seg {version} at {package}: {patched} imports moved to pydicom.uid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
