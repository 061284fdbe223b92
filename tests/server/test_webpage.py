"""The web page in headless Chromium, against a live server on the tiny random model.

Needs ``apt-get install -y --no-install-recommends chromium chromium-driver`` (Debian); skips
cleanly without them. The render test only needs ``/usr/bin/chromium`` (``--dump-dom``); the
interaction tests drive the page through chromedriver's W3C WebDriver HTTP API with plain httpx
(no selenium): upload an image and chat, draw with live previews.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from liveserver import free_port, running  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def url(tiny_dir):
    import zuoyou.api
    from zuoyou.server.app import create_app

    app = create_app(zuoyou.api.load(tiny_dir, device="cpu"), model_id="tiny")
    with running(app) as base:
        yield base


def test_page_renders(url):
    out = subprocess.run([CHROMIUM, *ARGS, "--virtual-time-budget=5000", "--dump-dom", url + "/"],
                         capture_output=True, text=True, timeout=60).stdout
    assert 'id="chat-form"' in out and 'id="draw-form"' in out
    assert 'data-ready="1"' in out and 'data-model="tiny"' in out  # app.js ran and reached /health
    assert "draws 16×16" in out


class WebDriver:
    """The few W3C WebDriver calls we need, over chromedriver's HTTP API."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen([DRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.time() + 20
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": CHROMIUM, "args": ARGS}}}}
        self.sid = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        r = self.http.request(method, path, json=body)
        value = r.json()["value"]
        assert r.status_code == 200, value
        return value

    def get(self, url):
        self.call("POST", f"/session/{self.sid}/url", {"url": url})

    def js(self, script, *args):
        return self.call("POST", f"/session/{self.sid}/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        v = self.call("POST", f"/session/{self.sid}/element", {"using": "css selector", "value": css})
        return next(iter(v.values()))

    def send_keys(self, element, text):
        self.call("POST", f"/session/{self.sid}/element/{element}/value", {"text": text})

    def wait(self, script, timeout=60):
        deadline = time.time() + timeout
        while not (v := self.js(script)):
            assert time.time() < deadline, f"timed out waiting for: {script}"
            time.sleep(0.2)
        return v

    def close(self):
        try:
            self.call("DELETE", f"/session/{self.sid}")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def driver():
    if not os.path.exists(DRIVER):
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    d = WebDriver()
    yield d
    d.close()


def test_draw_with_live_previews(url, driver):
    driver.get(url + "/?draw=a+red+circle&n=2&seed=1")
    driver.wait("return document.body.dataset.drawn === '1'")
    state = driver.js("""return {
        imgs: [...document.querySelectorAll('#gallery img')].map(i => [i.src.slice(0, 22), i.naturalWidth]),
        captions: [...document.querySelectorAll('#gallery figcaption')].map(c => c.textContent),
        previews: Number(document.body.dataset.previews || 0)};""")
    assert state["imgs"] == [["data:image/png;base64,", 16]] * 2
    assert state["captions"] == ["a red circle"] * 2
    assert state["previews"] >= 2  # partial images were shown while drawing


def test_chat_with_uploaded_image(url, driver, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (24, 24), (220, 20, 20)).save(path)
    driver.get(url + "/")
    driver.wait("return document.body.dataset.ready === '1'")
    driver.js("document.getElementById('chat-max').value = 4")
    driver.send_keys(driver.find("#chat-image"), str(path))
    driver.wait("return document.querySelectorAll('#attachments img').length === 1")
    driver.send_keys(driver.find("#chat-input"), "What color is the circle?")
    driver.js("document.getElementById('chat-form').requestSubmit()")
    driver.wait("return document.body.dataset.answered === '1'")
    msgs = driver.js("return [...document.querySelectorAll('#messages .msg')].map(m => "
                     "[m.className, m.querySelectorAll('img').length, m.textContent])")
    assert msgs[0] == ["msg user", 1, "What color is the circle?"]
    assert msgs[1][0] == "msg assistant" and not msgs[1][2].startswith("error"), msgs
