"""Screenshot of the dashboard after uploading one radiograph (headless Chromium via Selenium).

Usage (from the repository root):
    python tools/dashboard_screenshot.py IMAGE --sex F --age-years 12 [--reading-years 14] --output dashboard.png
        [--model DIR]

The screenshot shows whatever image is uploaded; do not commit screenshots of patient or dataset images.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image")
    parser.add_argument("--sex", choices=("M", "F"), required=True)
    parser.add_argument("--age-years", default="")
    parser.add_argument("--age-months", default="")
    parser.add_argument("--reading-years", default="", help="your own reading, to show beside the model's")
    parser.add_argument("--reading-months", default="")
    parser.add_argument("--model")
    parser.add_argument("--output", default="dashboard.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not shutil.which("chromedriver"):
        parser.error("needs headless Chromium and its driver on PATH: apt-get install chromium chromium-driver")

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from boneage.serve import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.model), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "file").send_keys(str(__import__("pathlib").Path(args.image).resolve()))
        Select(driver.find_element(By.ID, "sex")).select_by_value(args.sex)
        driver.find_element(By.ID, "age-years").send_keys(args.age_years)
        driver.find_element(By.ID, "age-months").send_keys(args.age_months)
        driver.find_element(By.ID, "reading-years").send_keys(args.reading_years)
        driver.find_element(By.ID, "reading-months").send_keys(args.reading_months)
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "bone-age").text or d.find_element(By.ID, "error").text
        )
        time.sleep(0.5)  # let the images paint
        # the whole page, the chart below the images included
        driver.set_window_size(1440, max(800, driver.execute_script("return document.body.scrollHeight") + 140))
        time.sleep(0.3)
        driver.save_screenshot(args.output)
        print(f"wrote {args.output}: bone age {driver.find_element(By.ID, 'bone-age').text!r}")
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
