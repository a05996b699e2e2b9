"""The web service keeps uninvited users out and stays responsive: upload limits while streaming, an optional API
token, a Host check, security headers, offline docs, every status in the OpenAPI, one log line per request, and a
bounded queue under load (a real uvicorn server on a loopback port for the last ones)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from tests.helpers import synthetic_radiograph

pytest.importorskip("fastapi")
pytest.importorskip("fastapi_offline")
from fastapi.testclient import TestClient  # noqa: E402

from boneage.serve import create_app, serve  # noqa: E402


def png(age: float = 100, size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_radiograph(age, size=size)).save(buffer, format="PNG")
    return buffer.getvalue()


HAND = png()


@pytest.fixture(scope="module")
def guarded(tiny_model):
    app = create_app(
        tiny_model, max_upload_bytes=200_000, api_token="s3cret", allowed_hosts=["127.0.0.1", "testserver"]
    )
    return TestClient(app, raise_server_exceptions=False)


def test_the_api_token_is_required_and_compared_exactly(guarded):
    upload = {"files": {"file": ("h.png", HAND, "image/png")}, "data": {"sex": "F"}}
    missing = guarded.post("/api/v1/predict", **upload)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert guarded.post("/api/v1/predict", headers={"Authorization": "Bearer s3cre"}, **upload).status_code == 401
    assert guarded.post("/api/v1/report.pdf", headers={"Authorization": "Basic s3cret"}, **upload).status_code == 401
    ok = guarded.post("/api/v1/predict", headers={"Authorization": "Bearer s3cret"}, **upload)
    assert ok.status_code == 200 and ok.json()["status"] == "ok"
    assert guarded.get("/api/v1/health").status_code == 200 and guarded.get("/").status_code == 200  # open


def test_an_unknown_host_header_is_refused(guarded):
    assert guarded.get("/api/v1/health", headers={"Host": "evil.example"}).status_code == 400
    assert guarded.get("/api/v1/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_security_headers_and_no_caching_of_results(guarded):
    page = guarded.get("/")
    for response in (page, guarded.get("/api/v1/health")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert guarded.get("/api/v1/health").headers["cache-control"] == "no-store"


def test_docs_load_from_the_package_without_a_cdn(guarded):
    docs = guarded.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert not any(cdn in docs.text for cdn in ("cdn.jsdelivr", "unpkg.com", "cdnjs", "https://"))
    assets = [part.split('"')[0] for part in docs.text.split('src="')[1:] + docs.text.split('href="')[1:]]
    assert assets and all(guarded.get(asset).status_code == 200 for asset in assets if asset.startswith("/"))


def test_every_status_the_api_answers_is_in_the_openapi(guarded):
    paths = guarded.get("/openapi.json").json()["paths"]
    for route in ("/api/v1/predict", "/api/v1/report.dcm", "/api/v1/report.pdf"):
        assert {"200", "400", "401", "413", "415", "422", "503"} <= set(paths[route]["post"]["responses"]), route


def test_an_upload_without_content_length_is_cut_off_at_the_limit(guarded):
    pulled = 0

    def body():
        nonlocal pulled
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(64):  # 4 MiB, streamed: no Content-Length
            pulled += 1
            yield b"\0" * 65536

    headers = {"Content-Type": "multipart/form-data; boundary=b", "Authorization": "Bearer s3cret"}
    response = guarded.post("/api/v1/predict", content=body(), headers=headers)
    assert response.status_code == 413 and "the limit is 200,000 bytes" in response.json()["detail"]
    assert guarded.get("/api/v1/health").status_code == 200


def test_serving_beyond_loopback_needs_a_token_and_tls_needs_its_key():
    with pytest.raises(ValueError, match="needs an API token"):
        serve(host="0.0.0.0", port=1)
    with pytest.raises(ValueError, match="go together"):
        serve(host="127.0.0.1", port=1, ssl_certfile="cert.pem")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tiny_model, tmp_path_factory):
    """``boneage serve`` as a user starts it, on a loopback port, with a small queue; stopped after the tests."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "boneage", "serve", "--port", str(port), "--model", str(tiny_model)]
    with open(log, "w") as handle:
        process = subprocess.Popen([*command, "--max-pending", "2"], stdout=handle, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail(f"boneage serve did not start: {log.read_text()[-2000:]}")
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow  # starts boneage serve in its own process
def test_one_log_line_per_request_and_loopback_hosts_only(live_server):
    import httpx

    url, log = live_server
    httpx.get(url + "/api/v1/health?probe=one-line")
    assert httpx.get(url + "/api/v1/health", headers={"Host": "evil.example"}).status_code == 400
    time.sleep(0.5)
    lines = [line for line in log.read_text().splitlines() if "GET /api/v1/health" in line]
    numbers = [line.split("request ")[1].split()[0] for line in lines]
    assert numbers and len(numbers) == len(set(numbers)), lines  # no request logged twice


@pytest.mark.slow  # starts boneage serve in its own process
def test_health_answers_at_once_and_a_full_queue_gets_503_with_retry_after(live_server):
    import httpx

    url, _ = live_server
    big = png(120, size=1024)  # a second or so per reading on 2 cores with the tiny model, Grad-CAM included
    answers: list[httpx.Response] = []

    def reading() -> None:
        files = {"file": ("h.png", big, "image/png")}
        answers.append(
            httpx.post(url + "/api/v1/predict", files=files, data={"sex": "F", "gradcam": "true"}, timeout=120)
        )

    threads = [threading.Thread(target=reading) for _ in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    waits = []
    for _ in range(5):
        start = time.perf_counter()
        assert httpx.get(url + "/api/v1/health", timeout=10).status_code == 200
        waits.append(time.perf_counter() - start)
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    statuses = sorted(response.status_code for response in answers)
    assert max(waits) < 1.0, waits
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    busy = next(response for response in answers if response.status_code == 503)
    assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
