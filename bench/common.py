"""What the benchmarks share with the tools and tests: the data paths (:mod:`tools.data_paths`) and the synthetic
radiographs and DICOM files (:mod:`tests.helpers`). ``python bench/x.py`` puts only ``bench/`` on the path, so the
repository root is added here, once."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import compress_dicom, synthetic_radiograph, write_dicom  # noqa: E402
from tools.data_paths import DATA, FULLRES  # noqa: E402

__all__ = ["DATA", "FULLRES", "ROOT", "compress_dicom", "synthetic_radiograph", "write_dicom"]
