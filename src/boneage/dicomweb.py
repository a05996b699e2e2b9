"""DICOMweb transport: store (STOW-RS), search (QIDO-RS) and retrieve (WADO-RS) through ``dicomweb-client``.

A server that needs a bearer token gets it from the environment variable ``BONEAGE_DICOMWEB_TOKEN`` (never from the
command line, where other users of the machine can read it). Every failure is raised as ``ConnectionError`` naming the
server and what it answered, never with a patient detail."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

TOKEN_ENV = "BONEAGE_DICOMWEB_TOKEN"


def is_dicomweb_url(text: str) -> bool:
    """Whether ``--send-to``/``--dicomweb`` names a DICOMweb base URL (rather than ``HOST:PORT[:AE_TITLE]``)."""
    return text.lower().startswith(("http://", "https://"))


def check_url(text: str, field: str = "--dicomweb") -> str:
    """A DICOMweb base URL (``http(s)://host[:port]/path``), without its trailing slash; ValueError otherwise."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{field}: expected a DICOMweb base URL such as http://pacs:8042/dicom-web, got {text!r}")
    return text.rstrip("/")


def connect(url: str, timeout: float = 30.0) -> Any:
    """A ``DICOMwebClient`` for the base URL ``url``, with the bearer token from ``BONEAGE_DICOMWEB_TOKEN`` if set."""
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise ImportError("DICOMweb needs dicomweb-client: pip install 'boneage[pacs]'") from None
    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = DICOMwebClient(check_url(url), headers=headers, timeout=timeout)
    # no retries inside the client (five, half a minute per failure): the node and the watcher retry themselves, and
    # a stop must not wait behind a dead server
    client.set_http_retry_params(retry=False)
    return client


def _reason(err: Exception) -> str:
    """What went wrong, in a few words: the HTTP status, or the network error (not the whole request)."""
    response = getattr(err, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    errno = re.search(r"\[Errno -?\d+\] [^'\")]*", str(err))
    if errno:
        return f"cannot connect ({errno.group(0)})"
    return f"{type(err).__name__}: {str(err)[:200]}"


def store(client: Any, datasets: list[Any]) -> None:
    """STOW-RS the datasets in one request. Raises ConnectionError when the server is unreachable, answers with an
    HTTP error, or lists any of them as failed."""
    try:
        response = client.store_instances(datasets)
    except Exception as err:  # requests' errors, and dicomweb-client's own for a malformed answer
        raise ConnectionError(f"STOW-RS to {client.base_url}: {_reason(err)}") from None
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
        raise ConnectionError(f"STOW-RS to {client.base_url}: {len(failed)} instance(s) refused (reason {reasons})")


PAGE = 500  # QIDO-RS results asked for per request
ROOT_HINT = "is this the archive's DICOMweb root (e.g. http://host:8042/dicom-web)?"


def _search(client: Any, search: Any, **query: Any) -> list[dict[str, Any]]:
    """Every QIDO-RS result of ``search`` (a client method), asked for a page at a time. An answer that is not a list
    of DICOM JSON objects (a URL that is not the DICOMweb root answers with something else) or a page that repeats
    (a server ignoring ``offset``) is an error, never an endless loop."""
    found: list[dict[str, Any]] = []
    previous = None
    while True:
        try:
            page = search(limit=PAGE, offset=len(found), **query)
        except Exception as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            hint = f"; {ROOT_HINT}" if status in (400, 404, 405) else ""
            raise ConnectionError(f"QIDO-RS at {client.base_url}: {_reason(err)}{hint}") from None
        if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
            raise ConnectionError(f"QIDO-RS at {client.base_url}: the answer is not DICOM JSON; {ROOT_HINT}")
        if not page:
            return found
        if page == previous:
            raise ConnectionError(f"QIDO-RS at {client.base_url}: the server answers every page alike (offset ignored)")
        found.extend(page)
        if len(page) < PAGE:
            return found
        previous = page


def search_series(client: Any, filters: dict[str, str]) -> list[dict[str, Any]]:
    """QIDO-RS series matching ``filters`` (DICOM keywords), each as ``{"study", "series", "instances"}``."""
    found = _search(
        client,
        client.search_for_series,
        search_filters=filters,
        fields=["StudyInstanceUID", "NumberOfSeriesRelatedInstances"],
    )
    series = []
    for item in found:
        study, uid = _value(item, "0020000D"), _value(item, "0020000E")
        if study and uid:
            count = _value(item, "00201209")
            series.append({"study": str(study), "series": str(uid), "instances": int(count) if count else None})
    return series


def search_instances(client: Any, study: str, series: str) -> list[str]:
    """The SOP Instance UIDs of one series (QIDO-RS)."""
    found = _search(
        client,
        client.search_for_instances,
        study_instance_uid=study,
        series_instance_uid=series,
        fields=["SOPInstanceUID"],
    )
    return [str(uid) for uid in (_value(item, "00080018") for item in found) if uid]


def retrieve(client: Any, study: str, series: str, instance: str) -> Any:
    """One instance as a pydicom Dataset (WADO-RS), in the transfer syntax the server stored it in."""
    try:
        return client.retrieve_instance(study, series, instance, media_types=(("application/dicom", "*"),))
    except Exception as err:
        raise ConnectionError(f"WADO-RS from {client.base_url}: {_reason(err)}") from None


def _value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = (element.get("Value") if isinstance(element, dict) else None) or [None]
    return values[0]
