"""Web dashboard and JSON API: ``boneage serve``.

``GET /`` is a single page where a clinician uploads a radiograph (PNG, JPEG, TIFF or DICOM), enters or confirms sex
and chronological age (and, optionally, their own reading), and sees the radiograph beside its Grad-CAM overlay with
the bone age, its interval, BA - CA, the SDS and the call, and the child on a chart of bone age against age with the
normal range (age -/+ 2 SD) shaded. ``POST /api/v1/predict`` does the same for other systems; ``POST
/api/v1/report.dcm`` returns the report of a DICOM upload as a DICOM Secondary Capture in its study
(:mod:`boneage.secondary_capture`) and ``POST /api/v1/report.pdf`` any upload's report page to file as a PDF
(:mod:`boneage.report_pdf`);
``GET /api/v1/health`` says whether the model is loaded; the OpenAPI schema is at ``/openapi.json`` and ``/docs``.

Every prediction goes through :meth:`boneage.backends.base.Predictor.predict_files`, the code path of
``boneage predict``.
Bad input gets a 4xx JSON ``{"detail": ...}``; an unexpected failure a 500 without a stack trace. The log holds a
request number, status, size and latency: never a file name, a DICOM tag or any other patient detail.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time
import base64
import contextlib
import hmac
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from boneage import __version__
from boneage.clinical import REFERENCE, SDS_LIMIT, parse_chronological_age, reference_band
from boneage.imageio import ImageReadError, dicom_patient_info, parse_sex
from boneage.inputs import header_age
from boneage.model_folder import model_name, tta_text
from boneage.predict import load_predictor, torch_available
from boneage.render import render_report
from boneage.rows import PREDICTION_COLUMNS, add_note, add_reading
from boneage.secondary_capture import report_dataset

logger = logging.getLogger("boneage.serve")

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_PENDING = 8  # readings running or waiting at once; more get 503 + Retry-After instead of piling up
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the form fields around the file
# every status the API answers with, for the OpenAPI schema
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "the file cannot be read as a radiograph (the reason in `detail`)"},
    401: {"description": "the server needs its API token: `Authorization: Bearer TOKEN`"},
    413: {"description": "the upload, or the image it declares, is larger than the limit"},
    415: {"description": "not a PNG, JPEG, TIFF or DICOM file (or, for report.dcm, not DICOM)"},
    422: {"description": "a form field is missing or wrong (sex, ages), or the sex is unknown"},
    503: {"description": "busy: too many readings at once; retry after the `Retry-After` seconds"},
}
_SUFFIXES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"II*\x00": ".tif", b"MM\x00*": ".tif"}


class InputError(Exception):
    """A request the server will not predict on: ``status_code`` and a message for the client (and headers, e.g.
    ``Retry-After`` with a 503)."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class BodyLimit:
    """ASGI middleware that stops reading a request body once it passes ``limit`` bytes, whether or not the client
    sent a Content-Length, and answers 413: an upload streamed without one is cut off at the limit instead of being
    spooled to disk whole. The application sees a client that went away; its own answer is dropped."""

    def __init__(self, app: Any, limit: int, upload_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit  # the body: the file and the form around it
        self.upload_limit = upload_limit or limit  # the file, as the message states it

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received, exceeded = 0, False
        scope.setdefault("state", {})

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = scope["state"]["body_too_large"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not exceeded:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if exceeded:
            body = json.dumps({"detail": f"upload too large: the limit is {self.upload_limit:,} bytes"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers.append((b"cache-control", b"no-store"))
            headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def _suffix_for(data: bytes) -> str:
    """The file type from its first bytes (the upload's name and content type are not trusted)."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return ".dcm"
    for magic, suffix in _SUFFIXES.items():
        if data.startswith(magic):
            return suffix
    raise InputError(
        415, "unsupported file type: expected a PNG, JPEG, TIFF or DICOM (Part 10, with the DICM preamble)"
    )


@contextlib.contextmanager
def _stored(data: bytes, suffix: str) -> Iterator[Path]:
    """An upload as a file for the readers, which take paths; removed when the request is done."""
    with tempfile.TemporaryDirectory(prefix="boneage-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        yield path


def _png_base64(rgb: Any) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_rgb(path: Path, max_side: int = 512) -> Any:
    """The radiograph as (H, W, 3) uint8 RGB, longest side ``max_side`` (what the dashboard shows)."""
    import numpy as np
    from PIL import Image

    from boneage.imageio import read_image

    gray = read_image(path)
    scale = min(1.0, max_side / max(gray.shape))
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    shown = np.asarray(Image.fromarray(gray, mode="F").resize(size, Image.BILINEAR)).clip(0, 1)
    return (np.repeat(shown[..., None], 3, axis=2) * 255).round().astype(np.uint8)


class BoneAgeService:
    """One loaded model behind a lock (Grad-CAM hooks the model, so requests take turns on it)."""

    def __init__(self, predictor: Any, backend: str, max_pending: int = MAX_PENDING) -> None:
        self.predictor = predictor
        self.backend = backend
        self.lock = threading.Lock()
        self.max_pending = max_pending
        self.pending = 0
        self._pending_lock = threading.Lock()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of ``max_pending`` places for a reading, or answer 503 with Retry-After when all are taken."""
        with self._pending_lock:
            if self.pending >= self.max_pending:
                raise InputError(
                    503,
                    f"busy: {self.pending} readings are running or waiting; try again in a few seconds",
                    headers={"Retry-After": "2"},
                )
            self.pending += 1
        try:
            yield
        finally:
            with self._pending_lock:
                self.pending -= 1

    @property
    def model_info(self) -> dict[str, Any]:
        description = self.predictor.description
        return {
            "name": model_name(self.predictor.model_dir),
            "boneage_version": description.get("boneage_version"),
            "weights_sha256": description.get("weights_sha256"),
            "backbone": description.get("model", {}).get("backbone"),
            "image_size": description.get("data_contract", {}).get("image_size"),
            "backend": self.backend,
            "output_correction": description.get("output", {}).get("correction") is not None,
            "flip_tta": bool(self.predictor.tta_hflip),
            "tta_views": [list(view) for view in self.predictor.tta_views],
            "tta": tta_text(self.predictor.tta_views, self.predictor.tta_hflip),
            "val_mae_months": description.get("metrics", {}).get("val", {}).get("mae_months"),
            "interval_coverage": description.get("uncertainty", {}).get("evaluation", {}).get("coverage"),
        }

    def _read(
        self, path: Path, suffix: str, sex: str | None, age: str | None, reading: str | None = None
    ) -> dict[str, Any]:
        """Sex and age from the form, else the DICOM header; then the prediction row (``predict_files``, under the
        lock), with the reader's own bone age beside it when one was sent. Raises InputError for anything the client
        must fix."""
        male = None
        if sex is not None and sex.strip():
            male = parse_sex(sex.strip())
            if male is None or sex.strip().upper() not in ("M", "F"):
                raise InputError(422, f"sex: expected M or F, got {sex!r}")
        try:
            chronological = parse_chronological_age(age, "chronological_age_months")
            reader_months = parse_chronological_age(reading, "reader_bone_age_months")
        except ValueError as err:
            raise InputError(422, str(err)) from None
        header = dicom_patient_info(path) if suffix == ".dcm" else {"male": None, "age_months": None}
        sex_source = "form" if male is not None else "dicom" if header["male"] is not None else None
        male = male if male is not None else header["male"]
        age_source, age_note = "form" if chronological is not None else None, None
        if chronological is None:  # an implausible header age is dropped with a note, as predict and listen do
            chronological, age_note = header_age(header)
            age_source = "dicom" if chronological is not None else None
        if male is None:
            raise InputError(422, "sex unknown: send sex=M or sex=F (the file carries no DICOM PatientSex)")
        row = next(self.predictor.predict_files([path], [male], ages=[chronological]))
        if row["status"] == "error":
            message = row["message"].replace(str(path), "upload")
            raise InputError(413 if "exceeds the limit" in message else 400, message)
        row.update(sex_source=sex_source, age_source=age_source)
        add_note(row, age_note)
        add_reading(row, reader_months)
        return row

    def predict(
        self, data: bytes, sex: str | None, age: str | None, gradcam: bool, reading: str | None = None
    ) -> dict[str, Any]:
        """One upload -> the report dict. Raises InputError for anything the client must fix."""
        suffix = _suffix_for(data)
        with _stored(data, suffix) as path:
            with self.lock:
                row = self._read(path, suffix, sex, age, reading)
                if row["status"] == "not assessable":
                    raise InputError(422, "not assessable: " + row["message"].replace(str(path) + ": ", ""))
                images = None
                if gradcam and self.backend == "torch":
                    from boneage.explain import gradcam_overlay

                    images = gradcam_overlay(self.predictor.model, self.predictor.contract, path, row["male"])
                elif gradcam:  # onnxruntime has no gradients: show the radiograph alone
                    images = (_display_rgb(path), None)
        report = {k: row.get(k) for k in PREDICTION_COLUMNS if k not in ("id", "path")}  # every field, None if unknown
        report.update(sex="M" if row["male"] else "F", sex_source=row["sex_source"], age_source=row["age_source"])
        report["sds_reference"] = REFERENCE if report.get("sds") is not None else None
        # the message's parts, for a client that shows them in different places
        report["clinical_note"] = row.get("clinical_note", "")
        report["reading_note"] = row.get("reading_note", "")
        # the normal range for the chart of bone age against age: age -/+ 2 SD at the reference table's ages
        report["reference_band"] = (
            {**reference_band(row["male"]), "sds_limit": SDS_LIMIT, "reference": REFERENCE}
            if report.get("chronological_age_months") is not None
            else None
        )
        report["model"] = self.model_info
        report["dicom_report_available"] = suffix == ".dcm"  # POST the same form to /api/v1/report.dcm
        if images is not None:
            report["image_png"] = _png_base64(images[0])
            if images[1] is None:
                report["gradcam_note"] = "Grad-CAM needs the PyTorch backend (this server runs on onnxruntime)"
            else:
                report["gradcam_png"] = _png_base64(images[1])
        return report

    def fhir_observation(
        self,
        data: bytes,
        sex: str | None,
        age: str | None,
        reading: str | None = None,
        patient: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One upload -> its bone age as a FHIR R4 Observation (:func:`boneage.fhir_observation.observation`), the
        resource ``boneage predict --fhir`` writes. Raises InputError for anything the client must fix."""
        from boneage.fhir_observation import observation

        suffix = _suffix_for(data)
        with _stored(data, suffix) as path:
            with self.lock:
                row = self._read(path, suffix, sex, age, reading)
            if row["status"] == "not assessable":
                raise InputError(422, "not assessable: " + row["message"].replace(str(path) + ": ", ""))
            model = {k: self.model_info[k] for k in ("name", "boneage_version", "weights_sha256")}
            return observation(row, model, patient)

    def dicom_report(self, data: bytes, sex: str | None, age: str | None, reading: str | None = None) -> bytes:
        """One DICOM upload -> its report as a DICOM Secondary Capture in the same study
        (:mod:`boneage.secondary_capture`)."""
        import pydicom

        if _suffix_for(data) != ".dcm":
            raise InputError(415, "a DICOM report needs a DICOM upload (its patient and study to file the report into)")
        with _stored(data, ".dcm") as path:
            with self.lock:
                row = self._read(path, ".dcm", sex, age, reading)
            name = model_name(self.predictor.model_dir)
            report = report_dataset(
                pydicom.dcmread(path, stop_before_pixels=True), render_report(path, row, name), row, name
            )
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def structured_report(self, data: bytes, sex: str | None, age: str | None, reading: str | None = None) -> bytes:
        """One DICOM upload -> its measurements as a DICOM Structured Report (TID 1500) in the same study
        (:func:`boneage.structured_report.sr_dataset`)."""
        import pydicom

        from boneage.structured_report import sr_dataset

        if _suffix_for(data) != ".dcm":
            raise InputError(415, "a structured report needs a DICOM upload (its patient and study to file it into)")
        with _stored(data, ".dcm") as path:
            with self.lock:
                row = self._read(path, ".dcm", sex, age, reading)
            if row["status"] != "ok":
                raise InputError(422, "not assessable: " + row["message"].replace(str(path) + ": ", ""))
            model = {k: self.model_info[k] for k in ("name", "boneage_version", "weights_sha256")}
            try:
                report = sr_dataset(pydicom.dcmread(path, stop_before_pixels=True), row, model)
            except ValueError as err:
                raise InputError(422, str(err).replace(str(row.get("id")) + ": ", "")) from None
        buffer = io.BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def pdf_report(
        self,
        data: bytes,
        sex: str | None,
        age: str | None,
        reading: str | None = None,
        paper: str = "a4",
        patient: dict[str, Any] | None = None,
    ) -> bytes:
        """One upload, any format -> its report page to file (:func:`boneage.report_pdf.build_pdf`), the page
        ``boneage predict --pdf-report`` writes; ``patient``: identification fields that win over the DICOM
        header (``image``: the upload's file name when it is not DICOM)."""
        from boneage.report_pdf import PAPERS, build_pdf

        if paper not in PAPERS:
            raise InputError(422, f"paper: expected one of {', '.join(PAPERS)}, got {paper!r}")
        suffix = _suffix_for(data)
        with _stored(data, suffix) as path:
            with self.lock:
                row = self._read(path, suffix, sex, age, reading)
            model = {k: self.model_info[k] for k in ("name", "boneage_version", "weights_sha256")}
            return build_pdf(path, row, model, patient, paper)


def _attachment(content: bytes, media_type: str, filename: str) -> Any:
    """A file download response."""
    from fastapi import Response

    disposition = f'attachment; filename="{filename}"'
    return Response(content, media_type=media_type, headers={"Content-Disposition": disposition})


def create_app(
    model_dir: str | Path | None = None,
    backend: str = "auto",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    *,
    api_token: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_pending: int = MAX_PENDING,
) -> Any:
    """The FastAPI application with the model loaded (``model_dir``: a model folder, default the shipped model; or an
    ``.onnx`` file). ``auto`` serves on PyTorch when it is installed (Grad-CAM overlays), else on onnxruntime.

    Args:
        api_token: when set, every POST under ``/api/`` needs ``Authorization: Bearer <api_token>`` (compared in
            constant time); the dashboard asks for it. The page, the health check and the API docs stay open.
        allowed_hosts: the Host header values served (``Host: evil.example`` gets 400, which stops DNS-rebinding
            pages from reaching a loopback server); None serves any.
        max_pending: readings running or waiting at once; the next gets 503 with ``Retry-After``.
    """
    try:
        from fastapi import File, Form, Query, Request, UploadFile
        from fastapi.responses import HTMLResponse, JSONResponse, Response
        from fastapi_offline import FastAPIOffline
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ImportError as err:
        raise ImportError("boneage serve needs FastAPI: pip install 'boneage[serve]'") from err

    if backend == "auto":
        is_onnx_file = model_dir is not None and Path(model_dir).suffix == ".onnx"
        backend = "torch" if torch_available() and not is_onnx_file else "onnx"
    service = BoneAgeService(load_predictor(model_dir, backend), backend, max_pending)
    # FastAPIOffline: the interactive docs (/docs) from files in the package, not a CDN an offline network cannot reach
    app = FastAPIOffline(
        title="boneage",
        version=__version__,
        description="Bone age from a hand radiograph, with a 90% interval, SDS and call. Decision support for "
        "research use, not a medical device.",
    )
    app.state.service = service
    counter = iter(range(1, 1 << 62))

    @app.middleware("http")
    async def limit_and_log(request: Request, call_next: Any) -> Any:
        number, start = next(counter), time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes + FORM_OVERHEAD_BYTES:
            response: Any = JSONResponse(
                {"detail": f"upload too large: {int(length):,} bytes; the limit is {max_upload_bytes:,}"},
                status_code=413,
            )
        elif api_token is not None and request.method == "POST" and not _authorised(request, api_token):
            response = JSONResponse(
                {"detail": "this server needs its API token: send Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            try:
                response = await call_next(request)
            except Exception:  # never a stack trace to the client; the log keeps it (no patient data in it)
                logger.exception("request %d failed", number)
                response = JSONResponse({"detail": "internal error; see the server log"}, status_code=500)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # results carry patient data: never kept by a cache
        logger.info(
            "request %d %s %s -> %d, %s bytes, %.0f ms",
            number,
            request.method,
            request.url.path,
            413 if request.scope["state"].get("body_too_large") else response.status_code,  # BodyLimit's answer
            length or "?",
            1000 * (time.perf_counter() - start),
        )
        return response

    @app.exception_handler(InputError)
    async def input_error(request: Request, err: InputError) -> JSONResponse:
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)

    # outermost first: the Host check, then the body limit (the logging middleware above sits inside both)
    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD_BYTES, upload_limit=max_upload_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return (resources.files("boneage") / "static" / "dashboard.html").read_text(encoding="utf-8")

    def read_upload(file: Any) -> bytes:
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise InputError(413, f"upload too large: the limit is {max_upload_bytes:,} bytes")
        if not data:
            raise InputError(400, "empty upload: 'file' has no content")
        return data

    # the form fields both prediction endpoints take
    SexForm = Annotated[str | None, Form(description="M or F; DICOM PatientSex when omitted")]  # noqa: N806
    AgeForm = Annotated[  # noqa: N806
        str | None, Form(description="months; DICOM PatientAge or birth/study dates when omitted")
    ]
    ReadingForm = Annotated[  # noqa: N806
        str | None,
        Form(description="the reader's own bone age in months, set beside the model's; noted if outside its interval"),
    ]

    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness and the loaded model (answered on the event loop, never behind the readings in the threads)."""
        return {"status": "ok", "model": service.model_info, "pending": service.pending}

    PatientForm = Annotated[  # noqa: N806
        str | None, Form(description="for the report's identification (PDF, FHIR); wins over the DICOM header")
    ]

    @app.post("/api/v1/predict", responses=ERROR_RESPONSES)
    def predict(
        file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM radiograph of the left hand")],
        sex: SexForm = None,
        chronological_age_months: AgeForm = None,
        gradcam: Annotated[
            bool, Form(description="also return the radiograph and its Grad-CAM overlay as PNG base64")
        ] = False,
        reader_bone_age_months: ReadingForm = None,
        format: Annotated[
            str, Query(description="json (the report) or fhir (a FHIR R4 Observation, application/fhir+json)")
        ] = "json",
        patient_id: PatientForm = None,
        patient_name: PatientForm = None,
        study_date: PatientForm = None,
    ) -> Any:
        """Bone age (months), 90% interval, stage; with a chronological age also BA - CA, SDS and the call; with the
        reader's own bone age, the difference and whether it lies outside the interval. With ``?format=fhir`` the
        same reading as a FHIR R4 Observation (LOINC 85151-9 in months, the interval, age, BA - CA and SDS as
        components, the call as its interpretation, the model as a contained Device)."""
        if format not in ("json", "fhir"):
            raise InputError(422, f"format: expected json or fhir, got {format!r}")
        data = read_upload(file)
        if format == "fhir":
            patient = dict(patient_id=patient_id, patient_name=patient_name, study_date=study_date)
            with service.admitted():
                resource = service.fhir_observation(
                    data, sex, chronological_age_months, reader_bone_age_months, patient
                )
            return JSONResponse(resource, media_type="application/fhir+json")
        try:
            with service.admitted():
                return service.predict(data, sex, chronological_age_months, gradcam, reader_bone_age_months)
        except ImageReadError as err:  # defensive: predict_files normally turns these into rows
            raise InputError(400, str(err)) from None

    @app.post("/api/v1/report.dcm", response_class=Response, responses=ERROR_RESPONSES)
    def dicom_report(
        file: Annotated[UploadFile, File(description="DICOM radiograph of the left hand")],
        sex: SexForm = None,
        chronological_age_months: AgeForm = None,
        reader_bone_age_months: ReadingForm = None,
    ) -> Response:
        """The report as a DICOM Secondary Capture (application/dicom) in the upload's patient and study, a new
        series, to import into the PACS; an image that is not assessable gets a report saying so."""
        data = read_upload(file)
        with service.admitted():
            content = service.dicom_report(data, sex, chronological_age_months, reader_bone_age_months)
        return _attachment(content, "application/dicom", "bone-age-report.dcm")

    @app.post("/api/v1/report.sr.dcm", response_class=Response, responses=ERROR_RESPONSES)
    def structured_report(
        file: Annotated[UploadFile, File(description="DICOM radiograph of the left hand")],
        sex: SexForm = None,
        chronological_age_months: AgeForm = None,
        reader_bone_age_months: ReadingForm = None,
    ) -> Response:
        """The measurements as a DICOM Structured Report (TID 1500 Measurement Report, application/dicom) in the
        upload's patient and study, referencing it: bone age (LOINC 85151-9, months) with its 90% interval and call,
        and with an age the chronological age, BA - CA and SDS; the model is the observer device."""
        data = read_upload(file)
        with service.admitted():
            content = service.structured_report(data, sex, chronological_age_months, reader_bone_age_months)
        return _attachment(content, "application/dicom", "bone-age-sr.dcm")

    @app.post("/api/v1/report.pdf", response_class=Response, responses=ERROR_RESPONSES)
    def pdf_report(
        file: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM radiograph of the left hand")],
        sex: SexForm = None,
        chronological_age_months: AgeForm = None,
        reader_bone_age_months: ReadingForm = None,
        paper: Annotated[str, Form(description="a4 or letter")] = "a4",
        patient_name: PatientForm = None,
        patient_id: PatientForm = None,
        birth_date: PatientForm = None,
        accession_number: PatientForm = None,
        study_date: PatientForm = None,
    ) -> Response:
        """The report page to file as a one-page PDF (application/pdf): identification (from the DICOM header, or
        these form fields, which win; unknown fields say "not given"), analysis date and time, model and method,
        findings, the chart of bone age against age, the radiograph, limits and a line for the reviewer; an image
        that is not assessable gets a page saying so. The text is real text (selectable, searchable)."""
        patient = dict(
            patient_name=patient_name,
            patient_id=patient_id,
            birth_date=birth_date,
            accession_number=accession_number,
            study_date=study_date,
        )
        if file.filename:  # a PNG's name is the image's only identifier (a DICOM upload has its SOPInstanceUID)
            patient["image"] = Path(file.filename).name
        data = read_upload(file)
        if _suffix_for(data) == ".dcm":
            patient.pop("image", None)
        with service.admitted():
            content = service.pdf_report(data, sex, chronological_age_months, reader_bone_age_months, paper, patient)
        return _attachment(content, "application/pdf", "bone-age-report.pdf")

    return app


def _authorised(request: Any, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time comparison)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    model_dir: str | Path | None = None,
    backend: str = "auto",
    max_upload_mb: float = MAX_UPLOAD_BYTES / 2**20,
    *,
    api_token: str | None = None,
    allowed_hosts: list[str] | None = None,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    max_pending: int = MAX_PENDING,
) -> None:
    """Run the dashboard with uvicorn until interrupted.

    On loopback (the default) only loopback Host headers are served. On any other interface the server needs an
    ``api_token`` (``--api-token`` or ``BONEAGE_API_TOKEN``), and serves the ``allowed_hosts`` given (any Host when
    none). ``ssl_certfile``/``ssl_keyfile`` serve HTTPS (uvicorn's TLS).

    Raises:
        ValueError: a non-loopback ``host`` without a token, or a TLS certificate without its key.
    """
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("boneage serve needs uvicorn: pip install 'boneage[serve]'") from err
    loopback = host in LOOPBACK_HOSTS
    if not loopback and not api_token:
        raise ValueError(
            f"--host {host}: serving beyond this machine needs an API token so that no one uses the service "
            "uninvited: pass --api-token TOKEN or set BONEAGE_API_TOKEN"
        )
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    if allowed_hosts is None and loopback:
        allowed_hosts = [name for name in LOOPBACK_HOSTS if not name.startswith("[")]
    # `boneage serve` logs through the CLI's handler on the `boneage` logger (a second handler would print each line
    # twice); called from Python with no logging set up, the package's lines still go to stderr
    package_logger = logging.getLogger("boneage")
    if not package_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        package_logger.addHandler(handler)
        if package_logger.level == logging.NOTSET:
            package_logger.setLevel(logging.INFO)
    app = create_app(
        model_dir,
        backend,
        int(max_upload_mb * 2**20),
        api_token=api_token,
        allowed_hosts=allowed_hosts,
        max_pending=max_pending,
    )
    tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, **tls)
