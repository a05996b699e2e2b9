"""End to end: the dashboard in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time

import pytest
from PIL import Image

from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
uvicorn = pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # a real browser and a real server: about 15 s; CI runs it in its second step
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(app):
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(200):
        if instance.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from boneage.serve import create_app
    from boneage.uncertainty import store_interval

    model = make_tiny_model(tmp_path_factory.mktemp("browser") / "model")
    store_interval(model, {"half_width_months": 12.0, "coverage_nominal": 0.9})  # calibrated, as shipped models are
    yield from _serve(create_app(model))


@pytest.fixture(scope="module")
def shipped_server():
    """The shipped model, which refuses images (the tiny test model has no refusal check)."""
    pytest.importorskip("onnxruntime")
    from boneage.serve import create_app

    yield from _serve(create_app(backend="onnx"))


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait_for(driver, condition, timeout=60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_upload_shows_bone_age_sds_call_and_overlay(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100, size=96)).save(image)
    browser.get(server + "/")
    assert "boneage" in browser.title
    browser.find_element(By.ID, "file").send_keys(str(image))
    Select(browser.find_element(By.ID, "sex")).select_by_value("F")
    browser.find_element(By.ID, "age-years").send_keys("8")
    browser.find_element(By.CSS_SELECTOR, "#patient summary").click()  # the PDF's identification, folded away
    browser.find_element(By.ID, "patient-id").send_keys("WEB-12")
    Select(browser.find_element(By.ID, "paper")).select_by_value("letter")
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "bone-age").text or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert "months" in browser.find_element(By.ID, "bone-age").text
    sent = browser.execute_script(
        "return [lastForm.get('patient_id'), lastForm.get('paper'), lastForm.get('birth_date')]"
    )
    assert sent == ["WEB-12", "letter", None]  # what the report downloads post; an empty field is left out
    assert browser.find_element(By.ID, "chronological").text.startswith("96.0 months")
    sds = browser.find_element(By.ID, "sds").text.replace("−", "-")  # e.g. +1.23 (90% interval -0.20 to +2.66)
    point, low, high = (
        float(x) for x in re.fullmatch(r"([+-][\d.]+) \(90% interval ([+-][\d.]+) to ([+-][\d.]+)\).*", sds).groups()
    )
    assert low < point < high
    assert browser.find_element(By.ID, "call").text in {"normal", "delayed", "advanced"}
    assert "Female" in browser.find_element(By.ID, "sex-shown").text
    assert "tf_efficientnet_lite0" in browser.find_element(By.ID, "model").text
    for element_id in ("radiograph", "overlay"):  # both images decoded and shown
        width = browser.execute_script(f"return document.getElementById('{element_id}').naturalWidth")
        assert width == 96
    assert not browser.find_element(By.ID, "dicom-report").is_displayed()  # a PNG has no study to report into
    assert browser.find_element(By.ID, "pdf-report").is_displayed()  # but a page to print or file, any format
    status, kind, head = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/report.pdf', {method: 'POST', body: lastForm})"
        ".then(async r => done([r.status, r.headers.get('content-type'), (await r.text()).slice(0, 5)]));"
    )
    assert (status, kind, head) == (200, "application/pdf", "%PDF-")
    # the chart of bone age against age: the child inside the shaded range exactly when the call is normal
    assert browser.find_element(By.ID, "chart").is_displayed()
    call = browser.find_element(By.ID, "call").text
    point = browser.find_element(By.ID, "chart-point")
    assert point.get_attribute("class") == call
    inside = browser.execute_script(
        "const svg = document.getElementById('chart-svg'), p = document.getElementById('chart-point');"
        "const at = svg.createSVGPoint(); at.x = p.cx.baseVal.value; at.y = p.cy.baseVal.value;"
        "return svg.querySelector('.band').isPointInFill(at);"
    )
    assert inside == (call == "normal")
    assert not browser.find_element(By.ID, "reading-row").is_displayed()  # no reading given
    assert not browser.find_elements(By.ID, "chart-reading")
    browser.find_element(By.ID, "reading-years").send_keys("19")  # a reading far above the model's
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_elements(By.ID, "chart-reading"))
    reading_y, point_y = (
        float(browser.find_element(By.ID, key).get_attribute("cy")) for key in ("chart-reading", "chart-point")
    )
    assert reading_y < point_y  # drawn higher on the chart: an older bone age
    browser.find_element(By.ID, "age-years").clear()  # the next upload has no age: no chart
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "report").is_displayed())
    assert browser.find_element(By.ID, "chronological").text == "not given"
    assert not browser.find_element(By.ID, "chart").is_displayed()
    reading = browser.find_element(By.ID, "reading").text
    assert reading.startswith("228.0 months (19y 0m), ") and "months above the model's" in reading
    assert "is outside the model's 90% interval" in reading and "reader" not in browser.find_element(By.ID, "sds").text


def test_a_result_prints_without_the_form(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100, size=96)).save(image)
    browser.get(server + "/")
    assert not browser.find_element(By.ID, "print").is_displayed()  # nothing to print yet
    browser.find_element(By.ID, "file").send_keys(str(image))
    Select(browser.find_element(By.ID, "sex")).select_by_value("M")
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "bone-age").text or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "print").is_displayed()
    assert not browser.find_element(By.ID, "printed").is_displayed()  # the stamp is for paper only
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        assert not browser.find_element(By.ID, "form").is_displayed()
        assert not browser.find_element(By.ID, "print").is_displayed()
        assert browser.find_element(By.ID, "report").is_displayed()
        assert browser.find_element(By.ID, "printed").text.startswith("Assessed ")
        assert "hand.png" in browser.find_element(By.ID, "printed").text
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})


def test_dicom_upload_offers_the_dicom_report(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    dicom = write_dicom(tmp_path / "hand.dcm", synthetic_radiograph(100, size=96).astype("uint16") * 16, PatientSex="M")
    browser.get(server + "/")
    browser.find_element(By.ID, "file").send_keys(str(dicom))
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "bone-age").text or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    assert "from DICOM" in browser.find_element(By.ID, "sex-shown").text
    button = browser.find_element(By.ID, "dicom-report")
    assert button.is_displayed() and browser.find_element(By.ID, "sr-report").is_displayed()
    # what the button posts: the page's last form, answered with a DICOM file
    status, kind = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/report.dcm', {method: 'POST', body: lastForm})"
        ".then(r => done([r.status, r.headers.get('content-type')]));"
    )
    assert (status, kind) == (200, "application/dicom")
    button.click()
    assert browser.find_element(By.ID, "error").text == ""


def test_bad_upload_shows_the_server_message(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.get(server + "/")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "error").text)
    assert "unsupported file type" in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "report").get_attribute("hidden") is not None  # no result shown


def test_a_failed_upload_after_a_result_clears_that_result(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    good, bad = tmp_path / "hand.png", tmp_path / "notes.png"
    Image.fromarray(synthetic_radiograph(120, size=96)).save(good)
    bad.write_text("not an image")
    browser.get(server + "/")
    assert not browser.find_element(By.ID, "images").is_displayed()  # no empty image frames before an upload
    browser.find_element(By.ID, "file").send_keys(str(good))
    Select(browser.find_element(By.ID, "sex")).select_by_value("F")
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "bone-age").text or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "report").is_displayed()
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "error").text)
    for element in ("report", "images", "dicom-report"):
        assert not browser.find_element(By.ID, element).is_displayed(), element
    assert "No result for notes.png" in browser.find_element(By.ID, "empty").text


def test_a_refused_upload_is_shown_as_uploaded(shipped_server, browser, tmp_path):
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 240), 128, dtype=np.uint8)).save(blank)  # a blank film: refused
    browser.get(shipped_server + "/")
    browser.find_element(By.ID, "file").send_keys(str(blank))
    Select(browser.find_element(By.ID, "sex")).select_by_value("M")
    browser.find_element(By.ID, "submit").click()
    _wait_for(browser, lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("not assessable")
    assert not browser.find_element(By.ID, "report").is_displayed()
    assert browser.find_element(By.ID, "images").is_displayed()
    assert not browser.find_element(By.ID, "overlay").is_displayed()
    _wait_for(browser, lambda d: d.execute_script("return document.getElementById('radiograph').naturalWidth") == 240)


def test_a_server_with_a_token_is_asked_for_it_once_per_tab(browser, tmp_path, tiny_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import alert_is_present
    from selenium.webdriver.support.ui import Select

    from boneage.serve import create_app

    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100, size=96)).save(image)
    for url in _serve(create_app(tiny_model, api_token="ward-7")):
        browser.get(url + "/")
        browser.execute_script("sessionStorage.clear()")
        browser.find_element(By.ID, "file").send_keys(str(image))
        Select(browser.find_element(By.ID, "sex")).select_by_value("M")
        browser.find_element(By.ID, "submit").click()
        prompt = _wait_for(browser, alert_is_present())  # the server answered 401: the page asks
        assert "API token" in prompt.text
        prompt.send_keys("ward-7")
        prompt.accept()
        _wait_for(browser, lambda d: d.find_element(By.ID, "bone-age").text or d.find_element(By.ID, "error").text)
        assert (
            browser.find_element(By.ID, "error").text == "" and "months" in browser.find_element(By.ID, "bone-age").text
        )
        browser.find_element(By.ID, "submit").click()  # the token is kept for the tab: no second question
        time.sleep(1.0)
        _wait_for(browser, lambda d: d.find_element(By.ID, "bone-age").text)
        assert browser.execute_script("return sessionStorage.getItem('boneage-token')") == "ward-7"
