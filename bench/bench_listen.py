"""The DICOM node (`boneage listen`) against plain batch prediction, on the same DICOM files in one run.

Usage (from the repository root):
    python bench/bench_listen.py [--images 70] [--model DIR] [--backend onnx|torch]

Makes DICOM files at run time from the full-resolution samples in ../shared/data (1600x2080; uncompressed and
lossless-JPEG copies alternating, as archives send them), or from synthetic radiographs without the data, then:
(a) `predict_files` over all of them in one batch (what `boneage predict` does; no reports);
(b) the node on loopback: one association sends every file by C-STORE; timed until the last report is written.
Prints JSON: images/s for both, their ratio, and the sender's C-STORE round trip (p50/p95): how long a PACS waits
for each answer while the node reads in the background.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (  # also puts the repository root on the path
    FULLRES,
    compress_dicom,
    synthetic_radiograph,
    write_dicom,
)


def _make_files(folder: Path, n: int) -> tuple[list[Path], str]:
    from PIL import Image
    from pydicom.uid import generate_uid

    sources = sorted((FULLRES / "images").glob("*.png"))
    sexes = {}
    if sources:
        import pandas as pd

        labels = pd.read_csv(FULLRES / "labels.csv", dtype={"id": str}).set_index("id")
        sexes = {i: "M" if str(labels.at[i, "male"]).lower() in ("true", "1") else "F" for i in labels.index}
    paths = []
    for k in range(n):
        if sources:
            source = sources[k % len(sources)]
            pixels, sex = np.asarray(Image.open(source).convert("L")), sexes[source.stem]
        else:
            pixels, sex = synthetic_radiograph(24 + 6 * (k % 30), size=512, seed=k), "F" if k % 2 else "M"
        plain = write_dicom(
            folder / f"{k}_plain.dcm", pixels.astype("uint16") * 16, PatientSex=sex, StudyInstanceUID=generate_uid()
        )
        paths.append(plain if k % 2 == 0 else compress_dicom(plain, folder / f"{k}.dcm", "jpeg-lossless"))
    return paths, "full-resolution samples" if sources else "synthetic 512 px"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=70)
    parser.add_argument("--model")
    parser.add_argument("--backend", default="onnx", choices=("onnx", "torch"))
    args = parser.parse_args()

    import pydicom
    from pynetdicom import AE

    from boneage.imageio import dicom_patient_info
    from boneage.pacs import Listener
    from boneage.predict import load_predictor

    with tempfile.TemporaryDirectory(prefix="bench-listen-") as tmp:
        folder = Path(tmp)
        paths, kind = _make_files(folder, args.images)
        predictor = load_predictor(args.model, args.backend)
        sexes = [dicom_patient_info(path)["male"] for path in paths]

        start = time.perf_counter()
        rows = list(predictor.predict_files(paths, sexes))
        batch_seconds = time.perf_counter() - start

        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        listener = Listener(predictor, folder / "node")
        listener.start("127.0.0.1", port, block=False)
        datasets = [pydicom.dcmread(path) for path in paths]
        sender = AE(ae_title="BENCH")
        for syntax in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
            sender.add_requested_context(datasets[0].SOPClassUID, syntax)
        round_trips = []
        start = time.perf_counter()
        assoc = sender.associate("127.0.0.1", port, ae_title="BONEAGE")
        for ds in datasets:
            sent = time.perf_counter()
            status = assoc.send_c_store(ds)
            round_trips.append(time.perf_counter() - sent)
            assert status and status.Status == 0x0000, status
        assoc.release()
        listener.wait()
        node_seconds = time.perf_counter() - start
        listener.stop()
        reports = len(list((folder / "node" / "reports").glob("*.dcm")))

    ok = sum(row["status"] == "ok" for row in rows)
    result = {
        "images": args.images,
        "kind": kind,
        "backend": args.backend,
        "predicted_ok": ok,
        "reports_written": reports,
        "batch_predict_img_per_s": round(args.images / batch_seconds, 2),
        "node_img_per_s": round(args.images / node_seconds, 2),
        "node_vs_batch": round(batch_seconds / node_seconds, 2),
        "c_store_round_trip_ms_p50": round(1000 * statistics.median(round_trips), 1),
        "c_store_round_trip_ms_p95": round(1000 * float(np.percentile(round_trips, 95)), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
