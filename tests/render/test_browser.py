"""Every ``xai/`` image renders in TensorBoard's Images dashboard, checked in a real browser (headless Chromium).

A small fit with every image callback writes its event files; a real TensorBoard serves them on 127.0.0.1; Selenium
drives Debian's ``chromium`` and ``chromedriver`` (``apt-get install chromium chromium-driver``; ``.ci/run`` installs
them) to the Images dashboard, a few tags at a time (a tag filter per page, as TensorBoard shows 12 cards per page),
waits for the images, and checks that each one loaded (non-zero natural size, the size logged) and is not blank
(drawn on a canvas: many distinct colours). Without Chromium, its driver or Selenium the test is skipped, saying which.

``python tests/render/test_browser.py --logdir runs/shortcut_digits/shortcut --filter xai/attribution --out
docs/img/tensorboard.png`` takes the README's screenshot the same way.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Dict, List, Optional

import pytest

CHROMIUM = ("/usr/bin/chromium", "chromium")
CHROMEDRIVER = ("/usr/bin/chromedriver", "chromedriver")
PAGE = 12  # cards per page of a TensorBoard dashboard category

# every <img> of the page, through the shadow roots, with the tag of its tf-image-loader and whether it is blank
_IMAGES_JS = """
const found = [];
const walk = (root) => { for (const el of root.querySelectorAll('*')) {
    if (el.tagName === 'IMG') found.push(el);
    if (el.shadowRoot) walk(el.shadowRoot);
} };
walk(document);
return found.map((img) => {
    const host = img.getRootNode().host;
    let colours = 0;
    if (img.complete && img.naturalWidth > 0) {
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        const seen = new Set();
        for (let i = 0; i < data.length && seen.size < 64; i += 4 * 7) {
            seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        }
        colours = seen.size;
    }
    return {tag: host ? host.tag : null, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
            shown: img.clientWidth, colours: colours};
});
"""


def _which(candidates) -> Optional[str]:
    for c in candidates:
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.path.exists(path):
            return path
    return None


def browser_missing() -> Optional[str]:
    """Why the browser check cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if _which(CHROMIUM) is None or _which(CHROMEDRIVER) is None:
        return ("Chromium or its driver is not installed (Debian: apt-get install chromium chromium-driver; "
                ".ci/run installs them)")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """A real TensorBoard serving ``logdir`` on 127.0.0.1 (a free port), stopped by its process id on exit."""

    def __init__(self, logdir: str) -> None:
        self.logdir, self.port, self.proc = str(logdir), _free_port(), None

    def __enter__(self) -> "TensorBoard":
        self.proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", self.logdir, "--host",
                                      "127.0.0.1", "--port", str(self.port), "--load_fast", "false"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_tags(self, wanted: List[str], timeout: float = 60) -> None:
        """Until the images plugin lists every tag in ``wanted``."""
        import json

        deadline, listed = time.time() + timeout, set()
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/data/plugin/images/tags", timeout=2) as resp:
                    listed = {t for run in json.loads(resp.read()).values() for t in run}
                if set(wanted) <= listed:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"TensorBoard never listed {sorted(set(wanted) - listed)[:5]}")


def chromium(width: int = 1600, height: int = 1200):
    """Headless Chromium driven by Selenium, with the driver given explicitly (no download attempt)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(_which(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # --headless=new ignores the window size
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def open_images(driver, tb: TensorBoard, tag_filter: str) -> None:
    driver.get("about:blank")  # a new page: changing only the # part would not reload the dashboard
    driver.get(f"{tb.url}/#images&tagFilter={urllib.parse.quote(tag_filter, safe='')}")


def rendered_images(driver, tags: List[str], timeout: float = 30) -> Dict[str, dict]:
    """The page's ``<img>`` of each tag once every one of ``tags`` has loaded (or the timeout passed)."""
    deadline, found = time.time() + timeout, {}
    while time.time() < deadline:
        found = {im["tag"]: im for im in driver.execute_script(_IMAGES_JS) if im["tag"] in tags}
        if len(found) == len(tags) and all(im["complete"] and im["width"] > 0 for im in found.values()):
            break
        time.sleep(0.25)
    return found


def _chunks(tags: List[str]) -> List[List[str]]:
    return [tags[i:i + PAGE] for i in range(0, len(tags), PAGE)]


def _exact(tags: List[str]) -> str:
    return "^(" + "|".join(re.escape(t) for t in tags) + ")$"


# --------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def event_dir(tmp_path_factory):
    import pytorch_lightning as pl

    from helpers import DigitsModule, digits_loaders, tiny_trainer
    from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                               SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor)
    from lightning_xai.shortcuts import ShortcutConfig

    tmp = tmp_path_factory.mktemp("browser")
    pl.seed_everything(0)
    callbacks = [
        AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 8})), probe_samples=10),
        LinearProbeMonitor(layers=["net.0.2", "net.1.3"]),
        FeatureVisMonitor(targets=[("logits", range(10)), ("net.0.3", "channels", range(4))], steps=8,
                          every_n_epochs=1),
        ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=30, action="log",
                        config=ShortcutConfig(num_controls=2, donor_draws=1)),
        ShortcutDiscovery(probe_samples=30, action="log", config=ShortcutConfig(num_controls=2, donor_draws=1)),
        SampleInfluenceMonitor(probe_samples=4, k=3, support_k=3, num_representers=2, num_suspects=6, num_sparse=2,
                               max_train_samples=64, every_n_epochs=1),
        ProjectionMonitor(layers=["net.1.3"], probe_samples=32),
    ]
    train, val = digits_loaders(n_train=192, n_val=64)
    trainer = tiny_trainer(tmp, callbacks=callbacks, max_epochs=1)
    trainer.fit(DigitsModule(), train, val)
    return tmp / "tb" / "version_0"


def test_every_xai_image_renders_in_tensorboard(event_dir):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    from helpers import read_events

    acc = read_events(event_dir)
    logged = {t: acc.Images(t)[-1] for t in acc.Tags()["images"] if t.startswith("xai/")}
    areas = {t.split("/")[1] for t in logged}
    assert {"attribution", "probe", "featvis", "shortcut", "samples", "projection"} <= areas
    with TensorBoard(event_dir) as tb:
        tb.wait_for_tags(sorted(logged))
        driver = chromium()
        try:
            for chunk in _chunks(sorted(logged)):
                open_images(driver, tb, _exact(chunk))
                found = rendered_images(driver, chunk)
                assert sorted(found) == chunk, f"not on the page: {sorted(set(chunk) - set(found))}"
                for tag, im in found.items():
                    event = logged[tag]
                    assert im["complete"] and (im["width"], im["height"]) == (event.width, event.height), (tag, im)
                    assert im["shown"] > 0 and im["colours"] >= 8, (tag, im)  # drawn, and not a blank image
        finally:
            driver.quit()


# --------------------------------------------------------------------------- the README's screenshot
def screenshot(logdir: str, tag_filter: str, out: str, width: int = 1280, height: int = 900) -> None:
    """A screenshot of the Images dashboard over ``logdir``, filtered to ``tag_filter``, once its images loaded."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    tags = sorted({t for run in mux.Runs().values() for t in run.get("images", []) if re.search(tag_filter, t)})
    with TensorBoard(logdir) as tb:
        tb.wait_for_tags(tags)
        driver = chromium(width, height)
        try:
            open_images(driver, tb, tag_filter)
            rendered_images(driver, tags[:PAGE])
            time.sleep(1.0)  # the cards' step sliders and headings settle
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(out)
        finally:
            driver.quit()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot of TensorBoard's Images dashboard, made as the test does.")
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--filter", default="xai/attribution")
    parser.add_argument("--out", default=os.path.join("docs", "img", "tensorboard.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    reason = browser_missing()
    if reason:
        sys.exit(reason)
    screenshot(args.logdir, args.filter, args.out, args.width, args.height)
    print(f"wrote {args.out}")
