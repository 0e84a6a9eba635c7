"""Debian's headless Chromium, driven through Debian's chromedriver by Selenium.

    with chromium() as browser:
        browser.get(url)

Both binaries come from apt (scripts/setup.sh installs ``chromium`` and
``chromium-driver``): the driver path and the browser path are given, so
Selenium never looks for or downloads a browser of its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/lib/chromium/chromium"  # the binary (/usr/bin/chromium is a shell wrapper)
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1440, height: int = 1000) -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="l7proxy-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--force-device-scale-factor=1",
        "--lang=en-US",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
