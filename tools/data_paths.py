"""Where the shared RSNA data lies for the tools and benchmarks: ``$BONEAGE_DATA``, else ``../shared/data`` beside
the repository. The tools import it as a sibling module (``python tools/x.py`` puts ``tools/`` on the path)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("BONEAGE_DATA") or ROOT.parent / "shared" / "data")
DATA = DATA_ROOT / "rsna-bone-age-100px"  # labels, 100-px images and the seed split
FULLRES = DATA_ROOT / "rsna-bone-age-fullres-samples"  # 35 processed full-size crops
DEV_FILMS = DATA_ROOT / "rsna-val-fullres-dev"  # 100 real full-resolution validation films
