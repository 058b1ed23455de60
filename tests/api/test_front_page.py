"""The interactive front (``front.html``) in a real headless browser, Debian's Chromium, with no network at all.

The page of the ``finished`` digits run is opened in a network namespace without interfaces (so nothing can be
fetched: the plotting library must be in the page); the rendered DOM must hold one marker per trial, front point,
uniform configuration and the dense model; a real mouse move over a front point must show its hover text; a
screenshot must not be blank.
"""

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from flora_ray.storage.run_store import ARTEFACTS
from flora_ray.testing import skip_unless_ci

pytestmark = pytest.mark.slow

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
HOVER_PROBE = """<script>
window.addEventListener('load', function () {
  setTimeout(function () {  // a real mouse move over the first front point, where plotly listens for it
    var point = document.querySelectorAll('#front g.trace.scatter')[1].querySelector('path.point');
    var box = point.getBoundingClientRect();
    var x = box.left + box.width / 2, y = box.top + box.height / 2;
    document.querySelector('#front .nsewdrag').dispatchEvent(
      new MouseEvent('mousemove', {clientX: x, clientY: y, bubbles: true}));
    setTimeout(function () {
      var text = document.querySelector('#front .hovertext');
      var out = document.createElement('pre');
      out.id = 'hovered';
      out.textContent = text ? text.textContent : 'NO HOVER';
      document.body.appendChild(out);
    }, 500);
  }, 500);
});
</script>"""


@pytest.fixture(scope="module")
def browser():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        skip_unless_ci(
            "no headless Chromium (make tools installs Debian's chromium-headless-shell)", "front.html's test"
        )
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--net", "true"]).returncode != 0:
        skip_unless_ci("cannot make a network namespace here (unshare --net needs root)", "front.html's test")
    return found


def _offline(browser, *args, timeout=120):
    """Chromium in a network namespace of its own (no interfaces): any fetch of the page would fail."""
    command = ["unshare", "--net", browser, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_the_page_renders_offline_with_every_point_and_hover_text(finished, browser, tmp_path):
    run, *_ = finished
    page = run.store.local_path(ARTEFACTS.front_html)
    html = page.read_text()
    assert "<script src=" not in html.replace('<script src="data:', "")  # nothing loaded from elsewhere
    assert f"]({ARTEFACTS.front_html})" in run.report  # the report links it
    result = _offline(browser, "--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout[result.stdout.index('<div id="front"') :]
    traces = re.split(r'<g class="trace scatter', dom)[1:]
    complete = run.trials[run.trials["state"] == "COMPLETE"]
    expected = [len(complete), len(run.front), len(run.uniform), 1]  # trials, front, uniform, dense
    assert [len(re.findall(r'class="point\b', t.split("</g></g>")[0])) for t in traces] == expected, expected

    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", HOVER_PROBE + "</body>"))
    result = _offline(browser, "--dump-dom", probe.as_uri())
    hovered = re.search(r'<pre id="hovered">(.*?)</pre>', result.stdout, re.S).group(1)
    first = run.front.sort_values("macs").iloc[0]
    blocks = json.loads(first["triples"])
    assert hovered.startswith(f"trial {int(first['trial'])}"), hovered
    assert f"b0 {'/'.join(map(str, blocks[0]))}" in hovered and f"{first['macs'] / 1e6:.3f} MMACs" in hovered
    assert f"accuracy {first['accuracy']:.2f}%" in hovered and "M params" in hovered and "ms predicted" in hovered


def test_a_screenshot_is_not_blank(finished, browser, tmp_path):
    run, *_ = finished
    shot = tmp_path / "front.png"
    page = run.store.local_path(ARTEFACTS.front_html)
    result = _offline(browser, "--window-size=1000,700", f"--screenshot={shot}", page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 700)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # axes, text, markers in several colours: not a blank or single-colour page
    reds = sum(n for n, (r, g, b) in colours if r > 180 and g < 90 and b < 90)  # the dense model's red star
    assert reds > 20
