"""The report in a real browser: headless Chromium renders it without console errors, every
image loads, the page fits a 1280 px wide window, and a screenshot is saved. Skips when Chromium
is not installed (Debian: apt-get install chromium). Set FRACTALBENCH_SCREENSHOT=PATH to keep a
copy of the screenshot."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="headless Chromium not installed (/usr/bin/chromium; apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
LOGGING = ["--enable-logging=stderr", "--v=0"]

PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener("error", function (e) {
  var src = String((e.target && (e.target.src || "").slice(0, 40)) || "");
  window.__errors.push(String(e.message || e.type) + " " + src);
}, true);
</script>"""
PROBE_BODY = """<script>window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  var out = document.createElement("pre"); out.id = "fb-probe";
  out.textContent = "FBPROBE" + JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors,
                                                 sections: document.querySelectorAll("section").length}) + "FBPROBE";
  document.body.appendChild(out);
});</script>"""


WIDTH_PROBE = """<script>window.addEventListener("load", function () {
  function widths() {
    var table = document.querySelector("#summary table");
    var box = table.parentElement;
    return {page: document.documentElement.scrollWidth, body: document.body.scrollWidth,
            table_right: table.getBoundingClientRect().right, box_scroll: box.scrollWidth, box_client: box.clientWidth,
            headline_top: document.querySelector("#headline img").getBoundingClientRect().top};
  }
  var closed = widths();
  Array.prototype.forEach.call(document.querySelectorAll("details"), function (d) { d.open = true; });
  var opened = widths();
  var out = document.createElement("pre"); out.id = "fb-width";
  out.textContent = "FBWIDTH" + JSON.stringify({closed: closed, opened: opened, inner: window.innerWidth}) + "FBWIDTH";
  document.body.appendChild(out);
});</script>"""


def instrumented(report: Path, probe: str, name: str) -> Path:
    """A copy of the report with a probe script (the report's own CSP forbids scripts)."""
    text = report.read_text()
    text = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    copy = report.with_name(name)
    copy.write_text(text.replace("</body>", probe + "</body>", 1))
    return copy


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_without_console_errors(reported_run, tmp_path):
    report = reported_run[1]
    proc = chromium(tmp_path, *LOGGING, "--virtual-time-budget=5000", "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Summary per model" in proc.stdout  # it rendered the report
    # the report has no script, so any console message is a problem: a CSP violation means it tried
    # to load something from elsewhere, an injected script would also show up here
    assert console_messages(proc.stderr) == []


def test_every_image_loads(reported_run, tmp_path):
    report = reported_run[1]
    text = report.read_text()
    # an instrumented copy: the probe scripts need script-src, which the report's CSP forbids
    text = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    text = text.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1)
    probe = report.with_name("report_probe.html")
    probe.write_text(text)
    proc = chromium(tmp_path, *LOGGING, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"FBPROBE(.*?)FBPROBE", proc.stdout)
    assert found, f"the probe did not run; console: {console_messages(proc.stderr)}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["images"] >= 9 and result["broken"] == 0 and result["errors"] == [], result
    assert result["sections"] >= 9
    assert console_messages(proc.stderr) == []


def test_page_fits_a_1280_px_window(reported_run, tmp_path):
    probe = instrumented(reported_run[1], WIDTH_PROBE, "report_width_probe.html")
    proc = chromium(tmp_path, "--window-size=1280,900", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="fb-width">FBWIDTH(.*?)FBWIDTH', proc.stdout)
    assert found, f"the probe did not run; console: {console_messages(proc.stderr)}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["inner"] == 1280, result
    closed, opened = result["closed"], result["opened"]
    # no horizontal scrolling: not as first shown, and not with every section opened (wide tables
    # scroll inside their own box)
    assert closed["page"] <= 1280 and closed["body"] <= 1280 and opened["page"] <= 1280, result
    # the summary table fits as it is, without scrolling inside its box
    assert closed["table_right"] <= 1280 and closed["box_scroll"] <= closed["box_client"], result
    assert closed["headline_top"] < 200, result  # the headline plot opens the page


def test_screenshot(reported_run, tmp_path):
    shot = tmp_path / "report.png"
    proc = chromium(tmp_path, "--screenshot=" + str(shot), "--window-size=1280,2000", reported_run[1].as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 50_000  # a rendered page, not a blank one
    keep = os.environ.get("FRACTALBENCH_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_probe_detects_a_broken_image_and_a_script_error(tmp_path):
    """Negative control: the same probe and console check do catch what they look for."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head>" + PROBE_HEAD + "</head><body>"
                    '<img src="data:image/png;base64,AAAA"><script>notDefined()</script>'
                    + PROBE_BODY + "</body></html>")
    proc = chromium(tmp_path, *LOGGING, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    result = json.loads(re.search(r"FBPROBE(.*?)FBPROBE", proc.stdout).group(1).replace("&quot;", '"'))
    assert result["broken"] == 1 and any("notDefined" in e for e in result["errors"])
    assert any("notDefined" in line for line in console_messages(proc.stderr))
