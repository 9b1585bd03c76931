"""The run report in headless Chromium: no console errors, thumbnails and curves render, every link resolves, and
its text reads as written for people (no Python literals, no hashes, singular nouns).

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending
in NUL on file descriptors 3 and 4), so no websocket client or driver package is needed.
"""
import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from test_report import make_run
from evaluation import report
from unicom_ds import config

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]


@pytest.fixture(scope="module")
def chromium_binary():
    if CHROMIUM is None:
        reason = "headless Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the browser test")
        pytest.skip(reason)
    return CHROMIUM


class Browser:
    """One Chromium process and one page, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        self.timeout, self.events, self._next, self._buf = timeout, [], 0, b""
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, res_w)]

        def child_fds():  # Chromium reads commands on fd 3 and answers on fd 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (cmd_r, res_w, *high):
            os.close(fd)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=1280, height=900,
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        while True:
            found = next((e for e in self.events if e.get("method") == method), None)
            if found:
                return found
            self.events.append(self._read())

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert and failed loads the page produced so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("exception", {}).get("description")
                           or p["exceptionDetails"]["text"])
            elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def open(self, path: Path) -> None:
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_event("Page.loadEventFired")

    def screenshot(self, clip: dict) -> np.ndarray:
        data = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                         clip={**clip, "scale": 1})["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)


@pytest.fixture()
def browser(chromium_binary, tmp_path):
    b = Browser(chromium_binary, tmp_path / "profile")
    yield b
    b.close()


# Every src/href as written and as the browser resolved it, every image's decoded size, where the thumbnail
# grid and the curves are (null when absent), and the page's text.
PAGE_FACTS = """((box = sel => { const e = document.querySelector(sel), r = e && e.getBoundingClientRect();
                           return r && {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; }) => ({
  refs: [...document.querySelectorAll('[src],[href]')].map(e => {
    const attr = e.hasAttribute('src') ? 'src' : 'href';
    return {raw: e.getAttribute(attr), url: e[attr]};
  }),
  imgs: [...document.images].map(i => ({src: i.getAttribute('src'), alt: i.alt, w: i.naturalWidth, done: i.complete})),
  grid: box('.grid'),
  curves: box('.curves'),
  text: document.body.textContent,
}))()"""


def test_report_loads_clean_thumbnails_render_links_resolve(browser, tmp_path):
    run = make_run(tmp_path / "run")["run"]
    labels = {stem: np.load(run / "labels" / f"{stem}.npy") for stem in ("00000", "00001")}
    for values in labels.values():
        values[values == 5] = 3
    labels["00000"][0] = 5  # class 5 holds one image, shard 0's first (a readable one)
    for stem, values in labels.items():
        np.save(run / "labels" / f"{stem}.npy", values)
    index = report.build_report(run, config.resolve([f"run_dir={run}", "report.classes=10", "progress=off"]))
    browser.open(index)
    facts = browser.evaluate(PAGE_FACTS)
    assert browser.errors() == []

    thumbs = [i for i in facts["imgs"] if i["src"].startswith("thumbs/")]
    assert len(thumbs) == len(list((index.parent / "thumbs").glob("*.jpg"))) > 0
    assert all(i["done"] and i["w"] > 0 for i in facts["imgs"]), facts["imgs"]
    for ref in facts["refs"]:
        assert "://" not in ref["raw"] and not ref["raw"].startswith("/"), f"not relative: {ref['raw']}"
        url = urlparse(ref["url"])
        assert url.scheme == "file" and Path(unquote(url.path)).is_file(), f"broken link {ref['raw']}"

    pixels = browser.screenshot(facts["grid"])
    assert pixels.shape[0] > 40 and pixels.shape[1] > 40
    assert pixels.std() > 20  # photos, not an empty box or broken-image icons on white
    curves = browser.screenshot(facts["curves"])
    assert curves.shape[1] > 400 and (curves < 128).mean() > 0.01  # drawn lines and labels on white

    text = facts["text"]  # all of it, the closed config included
    for literal in ("False", "True", "None"):
        assert not re.search(rf"\b{literal}\b", text), literal
    assert "sha256" not in text and not re.search(r"\b[0-9a-f]{64}\b", text)
    assert "class 5 \u00b7 1 image" in text and "1 images" not in text
    assert "Training loss" in [i["alt"] for i in facts["imgs"]]  # curves titled in words


def test_the_check_sees_a_broken_page(browser, tmp_path):
    """The checks above can fail: a missing image and a script error are both reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><div class="grid"><img src="thumbs/missing.jpg"></div>'
                    "<script>undefinedFunction()</script></body></html>")
    browser.open(page)
    facts = browser.evaluate(PAGE_FACTS)
    errors = browser.errors()
    assert any("undefinedFunction" in e for e in errors), errors
    assert any("missing.jpg" in e or "ERR_FILE_NOT_FOUND" in e for e in errors), errors
    assert facts["imgs"][0]["w"] == 0
