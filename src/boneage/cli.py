"""``boneage`` command line: a thin layer over the library functions, with the same parameter names.

Each subcommand is a pair of adjacent functions: ``_add_<command>`` adds its parser (arguments and handler) and
``_run_<command>`` calls the library with keyword arguments and prints what it returned. Heavy imports (PyTorch,
pandas, the command's library module) stay inside the handlers, so ``boneage --help`` and the torch-free commands
start fast and run without PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from boneage import __version__
from boneage.config import Config, flat_fields, set_field
from boneage.errors import BoneAgeError, ConfigError

_Commands = typing.Any  # the subparsers action from ``ArgumentParser.add_subparsers`` (a private argparse type)
_BACKENDS = ("auto", "torch", "onnx")


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a line is logged (as :data:`logging.lastResort`), so the
    one handler :func:`main` installs follows a caller or test that swaps ``sys.stderr`` between calls."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> typing.TextIO:  # type: ignore[override]
        return sys.stderr


# installed on the ``boneage`` logger once, by the first call of main(): later calls only set the level
_LOG_HANDLER = _StderrHandler()
_LOG_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


# ---------------------------------------------------------------------------------------------------------------------
# shared arguments and helpers


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--image-size``, ``--lr`` ...); a flag overrides the --config file."""
    for name, (section, fld) in flat_fields().items():
        flag = "--" + name.replace("_", "-")
        is_bool = fld.type in (bool, "bool")
        default = getattr(getattr(Config(), section), name)
        kwargs: dict[str, typing.Any] = {
            "dest": f"cfg__{name}",
            "default": argparse.SUPPRESS,
            "metavar": name.upper(),
            "help": f"{section}.{name} (default: {default})",
        }
        if is_bool:
            kwargs.update(nargs="?", const="true")
        parser.add_argument(flag, **kwargs)
    parser.add_argument(
        "--pretrained-weights",
        dest="cfg__pretrained",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="ImageNet weights file for the backbone (same as --pretrained FILE)",
    )


def build_config(args: argparse.Namespace) -> Config:
    """The training config: the ``--config`` file (or the defaults) with every config flag given applied over it.

    Raises:
        ConfigError: a flag's value does not fit its field, or the result is not a valid config.
    """
    config = Config.load(args.config) if getattr(args, "config", None) else Config()
    sections = config.sections()
    fields_by_name = flat_fields(config)
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            name = key.removeprefix("cfg__")
            section_name, _ = fields_by_name[name]
            set_field(sections[section_name], name, value, f"--{name.replace('_', '-')}")
    config.validate()
    return config


def _add_data_args(parser: argparse.ArgumentParser, split_required: bool = False) -> None:
    """``--labels``, ``--images``, ``--split`` and ``--model``: a labelled image folder and the model to run on it."""
    parser.add_argument("--labels", required=True, help="CSV with id,boneage,male")
    parser.add_argument("--images", required=True, help="folder of <id>.png")
    parser.add_argument("--split", required=split_required, help="id,split CSV")
    parser.add_argument("--model", help="model folder (default: the shipped model)")


def _answer(row: dict[str, typing.Any]) -> str:
    """A prediction row in a few words: its bone age, its stage (a classifier) or why it has neither."""
    if row["status"] != "ok":
        return row["status"]
    months = row.get("bone_age_months")
    return row["stage"] if months is None else f"bone age {months:.1f} months"


def _print_report(report: dict[str, typing.Any]) -> None:
    """An export's report, one ``key: value`` line each."""
    for key, value in report.items():
        print(f"{key}: {value}")


# ---------------------------------------------------------------------------------------------------------------------
# the subcommands, in the order `boneage --help` lists them


def _add_train(commands: _Commands) -> None:
    train = commands.add_parser("train", help="train a model (seed recipe by default)")
    train.add_argument("--config", help="YAML config; flags override it")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")
    _add_config_flags(train)
    train.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from boneage.train import run_training

    config = build_config(args)
    run_dir = run_training(config, resume=args.resume)
    print(f"run folder: {run_dir}\nmodel folder: {run_dir / 'model'}")
    return 0


def _add_split(commands: _Commands) -> None:
    split = commands.add_parser("split", help="make a stratified (stage x sex) train/val/test split CSV")
    split.add_argument("--labels", required=True)
    split.add_argument("--images", help="check that every image exists")
    split.add_argument("--output", required=True)
    split.add_argument("--fractions", default="0.7,0.15,0.15")
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--drop-invalid", action="store_true")
    split.set_defaults(func=_run_split)


def _run_split(args: argparse.Namespace) -> int:
    from boneage.labels import make_split, read_labels

    fractions = tuple(float(f) for f in args.fractions.split(","))
    if len(fractions) != 3:
        raise ConfigError(f"--fractions: expected three numbers train,val,test, got {args.fractions!r}")
    labels = read_labels(labels_csv=args.labels, images_dir=args.images, drop_invalid=args.drop_invalid)
    split = make_split(labels=labels, fractions=fractions, seed=args.seed)  # type: ignore[arg-type]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(args.output, index=False)
    counts = split["split"].value_counts().to_dict()
    print(f"wrote {args.output}: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test")))
    return 0


def _add_predict(commands: _Commands) -> None:
    from boneage.backends.base import PREDICT_BATCH_SIZE

    predict = commands.add_parser(
        "predict",
        help="bone age for image files/folders (PNG, JPEG, TIFF, DICOM) -> CSV",
        description="Predict bone age. Exit status 0: every image predicted; 3: some rows failed (see the CSV's "
        "status/message columns); 2: bad arguments or model.",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument(
        "--model", help="model folder (default: the shipped model), or an .onnx file with --backend onnx"
    )
    predict.add_argument(
        "--backend",
        default="auto",
        choices=_BACKENDS,
        help="inference engine (auto: onnxruntime when the model has model.onnx or is an .onnx file, else PyTorch)",
    )
    predict.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with the mirrored image and the folder's other test-time views (--no-tta: one pass of the "
        "image as it is); default: as the model folder says",
    )
    predict.add_argument(
        "--metadata",
        help="CSV with id,male[,chronological_age_months] per image id (the file name without its image suffix)",
    )
    predict.add_argument("--sex", help="M or F, for every image without metadata")
    predict.add_argument(
        "--age",
        metavar="MONTHS",
        help="chronological age in months, for every image without metadata (adds BA-CA, SDS and the call)",
    )
    predict.add_argument(
        "--reading",
        metavar="MONTHS",
        help="your own bone age reading in months, for every image without reader_bone_age_months (or a labels "
        "CSV's boneage) in the metadata: set beside the model's, with a note when it is outside the 90%% interval",
    )
    predict.add_argument("--gradcam", metavar="DIR", help="write each image's Grad-CAM overlay PNG here")
    predict.add_argument(
        "--output",
        default="predictions.csv",
        help="prediction CSV, or JSON when it ends in .json (default: predictions.csv)",
    )
    predict.add_argument(
        "--batch-size",
        type=int,
        default=PREDICT_BATCH_SIZE,
        help=f"images per forward pass (default: {PREDICT_BATCH_SIZE}; larger batches are no faster on a CPU and "
        "hold more memory)",
    )
    predict.add_argument(
        "--dicom-report",
        metavar="DIR",
        help="for each DICOM input, a report (Secondary Capture in its study, a new series) as DIR/<id>_report.dcm",
    )
    predict.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows a stopped run of this command already wrote to --output and predict only the rest "
        "(error rows are tried again); without it --output is overwritten",
    )
    predict.add_argument(
        "--pdf-report",
        metavar="DIR",
        help="for each image read or refused, its report page to file (identification from the DICOM header or "
        "--metadata's patient_name, patient_id, birth_date, accession_number, study_date; findings, chart, "
        "radiograph, model, method) as DIR/<id>_report.pdf",
    )
    predict.add_argument(
        "--sr-report",
        metavar="DIR",
        help="for each DICOM input with a bone age, a DICOM Structured Report (TID 1500 measurements: bone age, "
        "interval, age, BA-CA, SDS, call) in its study as DIR/<id>_sr.dcm",
    )
    predict.add_argument(
        "--fhir",
        metavar="DIR",
        help="for each image with a bone age, a FHIR R4 Observation (LOINC 85151-9, months) as DIR/<id>.fhir.json",
    )
    predict.add_argument("--paper", default="a4", choices=("a4", "letter"), help="the PDF report's paper size")
    predict.add_argument("--num-workers", type=int, default=None, help="decoding workers (default: auto)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from boneage.predict import predict_paths
    from boneage.rows import plain_row, summary_line

    table = predict_paths(
        paths=args.paths,
        output=args.output,
        model_dir=args.model,
        metadata=args.metadata,
        sex=args.sex,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.quiet,
        backend=args.backend,
        tta=args.tta,
        chronological_age=args.age,
        gradcam_dir=args.gradcam,
        resume=args.resume,
        reading=args.reading,
    )
    if args.dicom_report or args.pdf_report:
        from boneage.model_folder import default_model_dir, model_name

        name = model_name(args.model or default_model_dir())
    if args.dicom_report:
        from boneage.secondary_capture import write_reports

        written = write_reports(rows=table, folder=args.dicom_report, model_name=name)
        print(f"wrote {len(written)} DICOM report(s) to {args.dicom_report}")
    if args.pdf_report:
        from boneage.inputs import patients_from_metadata
        from boneage.model_folder import default_model_dir, model_identity
        from boneage.report_pdf import write_pdf_reports

        pages, problems = write_pdf_reports(
            rows=table,
            folder=args.pdf_report,
            model=model_identity(args.model or default_model_dir()),
            paper=args.paper,
            patients=patients_from_metadata(args.metadata),
        )
        print(f"wrote {len(pages)} PDF report(s) to {args.pdf_report}")
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    if args.sr_report:
        from boneage.model_folder import default_model_dir, model_identity
        from boneage.structured_report import write_sr_reports

        written = write_sr_reports(table, args.sr_report, model_identity(args.model or default_model_dir()))
        print(f"wrote {len(written)} DICOM structured report(s) to {args.sr_report}")
    if args.fhir:
        from boneage.fhir_observation import write_observations
        from boneage.inputs import patients_from_metadata
        from boneage.model_folder import default_model_dir, model_identity

        model = model_identity(args.model or default_model_dir())
        written = write_observations(table, args.fhir, model, patients_from_metadata(args.metadata))
        print(f"wrote {len(written)} FHIR Observation(s) to {args.fhir}")
    failed = table[table["status"] != "ok"]
    if len(table) <= 20:
        for record in table.to_dict("records"):
            print(summary_line(plain_row(record)))
    counts = ", ".join(f"{n} {status}" for status, n in failed["status"].value_counts().items())
    print(
        f"wrote {args.output}: {len(table) - len(failed)} predicted" + (f"; not predicted: {counts}" if counts else "")
    )
    for message in failed["message"].head(20):
        print(f"  {message}", file=sys.stderr)  # every message names its file
    return 3 if len(failed) else 0


def _add_serve(commands: _Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="web dashboard and JSON API (POST /api/v1/predict, GET /api/v1/health)",
        description="Serve the dashboard at http://HOST:PORT/ and the API under /api/v1 (OpenAPI at /docs).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", help="model folder, or an .onnx file with --backend onnx (default: shipped model)")
    serve.add_argument(
        "--backend",
        default="auto",
        choices=_BACKENDS,
        help="inference engine (auto: PyTorch when installed, for Grad-CAM; else onnxruntime)",
    )
    serve.add_argument("--max-upload-mb", type=float, default=32.0, help="largest accepted upload (default: 32)")
    serve.add_argument(
        "--api-token",
        default=os.environ.get("BONEAGE_API_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on the API (default: $BONEAGE_API_TOKEN; the dashboard asks for "
        "it); needed to serve on any interface but loopback",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="NAME",
        help="a Host header to serve (repeatable; default: loopback names on loopback, any elsewhere)",
    )
    serve.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (with --ssl-keyfile)")
    serve.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--max-pending", type=int, default=8, help="readings running or waiting at once; more get 503 (default: 8)"
    )
    serve.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from boneage.serve import serve

    serve(
        host=args.host,
        port=args.port,
        model_dir=args.model,
        backend=args.backend,
        max_upload_mb=args.max_upload_mb,
        api_token=args.api_token,
        allowed_hosts=args.allowed_hosts,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        max_pending=args.max_pending,
    )
    return 0


def _add_sending_args(parser: argparse.ArgumentParser) -> None:
    """What ``listen`` and ``watch`` share about the reports they send."""
    parser.add_argument(
        "--send-attempts", type=int, default=3, help="tries per report send, with back-off (default: 3)"
    )
    parser.add_argument(
        "--pdf", action="store_true", help="also send the report page (the PDF report) as a DICOM Encapsulated PDF"
    )
    parser.add_argument("--paper", default="a4", choices=("a4", "letter"), help="the PDF's paper (default: a4)")


def _add_listen(commands: _Commands) -> None:
    listen = commands.add_parser(
        "listen",
        help="DICOM node for a PACS: reads every radiograph sent to it, returns a report to the study",
        description="A DICOM storage node (C-STORE and C-ECHO). Each received image is stored in OUTPUT/received, "
        "read (sex and age from its header), its row appended to OUTPUT/results.csv and a report (a Secondary "
        "Capture in the same study, a new series, and a Structured Report of the measurements beside it) written to "
        "OUTPUT/reports and, with --send-to, sent there.",
    )
    listen.add_argument("--output", required=True, help="folder for received images, reports and results.csv")
    listen.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    listen.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112)")
    listen.add_argument("--ae-title", default="BONEAGE", help="this node's AE title (default: BONEAGE)")
    listen.add_argument(
        "--send-to",
        help="where the reports go: HOST:PORT[:AE_TITLE] of a DICOM node (C-STORE), or a DICOMweb base URL "
        "(STOW-RS; a bearer token from BONEAGE_DICOMWEB_TOKEN)",
    )
    listen.add_argument("--model", help="model folder, or an .onnx file with --backend onnx (default: shipped model)")
    listen.add_argument("--backend", default="auto", choices=_BACKENDS, help="inference engine")
    listen.add_argument(
        "--allowed-calling-ae",
        action="append",
        dest="allowed_calling_aets",
        metavar="AE_TITLE",
        help="accept images only from this calling AE title (repeatable; default: any)",
    )
    listen.add_argument("--tls-cert", metavar="PEM", help="serve DICOM over TLS with this certificate (with --tls-key)")
    listen.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    listen.add_argument("--tls-ca", metavar="PEM", help="also require client certificates signed by this CA")
    _add_sending_args(listen)
    listen.set_defaults(func=_run_listen)


def _run_listen(args: argparse.Namespace) -> int:
    from boneage.pacs import listen

    listen(
        output=args.output,
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        send_to=args.send_to,
        model=args.model,
        backend=args.backend,
        allowed_calling_aets=args.allowed_calling_aets,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        send_attempts=args.send_attempts,
        pdf_paper=args.paper if args.pdf else None,
    )
    return 0


def _add_watch(commands: _Commands) -> None:
    watch = commands.add_parser(
        "watch",
        help="poll a DICOMweb archive for new hand radiographs, read them, store the reports back",
        description="Every --interval seconds, ask the archive (QIDO-RS) for series of the given modalities (and body "
        "part, and study dates), retrieve the instances not read yet (WADO-RS), read each as boneage listen does "
        "(OUTPUT/results.csv, OUTPUT/reports) and store its reports back into the study (STOW-RS). What is done is "
        "kept in OUTPUT, so a restart neither repeats nor skips. A bearer token for the archive is read from "
        "BONEAGE_DICOMWEB_TOKEN.",
    )
    watch.add_argument("--dicomweb", required=True, metavar="URL", help="the archive's DICOMweb base URL")
    watch.add_argument("--output", required=True, help="folder for retrieved images, reports, results.csv, state")
    watch.add_argument(
        "--modality",
        action="append",
        dest="modalities",
        metavar="CODE",
        help="series modality to read (repeatable; default: CR and DX)",
    )
    watch.add_argument("--body-part", help="only series with this BodyPartExamined, e.g. HAND (default: any)")
    watch.add_argument("--since", metavar="YYYYMMDD", help="only studies from this date on (default: all)")
    watch.add_argument(
        "--send-to",
        help="where the reports go instead of back to --dicomweb: HOST:PORT[:AE_TITLE] or another DICOMweb URL; "
        "'none' keeps them in OUTPUT/reports only",
    )
    watch.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default: 60)")
    watch.add_argument("--once", action="store_true", help="poll once and exit (for cron or a systemd timer)")
    watch.add_argument("--model", help="model folder, or an .onnx file with --backend onnx (default: shipped model)")
    watch.add_argument("--backend", default="auto", choices=_BACKENDS, help="inference engine")
    _add_sending_args(watch)
    watch.set_defaults(func=_run_watch)


def _run_watch(args: argparse.Namespace) -> int:
    from boneage.watch import watch

    watch(
        url=args.dicomweb,
        output=args.output,
        modalities=args.modalities,
        body_part=args.body_part,
        since=args.since,
        send_to="" if (args.send_to or "").lower() == "none" else args.send_to,
        interval=args.interval,
        once=args.once,
        model=args.model,
        backend=args.backend,
        send_attempts=args.send_attempts,
        pdf_paper=args.paper if args.pdf else None,
    )
    return 0


def _add_chart(commands: _Commands) -> None:
    chart = commands.add_parser(
        "chart",
        help="one child's visits on the chart of bone age against age, with the change between visits",
        description="Read one child's radiographs (or a boneage predict output of them), with chronological ages "
        "from the DICOM headers or --metadata, and draw the course on the chart of bone age against age; print each "
        "visit's "
        "change in bone age against its change in age, called faster or slower than age only beyond the two "
        "intervals combined.",
    )
    chart.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="one child's radiographs (files or a folder, e.g. a CD export of their studies), or a boneage predict "
        "output (CSV or JSON) of them",
    )
    chart.add_argument("--sex", help="M or F, for radiographs without PatientSex or metadata")
    chart.add_argument("--metadata", help="CSV with id,male,chronological_age_months per image (as for predict)")
    chart.add_argument("--model", help="model folder (default: the shipped model)")
    chart.add_argument(
        "--predictions-out",
        default="course_predictions.csv",
        help="where the radiographs' rows go when PATH is images (default: course_predictions.csv)",
    )
    chart.add_argument("--output", default="course.png", help="chart PNG (default: course.png)")
    chart.add_argument("--table", help="also write the visits and changes as CSV")
    chart.add_argument("--size", type=int, default=600, help="chart side in pixels (default: 600)")
    chart.set_defaults(func=_run_chart)


def _run_chart(args: argparse.Namespace) -> int:
    import csv

    from boneage.followup import (
        FOLLOW_UP_COLUMNS,
        change_text,
        follow_up,
        is_prediction_file,
        overall_change,
        read_predictions,
        visit_line,
    )
    from boneage.predict import predict_paths
    from boneage.render import LIGHT, render_age_chart

    missing = [path for path in args.paths if not Path(path).exists()]
    if missing:  # one child's few files: a wrong name is a typo to fix, not a row to skip
        raise FileNotFoundError(f"{', '.join(missing)}: file not found")
    if len(args.paths) == 1 and is_prediction_file(args.paths[0]):
        rows = read_predictions(args.paths[0])
    else:  # the child's radiographs: read them first (sex and ages from the headers, --sex, --metadata)
        table = predict_paths(
            paths=args.paths,
            output=args.predictions_out,
            model_dir=args.model,
            metadata=args.metadata,
            sex=args.sex,
        )
        print(f"wrote {args.predictions_out}: {int((table['status'] == 'ok').sum())} of {len(table)} predicted")
        rows = table.to_dict("records")
    course, skipped = follow_up(rows)
    for visit in course:
        print(visit_line(visit))
    if (overall := overall_change(course)) is not None:
        print(f"first to last visit: {change_text(overall)}")
    for reason in skipped:
        print(f"  left out: {reason}", file=sys.stderr)
    chart = render_age_chart(row=course, size=args.size, palette=LIGHT)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    chart.save(args.output)
    print(f"wrote {args.output}: {len(course)} visit(s)")
    if args.table:
        with open(args.table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FOLLOW_UP_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(course)
        print(f"wrote {args.table}")
    return 0


def _add_evaluate(commands: _Commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a prediction CSV against labels (MAE, QWK, per sex ...)")
    evaluate.add_argument("--predictions", required=True, help="CSV from boneage predict (id,bone_age_months,...)")
    evaluate.add_argument("--labels", required=True, help="CSV with id,boneage,male")
    evaluate.add_argument("--output", help="folder for metrics.json, report.txt, figures and report.html")
    evaluate.add_argument("--history", help="a run's history.json, for the training-history figure")
    evaluate.add_argument("--no-figures", action="store_true", help="metrics only")
    evaluate.add_argument("--stage-predictions", help="a stage classifier's prediction CSV for the same images")
    evaluate.add_argument(
        "--compare",
        metavar="OTHER_CSV",
        help="another model's predictions: both scored on the images both predicted, with paired bootstrap "
        "intervals for the MAE and QWK differences",
    )
    evaluate.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from boneage.evaluate import evaluate
    from boneage.metrics import format_report

    metrics = evaluate(
        predictions=args.predictions,
        labels=args.labels,
        output=args.output,
        history=args.history,
        figures=not args.no_figures,
        stage_predictions=args.stage_predictions,
        compare=args.compare,
    )
    print(format_report(metrics))
    if args.output:
        print(f"wrote {args.output}: metrics.json, report.txt" + ("" if args.no_figures else ", figures, report.html"))
    return 0


def _add_gradcam(commands: _Commands) -> None:
    gradcam = commands.add_parser("gradcam", help="Grad-CAM grid (image, heatmap, overlay) for a few radiographs")
    gradcam.add_argument("paths", nargs="+", metavar="PATH")
    gradcam.add_argument("--model", help="model folder (default: the shipped model)")
    gradcam.add_argument("--sex", help="M or F for every image")
    gradcam.add_argument("--metadata", help="CSV with id,male")
    gradcam.add_argument("--max-images", type=int, default=8)
    gradcam.add_argument("--output", default="gradcam.png")
    gradcam.set_defaults(func=_run_gradcam)


def _run_gradcam(args: argparse.Namespace) -> int:
    from boneage.backends.torch import TorchPredictor
    from boneage.explain import gradcam_grid
    from boneage.inputs import collect_images, resolve_sexes

    paths = collect_images(paths=args.paths)[: args.max_images]
    sexes = resolve_sexes(files=paths, sex=args.sex, metadata=args.metadata)
    unknown = [str(p) for p, male in zip(paths, sexes) if male is None]
    if unknown:
        raise ValueError(f"sex unknown for {', '.join(unknown)}; pass --sex M|F or --metadata CSV with id,male")
    predictor = TorchPredictor.load(model_dir=args.model)
    # the answers `boneage predict` gives
    rows = predictor.predict_files(paths=paths, sexes=list(sexes), num_workers=0)
    answers = [_answer(row) for row in rows]
    gradcam_grid(
        model=predictor.model,
        contract=predictor.contract,
        paths=paths,
        male=[bool(m) for m in sexes],
        output=args.output,
        answers=answers,
    )
    print(f"wrote {args.output} ({len(paths)} images)")
    return 0


def _add_tsne(commands: _Commands) -> None:
    tsne = commands.add_parser("tsne", help="t-SNE of the model's features, coloured by bone age and by sex")
    _add_data_args(tsne)
    tsne.add_argument("--subset", default="val", help="with --split, only that part")
    tsne.add_argument("--max-images", type=int, default=1000)
    tsne.add_argument("--output", default="tsne.png")
    tsne.set_defaults(func=_run_tsne)


def _run_tsne(args: argparse.Namespace) -> int:
    from boneage.backends.torch import TorchPredictor
    from boneage.explain import tsne_figure
    from boneage.labels import read_labels, read_split

    predictor = TorchPredictor.load(model_dir=args.model)
    table = read_labels(labels_csv=args.labels, images_dir=args.images)
    if args.split:
        table = table.merge(read_split(split_csv=args.split, labels=table), on="id")
        table = table[table["split"] == args.subset]
    tsne_figure(
        model=predictor.model,
        contract=predictor.contract,
        table=table,
        output=args.output,
        max_images=args.max_images,
    )
    print(f"wrote {args.output} ({min(args.max_images, len(table))} images)")
    return 0


def _add_ensemble(commands: _Commands) -> None:
    ensemble = commands.add_parser("ensemble", help="XGBoost on CNN features + a blend weight fit on half of val")
    _add_data_args(ensemble, split_required=True)
    ensemble.add_argument("--seed", type=int, default=0, help="seed of the val halving and XGBoost")
    ensemble.add_argument("--output", required=True)
    ensemble.set_defaults(func=_run_ensemble)


def _run_ensemble(args: argparse.Namespace) -> int:
    from boneage.blend import fit_ensemble

    summary = fit_ensemble(
        labels=args.labels,
        images=args.images,
        split=args.split,
        output=args.output,
        model_dir=args.model,
        seed=args.seed,
    )
    print(f"CNN weight fitted on the calibration half of val: {summary['cnn_weight']:.2f}")
    print(f"MAE on the evaluation half of val (n={summary['n_evaluation']}, used for neither fitting nor selection):")
    for name, value in summary["evaluation_mae_months"].items():
        print(f"  {name:<22} {value:.2f} months")
    print(f"wrote {args.output}/ensemble.json and xgboost.json")
    return 0


def _add_combine(commands: _Commands) -> None:
    combine = commands.add_parser(
        "combine", help="average several trained model folders (same architecture and data contract) into one"
    )
    combine.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model folders, e.g. runs/<name>/model")
    combine.add_argument("--output", required=True, help="the new model folder")
    combine.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored weight precision")
    combine.set_defaults(func=_run_combine)


def _run_combine(args: argparse.Namespace) -> int:
    import torch

    from boneage.model import combine_model_folders

    if Path(args.output).exists():
        raise FileExistsError(f"{args.output} already exists; choose another --output")
    combine_model_folders(folders=args.models, output=args.output, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.output}: the mean of {len(args.models)} networks")
    print(f"next: boneage export --model {args.output} --attach  (the folder then also runs on onnxruntime)")
    return 0


def _add_export(commands: _Commands) -> None:
    export = commands.add_parser("export", help="export a model folder to ONNX (dynamic batch), with a parity check")
    export.add_argument("--format", default="onnx", choices=("onnx",))
    export.add_argument("--model", help="model folder (default: the shipped model)")
    export.add_argument("--output", help="the .onnx file")
    export.add_argument(
        "--attach",
        action="store_true",
        help="write model.onnx into the model folder and record its checksum (the folder then runs on onnxruntime)",
    )
    export.add_argument("--int8", action="store_true", help="static int8 quantisation (needs --calibration)")
    export.add_argument("--calibration", nargs="+", metavar="PATH", help="images for int8 calibration")
    export.add_argument("--parity-images", nargs="+", metavar="PATH", help="real images for the parity check")
    export.add_argument("--opset", type=int, default=18)
    export.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from boneage.export import attach_onnx, export_onnx

    if args.attach:
        if args.int8 or args.output:
            raise ValueError("--attach writes the fp32 model.onnx into the model folder; drop --int8/--output")
        from boneage.model_folder import default_model_dir

        _print_report(attach_onnx(model_dir=args.model or default_model_dir()))
        return 0
    if not args.output:
        raise ValueError("export: --output FILE.onnx is required (or --attach)")
    report = export_onnx(
        output=args.output,
        model_dir=args.model,
        int8=args.int8,
        calibration=args.calibration or (),
        parity_images=args.parity_images or (),
        opset=args.opset,
    )
    _print_report(report)
    return 0


def _add_report(commands: _Commands) -> None:
    report = commands.add_parser(
        "report", help="full evaluation of a model on a labelled subset: metrics, every figure, report.html"
    )
    _add_data_args(report)
    report.add_argument("--subset", default="val", help="with --split, the part to report on")
    report.add_argument("--classifier", help="a stage classifier's model folder, scored and compared")
    report.add_argument("--ensemble", action="store_true", help="also fit and score the XGBoost ensemble")
    report.add_argument("--gradcam-images", type=int, default=8)
    report.add_argument("--tsne-images", type=int, default=1000)
    report.add_argument("--output", required=True)
    report.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from boneage.evaluation_report import build_report

    build_report(
        labels=args.labels,
        images=args.images,
        output=args.output,
        model_dir=args.model,
        split=args.split,
        subset=args.subset,
        classifier_dir=args.classifier,
        ensemble=args.ensemble,
        gradcam_images=args.gradcam_images,
        tsne_images=args.tsne_images,
    )
    print(f"wrote {Path(args.output) / 'report.html'} (metrics.json, report.txt and figures beside it)")
    return 0


def _add_calibrate(commands: _Commands) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="calibrate a prediction interval (split conformal) on labelled predictions, e.g. val"
    )
    calibrate.add_argument("--predictions", required=True, help="boneage predict CSV for labelled images")
    calibrate.add_argument("--labels", required=True, help="CSV with id,boneage,male")
    calibrate.add_argument("--coverage", type=float, default=0.9)
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the calibration/evaluation halving")
    calibrate.add_argument("--model", help="model folder to store the interval in (its config.json)")
    calibrate.add_argument(
        "--stretch",
        type=float,
        metavar="S",
        help="also fit a correction of the pull towards the mean age on the calibration half, at strength S in (0, 1] "
        "(1: the full inverse of prediction ~ a + b * reference), stored as output.correction with --model; the "
        "interval is then calibrated around the corrected predictions. Fit on predictions made without a correction",
    )
    calibrate.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="PREDICTIONS",
        help="boneage predict CSV for altered copies of the same images (same ids; e.g. cropped tightly to the hand "
        "as a clinic frames a film): calibrated together with them, each copy in its image's half (repeatable)",
    )
    calibrate.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from boneage.model_folder import read_model_description
    from boneage.uncertainty import calibrate_interval, fit_stretch_correction, store_correction, store_interval

    correction = None
    if args.stretch is not None:
        if args.model and read_model_description(args.model).get("output", {}).get("correction"):
            raise ConfigError(
                f"--stretch: {args.model} already applies an output.correction, so predictions made with it are "
                "corrected already; remove output.correction from its config.json, predict again, then fit"
            )
        correction = fit_stretch_correction(args.predictions, args.labels, seed=args.seed, strength=args.stretch)
        held = correction["evaluation"]
        stages = " / ".join(f"{v:+.2f}" for v in held["bias_by_reference_stage"].values())
        before = " / ".join(f"{v:+.2f}" for v in held["bias_by_reference_stage_uncorrected"].values())
        print(
            f"stretch correction at strength {args.stretch:g} (slope {correction['male'][0]:.4f}, intercept "
            f"{correction['male'][1]:+.2f}) from {correction['fit_on']['n']} images; on the other {held['n']}: "
            f"MAE {held['mae_months']:.2f} (uncorrected {held['mae_uncorrected_months']:.2f}), bias by reference "
            f"stage {stages} (uncorrected {before})"
        )
    interval = calibrate_interval(
        predictions=args.predictions,
        labels=args.labels,
        coverage=args.coverage,
        seed=args.seed,
        correction=correction,
        variants=args.variant,
    )
    held = interval["evaluation"]
    print(
        f"half-width {interval['half_width_months']:.2f} months from {interval['calibration']['n']} images; on the "
        f"other {held['n']}: coverage {held['coverage']:.1%} (nominal {args.coverage:.0%}), "
        f"width {held['mean_width_months']:.2f} months"
    )
    by_stage = held["coverage_by_reference_stage"]
    print("  by reference stage: " + ", ".join(f"{k} {v['coverage']:.1%} (n={v['n']})" for k, v in by_stage.items()))
    for name, copies in held.get("variants", {}).items():
        fit = interval["calibration"]["variants"][name]
        covered = f"{copies['coverage']:.1%}" if copies["coverage"] is not None else "-"
        print(
            f"  {name}: {fit['n']} copies calibrated with them; coverage {covered} of the other {copies['n']} "
            f"({fit['left_out']} copies of images not scored here left out)"
        )
    if args.model:
        if correction is not None:
            store_correction(args.model, correction)
        store_interval(model_dir=args.model, interval=interval)
        print(f"stored in {Path(args.model) / 'config.json'}")
    return 0


def _add_fit_checks(commands: _Commands) -> None:
    checks = commands.add_parser(
        "fit-checks",
        help="give a trained model folder the refusals of the shipped model (not assessable, inverted, turned)",
    )
    checks.add_argument("--model", required=True, help="the model folder to fit them for and store them in")
    checks.add_argument("--labels", required=True, help="CSV with id,boneage,male")
    checks.add_argument("--images", required=True, help="folder of <id>.png")
    checks.add_argument("--split", required=True, help="id,split CSV: fit on its train, threshold and measure on val")
    checks.add_argument("--max-train", type=int, default=3000, help="train images to fit on (default: 3000)")
    checks.add_argument(
        "--no-trained-views",
        dest="trained_views",
        action="store_false",
        help="fit the not-assessable check on the train images as given only, not also as augmented in training "
        "(the augmentation the folder records)",
    )
    checks.set_defaults(func=_run_fit_checks)


def _run_fit_checks(args: argparse.Namespace) -> int:
    from boneage.fit_checks import fit_checks

    result = fit_checks(
        model_dir=args.model,
        labels=args.labels,
        images=args.images,
        split=args.split,
        max_train=args.max_train,
        trained_views=args.trained_views,
    )
    refusal, polarity, orientation = result["assessability"], result["polarity"]["val"], result["orientation"]["val"]
    learnt = "as given and as augmented in training" if "trained_views" in refusal else "as given only"
    print(
        f"not assessable: learnt the train images {learnt}; threshold set on {refusal['threshold_set_on']}; "
        "on the other half of val "
        f"{refusal['acceptance_heldout_val']:.1%} accepted (n={refusal['n_heldout_val']}); "
        f"{refusal['rejection_non_hand']:.0%} of {len(refusal['non_hand_scores'])} non-hand images refused"
    )
    print(
        f"inverted: on val (n={polarity['n']}) {polarity['as_given_called_inverted']} called inverted as given, "
        f"{polarity['negatives_called_inverted']} of {polarity['n']} negatives"
    )
    print(
        f"turned: on val {orientation['as_given_called_turned']} called turned as given, "
        f"{orientation['turned_called_turned']} of {orientation['n_turned']} turned copies"
    )
    again = " (model.onnx exported again)" if "onnx" in result else ""
    print(f"stored in {Path(args.model) / 'config.json'}{again}")
    return 0


def _add_validate(commands: _Commands) -> None:
    validate = commands.add_parser("validate", help="check a labels CSV and its image folder")
    validate.add_argument("--labels", required=True)
    validate.add_argument("--images", required=True)
    validate.add_argument("--decode", action="store_true", help="also decode every image")
    validate.set_defaults(func=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from boneage.labels import read_labels

    labels = read_labels(labels_csv=args.labels, images_dir=args.images)
    bad = 0
    if args.decode:
        from boneage.errors import ImageReadError
        from boneage.imageio import read_image

        for path in labels["path"]:
            try:
                read_image(path)
            except ImageReadError as err:
                bad += 1
                print(f"unreadable: {err}", file=sys.stderr)
    print(
        f"{args.labels}: {len(labels)} valid rows, {int(labels['male'].sum())} male, "
        f"ages {labels['boneage'].min():g}-{labels['boneage'].max():g} months"
        + (f"; {bad} unreadable image(s)" if args.decode else "")
    )
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------------------
# the parser and the entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``boneage`` parser: the global flags and every subcommand, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="boneage", description="Skeletal (bone) age from hand radiographs.")
    parser.add_argument("--version", action="version", version=f"boneage {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; errors with their traceback")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_split(commands)
    _add_predict(commands)
    _add_serve(commands)
    _add_listen(commands)
    _add_watch(commands)
    _add_chart(commands)
    _add_evaluate(commands)
    _add_gradcam(commands)
    _add_tsne(commands)
    _add_ensemble(commands)
    _add_combine(commands)
    _add_export(commands)
    _add_report(commands)
    _add_calibrate(commands)
    _add_fit_checks(commands)
    _add_validate(commands)
    return parser


def _one_line_error(err: Exception, command: str) -> Exception:
    """A missing optional dependency as the extra that provides it; any other error as it is."""
    torch_parts = ("torch", "torchvision", "timm", "lightning", "safetensors", "sklearn")
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "pynetdicom":
        err = ImportError(f"`boneage {command}` needs pynetdicom: pip install 'boneage[pacs]' ({err})")
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in torch_parts:
        err = ImportError(f"`boneage {command}` needs PyTorch and its stack: pip install 'boneage[torch]' ({err})")
    return err


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``boneage`` with ``argv`` (default: the process's arguments) and return its exit status.

    Exit status 0: done; 2: bad arguments, input or model, or a server that cannot be reached (one line on stderr;
    ``-v`` shows the traceback); 1: stdout closed early; a command may return others (``predict``: 3 when some rows
    failed; ``validate``: 1).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    package_logger = logging.getLogger("boneage")
    if _LOG_HANDLER not in package_logger.handlers:  # once per process, however often main() is called
        package_logger.addHandler(_LOG_HANDLER)
    package_logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader stopped reading (`boneage predict ... | head`); the files are already written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 1
    except (BoneAgeError, ValueError, ImportError, FileNotFoundError, FileExistsError, ConnectionError) as err:
        if args.verbose:
            raise
        print(f"boneage {args.command}: error: {_one_line_error(err, args.command)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
