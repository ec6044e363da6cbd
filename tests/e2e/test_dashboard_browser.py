"""The dashboard in a real headless Chromium against a running network.

Debian's ``/usr/bin/chromium`` driven by ``/usr/bin/chromedriver`` over the
W3C WebDriver protocol (plain HTTP with ``requests``: no extra client
library). Each page must load with data, log no console error and draw its
charts; screenshots go to ``test-output/dashboard/``.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support.polling import eventually_over_http

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-output" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1600",
]

CANVASES_DRAWN = """
return Array.from(document.querySelectorAll('canvas[data-chart]')).map(c => {
  const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
  return {id: c.id, drawn: c.dataset.drawn === 'true', painted: painted};
});
"""


class Browser:
    """The few WebDriver commands the test needs."""

    def __init__(self, driver_url: str, profile: Path):
        self.url = driver_url
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        answer = self._call(
            "post", "/session", {"capabilities": {"alwaysMatch": capabilities}}
        )
        self.session = f"/session/{answer['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        response = getattr(requests, method)(f"{self.url}{path}", json=body, timeout=60)
        value = response.json()["value"]
        assert response.ok, value
        return value

    def get(self, url: str) -> None:
        self._call("post", f"{self.session}/url", {"url": url})

    def run(self, script: str, *args):
        return self._call(
            "post", f"{self.session}/execute/sync", {"script": script, "args": args}
        )

    def console(self) -> list[dict]:
        return self._call("post", f"{self.session}/se/log", {"type": "browser"})

    def screenshot(self, name: str) -> None:
        png = base64.b64decode(self._call("get", f"{self.session}/screenshot"))
        (SCREENSHOTS / f"{name}.png").write_bytes(png)

    def quit(self) -> None:
        requests.delete(f"{self.url}{self.session}", timeout=30)


@pytest.fixture
def network(launch_network):
    return launch_network("--heartbeat-interval", "2").credentials


@pytest.fixture
def browser(tmp_path, free_port):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        eventually_over_http(
            lambda: requests.get(f"{url}/status", timeout=2).json()["value"]["ready"],
            90,
            "chromedriver",
        )
        session = Browser(url, tmp_path / "chromium-profile")
        try:
            yield session
        finally:
            session.quit()
    finally:
        driver.terminate()
        driver.wait(timeout=30)
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_dashboard_pages_load_with_data_and_draw_charts(network, browser):
    portal = network["portal"]
    eventually_over_http(
        lambda: (
            requests.get(f"{portal}/api/v1/network/summary", timeout=5).json()[
                "redeemed_fen"
            ]
            > 0
        ),
        60,
        "subsidies in the national view",
    )
    # Sign in as the national admin, through the page's own form.
    browser.get(f"{portal}/login")
    browser.run(
        "document.getElementById('token').value = arguments[0];"
        "document.forms[0].submit();",
        network["national_admin_token"],
    )
    eventually_over_http(
        lambda: "signed in" in browser.run("return document.body.innerText"),
        20,
        "the sign-in",
    )

    voucher = next(iter(network["demo_vouchers"].values()))
    datacenter = next(iter(network["datacenters"]))
    pages = {
        "national": ("/", "#cities tr:nth-child(2)", 3),
        # budget bars and the burn-down over time
        "city": ("/cities/shanghai", "#vouchers tr:nth-child(2)", 2),
        "datacenter": (f"/datacenters/{datacenter}", "#inventory tr:nth-child(2)", 1),
        "voucher": (f"/vouchers/{voucher}", "#redemptions tr:nth-child(2)", 1),
        # refused and held shares per data centre, the review queues
        "integrity": ("/integrity", "#integrity tr:nth-child(2)", 0),
    }
    for name, (path, data_row, charts) in pages.items():
        browser.get(f"{portal}{path}")
        assert browser.run(
            "return document.querySelector(arguments[0]) !== null", data_row
        ), (name, data_row, browser.run("return document.body.innerText")[:600])
        drawn = browser.run(CANVASES_DRAWN)
        assert len(drawn) == charts, (name, drawn)
        assert all(c["drawn"] and c["painted"] > 0 for c in drawn), (name, drawn)
        browser.screenshot(name)
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == [], (name, errors)
