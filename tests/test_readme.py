"""The README's Python example runs as written (on the full-resolution sample when ../shared/data is there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import synthetic_radiograph

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "../shared/data/rsna-bone-age-fullres-samples/images/1437.png"


def test_the_python_example_runs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert len(blocks) == 1 and SAMPLE in blocks[0]
    code = blocks[0]
    monkeypatch.chdir(ROOT)  # the README's relative paths start at the repository root
    on_sample = (ROOT / SAMPLE).is_file()
    if not on_sample:  # without the shared data: the same code on a synthetic radiograph
        Image.fromarray(synthetic_radiograph(130, size=256)).save(tmp_path / "hand.png")
        code = code.replace(SAMPLE, str(tmp_path / "hand.png"))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    if on_sample:  # the numbers of the README's first command: 142.3 months, interval 125-160, SDS +0.87, normal
        months, lower, upper, sds, call = printed[0].split()
        assert (float(months), round(float(lower)), round(float(upper)), float(sds), call) == pytest.approx(
            (142.34, 125, 160, 0.87, "normal"), abs=0.051
        )
    else:
        assert printed[0].split()[0] in {"not", "error"} or float(printed[0].split()[0]) > 0
