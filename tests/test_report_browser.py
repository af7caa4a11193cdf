"""The report in a real browser: headless Chromium opens it offline, every figure renders, no console
errors, no network request; a screenshot of each report is saved under the test's tmp folder.

Chromium is driven over the DevTools protocol (websocket-client). Debian's `chromium` package is
installed by .ci/run; without it (or when it does not start) the test skips with the reason on a
laptop and fails under CI=true (tests/required.py).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from report_helpers import make_study
from required import require

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--remote-debugging-port=0", "--remote-allow-origins=*", "--allow-file-access-from-files",
         # WebGL (3-D scatter, parallel coordinates) in software on machines without a GPU.
         "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]

pytestmark = pytest.mark.slow


class Chromium:
    """A headless Chromium and one page, spoken to over the DevTools protocol."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        import websocket

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port: {err}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(50):
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
            pages = [p for p in pages if p.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout,
                                              suppress_origin=True)
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries, and requests that left the file."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append("log: " + p["entry"]["text"])
            elif m == "Network.requestWillBeSent":
                url = p["request"]["url"]
                if not url.startswith(("file:", "data:", "blob:", "about:")):
                    out.append("network request: " + url)
        return out

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.send("Browser.close")
                except Exception:
                    pass
                self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


_FIGURES_JS = """(() => Array.from(document.querySelectorAll('section.figure')).map(s => {
  const plot = s.querySelector('.js-plotly-plot');
  return {id: s.dataset.figure, drawn: s.dataset.drawn === '1',
          rendered: !!(plot && plot._fullLayout && plot.querySelector('.main-svg')),
          traces: plot && plot._fullData ? plot._fullData.length : 0,
          height: plot ? plot.getBoundingClientRect().height : 0,
          webgl: plot ? plot.querySelectorAll('canvas').length : 0};
}))()"""


def test_reports_render_in_chromium(tmp_path):
    require(CHROMIUM, "chromium", "not installed (apt-get install chromium; .ci/run does it)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        require(False, "websocket-client", "not installed (a dev dependency: pip install -e '.[dev]')")
    from mergesearch.report import build_report, save_report
    from mergesearch.study import load_study

    reports = {}
    for m in (1, 2, 3, 4):  # every Pareto view: score per trial, 2-D, 3-D (WebGL), parallel coordinates
        url = make_study(tmp_path, m, name=f"study{m}")
        out = tmp_path / f"report{m}.html"
        rep = build_report(load_study(url))
        save_report(rep, out)
        reports[m] = (out, rep.figures)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    try:
        browser = Chromium(profile)
    except (RuntimeError, OSError) as exc:
        require(False, "chromium", f"installed but does not start here: {exc}")
    try:
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.send(f"{domain}.enable")
        browser.send("Emulation.setDeviceMetricsOverride", width=1360, height=900, deviceScaleFactor=1, mobile=False)
        for m, (out, expected) in reports.items():
            browser.send("Page.navigate", url=out.resolve().as_uri())
            browser.wait_event("Page.loadEventFired", timeout=60)
            deadline = time.monotonic() + 30
            while True:
                figs = browser.evaluate(_FIGURES_JS)
                if all(f["rendered"] for f in figs if f["drawn"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert [f["id"] for f in figs if f["drawn"]] == expected, figs
            assert expected == ["pareto", "history", "heatmap", "importance", "overfit", "timing"]
            for f in figs:
                assert f["rendered"] and f["traces"] > 0 and f["height"] > 200, (m, f)
            assert browser.evaluate("document.querySelectorAll('#scores tbody tr').length") == 6  # 5 baselines + best
            headline = browser.evaluate("document.querySelector('#summary').innerText")
            assert "Best found: trial" in headline and "best baseline" in headline
            if m >= 3:  # 3-D scatter and parallel coordinates draw with WebGL
                assert figs[0]["webgl"] > 0, figs[0]
            height = browser.evaluate("document.documentElement.scrollHeight")
            shot = browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                clip=dict(x=0, y=0, width=1360, height=height, scale=1))
            png = tmp_path / f"report{m}.png"
            png.write_bytes(base64.b64decode(shot["data"]))
            assert png.stat().st_size > 20_000
        assert browser.problems() == []
    finally:
        browser.close()
