"""What the annotator sees: Label Studio 1.23's own UI in a real headless chromium, driven by selenium.

One Label Studio and one `clipseg serve` (tiny random-weight model, PRECISION=fp32 so masks are exact, no worker,
PREDICT_BUDGET=4 s) for the module; one browser, logged in through Label Studio's login page as a user would.
Project "small" (the README's labeling config, four 320x240 scenes) and project "big" (1,000 small scenes, more
than the /predict budget allows) are connected to the backend as Settings -> Model -> Connect does it (API).

- Data manager: select two tasks -> Actions -> Retrieve Predictions -> OK; open a task: the brush masks are drawn
  where the stored RLE says (screenshots with and without "Hide all regions", sampled at each image pixel's
  centre on screen, IoU >= 0.9 with the decoded masks); the "Prediction score" column shows the stored scores.
- Editor, Auto-Annotation on: a phrase typed in the TextArea comes back as a suggestion drawn where the backend's
  mask is (same pixel comparison); accepted and submitted, it is the annotation's region.
- Editor, Auto-Annotation on, project "box" (the README's config plus a smart RectangleLabels, issue 28): the smart
  rectangle tool, the box's label, a box dragged around an object: the backend's answer to the box as a visual
  prompt is drawn as a suggestion (same pixel comparison with the accepted region's RLE), in the box's label and
  inside the box.
- Editor: type two lines in the TextArea, paint a brush stroke, Submit: `clipseg corrections` lists that stroke
  with the line just typed (not the older one).
- Project "ending" (a dozen tasks, on a second `clipseg serve` whose budget they exceed): select all -> Retrieve
  Predictions: the model card says the run is queued, waiting for a worker; a real `clipseg worker` is started and
  takes it; reloading, the card says "12 tasks pre-labelled at HH:MM UTC with <version>" (its "pre-labelling: N of
  M" title is screenshotted when a reload happens to catch it, never asserted), and the data manager's footer and
  score column show the 12 predictions.
- After that run, a new version of the ending project is activated as a promotion: the worker re-predicts the
  unannotated tasks and the "Prediction score" column shows the new version's scores (none on the annotated task).
- Big project: select all -> Retrieve Predictions: the model card (Settings -> Model) says a pre-label run was
  queued (Label Studio itself shows nothing of the backend's 503).

Measured (2 cores shared with other sessions, LS venv and template cached): 43 s for the file at load 1.5-2,
91-135 s at load 3-15 before the ending project; with it 153 s at load 6-10 (103 s without it in the same hour):
its test takes 32-47 s (the worker's start and model load ~13 s of it), the second backend ~5-15 s of the fixtures
(Label Studio, two backends, 1,012 tasks imported: 37-47 s).
2026-12-07, with the box and promotion tests (the backends now load while Label Studio starts; one worker for the
ending and promotion tests): 130 s for the file at load 4-6 (fixtures 38 s, box test 13 s, promotion test 5 s);
the same file before them took 112 s at load 3-5. Later that day, with workers that exit at once (they could wait
60 s on RQ's pub/sub thread) and settle-waits instead of fixed sleeps: 78-80 s at load ~1, three runs.

Failures save a screenshot and the page's HTML under test-artifacts/browser/ (paths printed); passing runs leave
the screenshots docs/ may use there too. Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's `chromium`
and `chromium-driver`; `.ci/run` installs them).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from finetune.metrics import iou
from tests.conftest import REDIS_TEST_URL
from tests.e2e.ls_harness import DEFAULT_LEGACY_TOKEN, LabelStudioServer, ManagedProcess, free_port
from tests.e2e.test_backend_e2e import clipseg_command, decode_brush, scene_png, wait_backend_ready, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WINDOW = (1400, 1000)
PLACEHOLDER = "e.g. left player"
# The README's labeling config, verbatim.
README_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="player"/><Label value="ball"/>
  </BrushLabels>
  <!-- optional: type a phrase, the mask comes back at once -->
  <TextArea name="prompt" toName="image" editable="true" showSubmitButton="true" placeholder="e.g. left player"/>
  <!-- optional, RefCOCO style: a phrase per task in task data (or set PROMPT_FIELD) -->
  <Header value="$expression"/>
</View>"""
# The README's config with its visual-prompt line (a smart box; docs/visual_prompts.md), under the BrushLabels so
# that its labels show above the editor's bottom bar in this window. Its one label is the brush's second, so a box
# answered as "the first label" (no visual prompt) is told apart.
BOX_LABEL = "ball"
BOX_CONFIG = README_CONFIG.replace(
    "  </BrushLabels>\n",
    f'  </BrushLabels>\n  <RectangleLabels name="box" toName="image" smart="true"><Label value="{BOX_LABEL}"/></RectangleLabels>\n')
SMALL_SIZE = (320, 240)
# The budget (estimate = tasks x measured seconds per task x 1.5): 2 tasks fit while a task takes < 1.3 s (the tiny
# model takes 0.01-0.3 s here, 1 s on a first call under load), 1,000 do not while it takes > 0.003 s.
N_BIG = 1000
PREDICT_BUDGET_S = 4.0
# The second backend has measured nothing when the ending project's selection arrives, so it assumes 1 s per task:
# 12 tasks are estimated at 18 s, over its budget whatever the machine's speed.
N_ENDING = 12
ENDING_BUDGET_S = 1.0


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def small_scene(i: int) -> bytes:
    """A 64x48 PNG with a red circle somewhere (the big project's tasks)."""
    image = Image.new("RGB", (64, 48), (235, 235, 235))
    x = i % 40
    ImageDraw.Draw(image).ellipse((x, 4, x + 20, 24), fill=(220, 20, 20))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """`wait_for` over a page: a predicate that raises (an element not drawn yet) counts as not yet."""
    return wait_for(predicate, timeout, what, interval, ignore_errors=True)


@dataclass
class Studio:
    ls: LabelStudioServer
    backend: ManagedProcess
    small: int
    big: int
    typed: int  # "Use predictions to pre-label" and "retrieve predictions on task load" off: a blank canvas
    small_tasks: list[int]
    typed_task: int
    typed_ml: int
    version: str
    budgeted: ManagedProcess  # the second backend, PREDICT_BUDGET=ENDING_BUDGET_S, serving only `ending`
    ending: int
    ending_tasks: list[int]
    box: int  # BOX_CONFIG, pre-labelling off like `typed`
    box_task: int
    tmp: Path
    worker: ManagedProcess | None = None  # the pre-label worker, while one runs (start_worker / stop_worker)

    @property
    def client(self):
        return self.ls.client

    def logs(self, *more: ManagedProcess) -> str:
        procs = "".join(f"--- {p.name}\n{p.log_tail(30)}\n" for p in (self.backend, *more))
        return f"{procs}--- label studio\n{self.ls.log_tail(20)}"

    def start_worker(self) -> ManagedProcess:
        """A real `clipseg worker` for pre-label runs (the one running, else a new one): the tests that need one
        share it, since its start and model load take ~13 s here."""
        from finetune.triggers import PRELABEL_QUEUE  # pre-label jobs only: never a fine-tune the webhooks queued

        if self.worker is None or not self.worker.alive():
            self.worker = ManagedProcess(
                [*clipseg_command(), "worker", "--name", "browser-worker", "--queues", PRELABEL_QUEUE],
                env={"MODEL": self.budgeted.env["MODEL"], "DATA_DIR": str(self.tmp / "data-worker"),
                     "REDIS_URL": REDIS_TEST_URL, "LABEL_STUDIO_URL": self.ls.url,
                     "LABEL_STUDIO_API_KEY": self.ls.legacy_token, "LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)},
                cwd=ROOT, log_path=self.tmp / "worker.log", name="worker").start()
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()


@pytest.fixture(scope="module")
def studio(tiny_model_factory, tmp_path_factory):
    import redis

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: install Debian's chromium and chromium-driver (.ci/run does)")
    model_dir = tiny_model_factory("tiny-clipseg")
    conn = redis.Redis.from_url(REDIS_TEST_URL)
    conn.flushdb()
    tmp = tmp_path_factory.mktemp("browser-e2e")
    with contextlib.ExitStack() as resources:
        # The backends import torch and load their model while Label Studio starts (its port and legacy token are
        # chosen up front): ~10 s less than one after the other.
        ls_port = free_port()
        ls_url = f"http://127.0.0.1:{ls_port}"
        backends = []
        for name, extra in (("backend", {"PREDICT_BUDGET": str(PREDICT_BUDGET_S)}),
                            ("budgeted", {"PREDICT_BUDGET": str(ENDING_BUDGET_S), "PRELABEL_CHUNK": "4"})):
            port = free_port(avoid=[ls_port])
            proc = ManagedProcess(
                [*clipseg_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker",
                 "--no-scheduler"],
                env={"MODEL": str(model_dir), "DATA_DIR": str(tmp / f"data-{name}"), "REDIS_URL": REDIS_TEST_URL,
                     "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": DEFAULT_LEGACY_TOKEN, "LOG_LEVEL": "INFO",
                     "PRECISION": "fp32", **extra},
                cwd=ROOT, log_path=tmp / f"{name}.log", name=name)
            resources.callback(proc.stop)
            backends.append(proc.start())  # both load at once
            proc.health_url = f"http://127.0.0.1:{port}/health"
        ls = resources.enter_context(LabelStudioServer("legacy", port=ls_port))
        assert (ls.url, ls.legacy_token) == (ls_url, DEFAULT_LEGACY_TOKEN), (ls.url, ls.legacy_token)
        for proc in backends:
            proc.wait_ready()
            wait_backend_ready(proc)
        backend, budgeted = backends
        c = ls.client
        small = c.create_project("browser small", README_CONFIG)
        c.import_tasks(small, [{"image": data_url(scene_png(*SMALL_SIZE)[0])} for _ in range(4)])
        big = c.create_project("browser big", README_CONFIG)
        c.import_tasks(big, [{"image": data_url(small_scene(i))} for i in range(N_BIG)])
        typed = c.create_project("browser typed", README_CONFIG, show_collab_predictions=False,
                                 evaluate_predictions_automatically=False)
        c.import_tasks(typed, [{"image": data_url(scene_png(*SMALL_SIZE)[0])}])
        ending = c.create_project("browser ending", README_CONFIG)
        c.import_tasks(ending, [{"image": data_url(small_scene(i))} for i in range(N_ENDING)])
        box = c.create_project("browser box", BOX_CONFIG, show_collab_predictions=False,
                               evaluate_predictions_automatically=False)
        c.import_tasks(box, [{"image": data_url(scene_png(*SMALL_SIZE)[0])}])
        ml_ids = [c.add_ml_backend(project, backend.base_url, "clipseg", is_interactive=True)
                  for project in (small, big, typed, box)]
        c.add_ml_backend(ending, budgeted.base_url, "clipseg", is_interactive=False)
        small_tasks = sorted(t["id"] for t in c.tasks(small))
        (typed_task,) = [t["id"] for t in c.tasks(typed)]
        version = requests.get(f"{backend.base_url}/health", timeout=10).json()["model_version"]
        # The budget estimates a request from the time per task measured so far (1 s before any): one task, which
        # always runs, measures the tiny model, as the first interactive suggestion of a session would.
        r = requests.post(f"{backend.base_url}/predict", json={
            "tasks": [c.task(small_tasks[-1])], "project": f"{small}.0", "label_config": README_CONFIG}, timeout=60)
        assert r.status_code == 200, r.text
        (box_task,) = [t["id"] for t in c.tasks(box)]
        studio = Studio(ls, backend, small, big, typed, small_tasks, typed_task, ml_ids[2], version, budgeted, ending,
                        sorted(t["id"] for t in c.tasks(ending)), box, box_task, tmp)
        resources.callback(studio.stop_worker)
        yield studio
    conn.flushdb()
    conn.close()


class Browser:
    """One chromium for the module, logged in through Label Studio's login page."""

    def __init__(self, base_url: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):
            options.add_argument(arg)
        self.base_url = base_url
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(60)

    def login(self, username: str, password: str) -> None:
        from selenium.webdriver.common.by import By

        d = self.driver
        d.get(f"{self.base_url}/user/login/")
        d.find_element(By.NAME, "email").send_keys(username)
        d.find_element(By.NAME, "password").send_keys(password)
        d.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        wait_until(lambda: "/user/login" not in d.current_url, 30, "the login to finish")

    def open(self, path: str) -> None:
        self.driver.get(f"{self.base_url}{path}")

    def find(self, css: str, timeout: float = 30.0):
        from selenium.webdriver.common.by import By

        return wait_until(lambda: self.driver.find_element(By.CSS_SELECTOR, css), timeout, f"element {css!r}")

    def find_text(self, text: str, tag: str = "*", timeout: float = 30.0):
        """The first visible element whose own text (normalised) is `text`."""
        from selenium.webdriver.common.by import By

        xpath = f"//{tag}[normalize-space(.)={json.dumps(text)}]"
        return wait_until(lambda: next(e for e in self.driver.find_elements(By.XPATH, xpath) if e.is_displayed()),
                          timeout, f"{tag} with text {text!r}")

    def screenshot(self) -> np.ndarray:
        """The viewport as (H, W, 3) int array."""
        png = self.driver.get_screenshot_as_png()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)

    def save(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()


@pytest.fixture(scope="module")
def browser(studio: Studio):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    b = Browser(studio.ls.url)
    try:
        b.login(studio.ls.username, studio.ls.password)
        yield b
    finally:
        b.quit()


@pytest.fixture(autouse=True)
def artefacts_on_failure(request, browser: Browser, studio: Studio):
    """A failed test leaves the screen, the page's HTML and the server logs under test-artifacts/browser/."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        name = re.sub(r"[^\w.-]", "_", request.node.name)
        shot = browser.save(f"FAILED-{name}")
        (ARTIFACTS / f"FAILED-{name}.html").write_text(browser.driver.page_source)
        (ARTIFACTS / f"FAILED-{name}.log").write_text(studio.logs())
        print(f"\n[browser] failure artefacts: {shot} (+ .html, .log)")


# ---------------------------------------------------------------------------------------------------------------
# UI steps


def data_manager(browser: Browser, project: int) -> None:
    browser.open(f"/projects/{project}/data")
    browser.find('input[aria-label="Select all rows"]')


def retrieve_predictions(browser: Browser, select: list[int] | None) -> None:
    """In the open data manager: tick the tasks (None: the header's select-all), Actions -> Retrieve Predictions
    -> OK."""
    if select is None:
        browser.find('input[aria-label="Select all rows"]').click()
    else:
        for task in select:
            browser.find(f'input[aria-label="Select Task {task}"]').click()
    browser.find('button[aria-label="Tasks Actions"]').click()
    browser.find_text("Retrieve Predictions", "span").click()
    browser.find_text("OK", "button").click()


def show_column(browser: Browser, title: str) -> None:
    """In the open data manager: tick `title` in the Columns menu (the view keeps it on reload)."""
    browser.find_text("Columns", "button").click()
    browser.find_text(title, "span").click()
    browser.find_text("Columns", "button").click()  # close the menu


def column_cells(browser: Browser, title: str, tasks: list[int]) -> dict[int, str | None]:
    """The text the open data manager shows in column `title` for each task's row (read where the annotator sees
    it: the element under the column header's centre, at the row's height); None where the header or the row is
    not drawn. One script, so a re-render of the table (it redraws when the project's model_version changes) cannot
    leave a stale element between finding the header and reading a cell."""
    return {int(k): v for k, v in browser.driver.execute_script("""
        const [title, tasks] = arguments;
        const found = document.evaluate(`//*[normalize-space(.)=${JSON.stringify(title)}]`, document, null,
                                        XPathResult.ORDERED_NODE_SNAPSHOT_TYPE, null);
        let header = null;
        for (let i = 0; i < found.snapshotLength && !header; i++)
            if (found.snapshotItem(i).getClientRects().length) header = found.snapshotItem(i);
        const out = {};
        for (const task of tasks) {
            const row = document.querySelector(`input[aria-label="Select Task ${task}"]`);
            if (!header || !row) { out[task] = null; continue; }
            const hb = header.getBoundingClientRect(), rb = row.getBoundingClientRect();
            const e = document.elementFromPoint(hb.left + hb.width / 2, rb.top + rb.height / 2);
            out[task] = e ? e.innerText : null;
        }
        return out;""", title, tasks).items()}


def rows_in_view(browser: Browser, tasks: list[int]) -> list[int]:
    """The tasks whose row of the open data manager is on screen above its footer (40 px)."""
    window_height = browser.driver.execute_script("return window.innerHeight")

    def bottom(task: int) -> float:
        _, top, _, height = screen_rect(browser, browser.find(f'input[aria-label="Select Task {task}"]'))
        return top + height

    return [t for t in tasks if bottom(t) < window_height - 40]


def is_number(text: str | None) -> bool:
    return bool(text and re.fullmatch(r"\s*\d+(\.\d+)?\s*", text))


def model_card(browser: Browser, project: int) -> str:
    """Settings -> Model, freshly loaded: the page's text (the card shows the ML backend's title)."""
    browser.open(f"/projects/{project}/settings/ml")
    browser.find_text("Connected", "*")
    return browser.driver.find_element("css selector", "body").text


def open_task(browser: Browser, project: int, task: int) -> None:
    browser.open(f"/projects/{project}/data?task={task}")
    browser.find('img[alt="image"]')
    browser.find('button[aria-label="Hide all regions"]')
    settled(browser)  # the image and the regions' bitmaps are drawn asynchronously


def screen_rect(browser: Browser, element) -> tuple[float, float, float, float]:
    """(left, top, width, height) of `element` in the viewport, CSS pixels (a screenshot's pixels here)."""
    return tuple(browser.driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height]", element))


def settled(browser: Browser, timeout: float = 10.0, interval: float = 0.3) -> np.ndarray:
    """The viewport's screenshot once the image's area on screen stops changing (two screenshots `interval` apart
    the same there; the TextArea's blinking caret is outside it), or the last one after `timeout`."""
    left, top, width, height = (int(v) for v in screen_rect(browser, browser.find('img[alt="image"]')))
    area = (slice(max(0, top), max(0, top + height)), slice(max(0, left), max(0, left + width)))
    last = browser.screenshot()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        shot = browser.screenshot()
        if np.array_equal(shot[area], last[area]):
            return shot
        last = shot
    return last


def type_phrase(browser: Browser, phrase: str) -> None:
    """Type a line into the README config's TextArea and press Enter (what its Add button does)."""
    from selenium.webdriver.common.keys import Keys

    field = browser.find(f'[placeholder="{PLACEHOLDER}"]')
    field.click()
    field.send_keys(phrase, Keys.ENTER)
    browser.find_text(phrase, "*")


def auto_annotation_on(browser: Browser, on: bool = True, timeout: float = 20.0) -> None:
    """Switch the editor's Auto-Annotation on (or off with `on=False`); the browser remembers it from an earlier
    task, so a blind click may do the opposite. On a loaded machine a click can land before the bar handles it:
    clicked again when the state has not changed 3 s later (never sooner, or a slow first click would be undone)."""
    def state() -> bool | None:
        try:
            return browser.driver.find_element("css selector",
                                               'input[data-testid="bottombar-auto-annotation-toggle"]').is_selected()
        except Exception:  # noqa: BLE001 - the bar is re-rendering
            return None

    deadline = time.monotonic() + timeout
    while state() != on:
        assert time.monotonic() < deadline, f"Auto-Annotation did not turn {'on' if on else 'off'} in {timeout:.0f} s"
        try:
            browser.find_text("Auto-Annotation", "span").click()
        except Exception:  # noqa: BLE001 - stale or covered while the bar re-renders: look again
            continue
        clicked = time.monotonic()
        while state() != on and time.monotonic() - clicked < 3.0:
            time.sleep(0.1)


def pick_smart_tool(browser: Browser, tool: str) -> None:
    """Auto-Annotation on: hover the toolbar's smart-tools group (it opens on hover) and click `tool` in it (its
    aria-label, e.g. "rectangle-tool")."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser.driver

    def shown(css: str):
        return next(e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed())

    ActionChains(d).move_to_element(wait_until(lambda: shown("button.lsf-tool_smart:not([aria-label])"), 10,
                                               "the smart tools")).perform()
    button = wait_until(lambda: shown(f'button.lsf-tool_smart[aria-label="{tool}"]'), 10, f"the smart {tool}")
    button.click()
    wait_until(lambda: "lsf-tool_active" in button.get_attribute("class"), 5, f"the smart {tool} selected")


def drag_box(browser: Browser, image_size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Drag the mouse over the open task's image from image pixel (x0, y0) to (x1, y1), in small steps as a hand
    does (a box with the selected tool)."""
    from selenium.webdriver.common.action_chains import ActionChains

    d = browser.driver
    img, stage = browser.find('img[alt="image"]'), browser.find(".konvajs-content")
    (il, it, iw, ih), (sl, st, sw, sh) = screen_rect(browser, img), screen_rect(browser, stage)
    x0, y0, x1, y1 = box
    ax, ay = il + x0 * iw / image_size[0], it + y0 * ih / image_size[1]
    bx, by = il + x1 * iw / image_size[0], it + y1 * ih / image_size[1]
    # selenium's offsets are from the element's centre
    chain = ActionChains(d).move_to_element_with_offset(stage, int(ax - sl - sw / 2), int(ay - st - sh / 2))
    chain = chain.click_and_hold().pause(0.2)
    for _ in range(4):
        chain = chain.move_by_offset(int((bx - ax) / 4), int((by - ay) / 4)).pause(0.05)
    chain.release().perform()


def drawn_mask(browser: Browser, image_size: tuple[int, int], change: Callable[[], Any]) -> tuple[np.ndarray, np.ndarray]:
    """Which image pixels change on screen when `change()` runs (e.g. a click on "Hide all regions"): screenshots
    before and after, compared at each image pixel's centre on screen. Returns (changed, visible), both (H, W)
    bool: visible is False where the pixel is off the canvas or under another element (the zoom toolbar)."""
    width, height = image_size
    d = browser.driver
    img = browser.find('img[alt="image"]')
    # Screen position of each image pixel's centre: the <img> under Konva's stage has the zoom as a CSS transform.
    left, top, shown_w, shown_h = screen_rect(browser, img)
    xs = left + (np.arange(width) + 0.5) * shown_w / width
    ys = top + (np.arange(height) + 0.5) * shown_h / height
    visible_flat = d.execute_script("""
        const [xs, ys] = arguments; const out = [];
        for (const y of ys) for (const x of xs) {
            const e = document.elementFromPoint(x, y);
            out.push(!!(e && e.tagName === 'CANVAS' && e.closest('.konvajs-content')));
        }
        return out;""", xs.tolist(), ys.tolist())
    visible = np.array(visible_flat, bool).reshape(height, width)
    before = browser.screenshot()
    change()
    time.sleep(0.3)  # the change starts to draw
    after = settled(browser)
    ix = np.clip(xs.astype(int), 0, before.shape[1] - 1)
    iy = np.clip(ys.astype(int), 0, before.shape[0] - 1)
    delta = np.abs(before - after).max(axis=2)[np.ix_(iy, ix)]
    # Konva draws a region's bitmap scaled with smoothing, so a pixel next to a region changes a little too; a
    # region pixel changes by the full overlay (opacity x colour difference). Half the strong changes splits them.
    strong = np.percentile(delta[visible], 99) if visible.any() else 0
    return delta > max(12.0, strong / 2), visible


# ---------------------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def retrieved(studio: Studio, browser: Browser) -> dict[int, dict]:
    """Retrieve Predictions on the first two tasks of the small project, through the data manager. Task -> its
    stored prediction (read from the API)."""
    tasks = studio.small_tasks[:2]
    data_manager(browser, studio.small)
    retrieve_predictions(browser, tasks)

    def stored() -> dict[int, dict] | None:
        by_task = {p["task"]: p for p in studio.client.predictions(studio.small) if p["task"] in tasks}
        return by_task if len(by_task) == len(tasks) else None

    return wait_until(stored, 60, f"predictions of tasks {tasks}\n{studio.logs()}")


def test_retrieved_prediction_is_drawn_where_its_rle_says(studio: Studio, browser: Browser, retrieved):
    task = studio.small_tasks[0]
    pred = retrieved[task]
    assert pred["model_version"] == studio.version and pred["result"], pred
    expected = np.zeros(SMALL_SIZE[::-1], bool)
    for item in pred["result"]:
        expected |= decode_brush(item)
    assert 0.01 < expected.mean() < 0.99  # a mask the comparison can tell from nothing and from everything
    open_task(browser, studio.small, task)
    # The editor turned the prediction into the annotator's draft: one region per predicted label.
    labels = {i["value"]["brushlabels"][0] for i in pred["result"]}
    for label in labels:
        browser.find_text(label, "span")
    browser.save("docs-prediction-drawn")
    changed, visible = drawn_mask(browser, SMALL_SIZE,
                                  lambda: browser.find('button[aria-label="Hide all regions"]').click())
    browser.save("docs-prediction-hidden")
    assert visible.mean() > 0.8, f"only {visible.mean():.0%} of the image is visible on the canvas"
    score = iou(changed & visible, expected & visible)
    assert score >= 0.9, (f"drawn mask vs the prediction's RLE: IoU {score:.3f} (drawn {changed[visible].mean():.3f} "
                          f"of the visible pixels, expected {expected[visible].mean():.3f})")


def test_prediction_score_column_shows_our_scores(studio: Studio, browser: Browser, retrieved):
    """The data manager averages only predictions of the project's model_version: the backend keeps it equal to the
    version it serves, so the column holds our scores."""
    data_manager(browser, studio.small)
    show_column(browser, "Prediction score")

    def cells() -> dict[int, str | None]:
        return column_cells(browser, "Prediction score", list(retrieved))

    def numbers() -> dict[int, str] | None:
        read = cells()
        return read if all(map(is_number, read.values())) else None

    def reloaded_numbers() -> dict[int, str] | None:
        data_manager(browser, studio.small)
        return wait_until(lambda: browser.find_text("Prediction score", "*"), 10, "the column") and numbers()

    # The backend sets the project's model_version a moment after Label Studio stored the predictions; the
    # annotator's page shows it at the next reload.
    deadline = time.monotonic() + 30
    read = numbers()
    while not read and time.monotonic() < deadline:
        time.sleep(2)
        read = reloaded_numbers()
    browser.save("docs-prediction-score-column")
    assert read, f"the Prediction score column reads {cells()} (stored scores "\
                 f"{ {t: p['score'] for t, p in retrieved.items()} }, project model_version "\
                 f"{studio.client.project(studio.small)['model_version']!r}, served {studio.version!r})"
    for task, pred in retrieved.items():
        assert float(read[task]) == pytest.approx(pred["score"], abs=0.001), (task, read[task], pred["score"])


def test_typed_phrase_is_answered_with_a_suggestion_drawn_on_the_image(studio: Studio, browser: Browser):
    """Auto-Annotation on, a phrase typed into the TextArea: Label Studio sends the backend an interactive /predict
    with the text as context, and draws the answer as a suggestion; accepted and submitted, it is the annotation."""
    phrase = "the red circle"
    task = studio.typed_task
    open_task(browser, studio.typed, task)
    auto_annotation_on(browser)

    def type_and_wait() -> None:
        type_phrase(browser, phrase)
        browser.find_text("1 suggestions", "div", timeout=20)

    changed, visible = drawn_mask(browser, SMALL_SIZE, type_and_wait)
    browser.save("docs-typed-phrase-suggestion")
    # What the backend answers for this task and phrase (fp32, deterministic), asked the way the editor asks.
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": [phrase]}}]}
    (item,) = studio.client.interactive_annotating(studio.typed_ml, task, context)["data"]["result"]
    expected = decode_brush(item)
    assert 0.01 < expected.mean() < 0.99
    assert visible.mean() > 0.8, f"only {visible.mean():.0%} of the image is visible on the canvas"
    score = iou(changed & visible, expected & visible)
    assert score >= 0.9, f"the suggestion drawn vs the backend's answer for {phrase!r}: IoU {score:.3f}"
    browser.find('[data-testid="bottombar-accept-suggestions-button"]').click()
    browser.find_text("Submit", "button").click()
    (ann,) = wait_until(lambda: studio.client.annotations(task), 20, "the submitted annotation")
    brushes = [i for i in ann["result"] if i["type"] == "brushlabels"]
    texts = [i["value"]["text"] for i in ann["result"] if i["type"] == "textarea"]
    assert texts == [[phrase]], ann["result"]
    assert len(brushes) == 1 and np.array_equal(decode_brush(brushes[0]), expected), brushes
    # The editor keeps the result item's meta: the accepted region says which phrase it was made for.
    assert brushes[0].get("meta", {}).get("prompt") == phrase, brushes[0].get("meta")


def test_a_box_drawn_with_the_smart_tool_comes_back_as_a_mask_drawn_with_its_label(studio: Studio, browser: Browser):
    """Issue 28 in the editor: Auto-Annotation on, the smart rectangle tool, the box's label, a box dragged around
    the red circle: Label Studio sends the box in /predict's context, the backend answers the object in it from the
    box as a visual prompt (a brush region in the box's label, inside the box), and the editor draws it as a
    suggestion; accepted and submitted, the annotation's region is what was drawn."""
    from selenium.webdriver.common.by import By

    task = studio.box_task
    open_task(browser, studio.box, task)
    auto_annotation_on(browser)
    # The box tool's label: listed after the brush's own label of the same name.
    label = [e for e in browser.driver.find_elements(By.XPATH, f"//span[normalize-space(.)={json.dumps(BOX_LABEL)}]")
             if e.is_displayed()][-1]
    label.click()
    pick_smart_tool(browser, "rectangle-tool")
    box = (12, 10, 165, 125)  # image pixels: the red circle (2, 2)-(160, 120) as far as the canvas shows it

    def drag_and_wait() -> None:
        drag_box(browser, SMALL_SIZE, box)
        browser.find_text("1 suggestions", "div", timeout=20)

    changed, visible = drawn_mask(browser, SMALL_SIZE, drag_and_wait)
    browser.save("docs-box-suggestion")
    browser.find('[data-testid="bottombar-accept-suggestions-button"]').click()
    browser.find_text("Submit", "button").click()
    (ann,) = wait_until(lambda: studio.client.annotations(task), 20, "the submitted annotation")
    brushes = [i for i in ann["result"] if i["type"] == "brushlabels"]
    assert len(brushes) == 1, ann["result"]
    assert brushes[0]["value"]["brushlabels"] == [BOX_LABEL], brushes[0]["value"]["brushlabels"]
    mask = decode_brush(brushes[0])
    x0, y0, x1, y1 = box
    in_box = np.zeros_like(mask)
    in_box[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True  # the drag's pixels are rounded to percentages
    assert mask.sum() > 100 and not (mask & ~in_box).any(), f"{mask.sum()} px, {(mask & ~in_box).sum()} outside the box"
    # What was drawn is that region: the box's own outline (drawn while the suggestion shows) is left out.
    edge = in_box.copy()
    edge[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = False
    assert visible.mean() > 0.8, f"only {visible.mean():.0%} of the image is visible on the canvas"
    seen = visible & ~edge
    score = iou(changed & seen, mask & seen)
    assert score >= 0.9, (f"drawn vs the region's RLE: IoU {score:.3f} (drawn {changed[seen].mean():.3f} of the "
                          f"visible pixels, region {mask[seen].mean():.3f})")


def test_brush_stroke_submitted_is_stored_with_the_phrase_just_typed(studio: Studio, browser: Browser):
    from selenium.webdriver.common.action_chains import ActionChains

    task = studio.small_tasks[2]
    phrase = "the red circle on the left"
    open_task(browser, studio.small, task)
    # No suggestions here (the typed-phrase test left Auto-Annotation on): a suggestion of the same label and phrase
    # would be stored merged with the stroke, so the stroke's own area could not be found.
    auto_annotation_on(browser, on=False)
    # An earlier line stays in the TextArea (as a restored draft's does): the phrase just typed is the last one.
    type_phrase(browser, "the blue square")
    type_phrase(browser, phrase)
    browser.find_text("player", "span").click()  # the label; the brush is the selected tool
    stage = browser.find(".konvajs-content")
    ActionChains(browser.driver).move_to_element_with_offset(stage, -250, -180).click_and_hold() \
        .move_by_offset(40, 15).move_by_offset(40, 15).move_by_offset(30, 30).release().perform()
    time.sleep(0.5)
    browser.save("docs-brush-stroke")
    browser.find_text("Submit", "button").click()
    (ann,) = wait_until(lambda: studio.client.annotations(task), 20, "the submitted annotation")
    strokes = [i for i in ann["result"] if i["type"] == "brushlabels" and i.get("origin") != "prediction"]
    assert len(strokes) == 1, ann["result"]
    area = int(decode_brush(strokes[0]).sum())
    assert area > 0

    def rows() -> list[dict]:
        out = subprocess.run([*clipseg_command(), "corrections", "--project", str(studio.small), "--json"],
                             env={**os.environ, "REDIS_URL": REDIS_TEST_URL}, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        # one JSON line per correction; the prototype and exemplar lines carry no task
        return [r for r in map(json.loads, out.stdout.splitlines()) if r.get("task") == task]

    mine = wait_until(lambda: [r for r in rows() if r["area"] == area], 20,
                      f"the stroke ({area} px) in `clipseg corrections`\n{studio.logs()}")
    got = [(r["label"], r["prompt"], r["source"]) for r in mine]
    assert got == [("player", phrase, "typed")], f"the stroke is stored as {got}, typed last: {phrase!r}"


def test_run_over_the_budget_is_seen_queued_then_done_on_the_model_card(studio: Studio, browser: Browser):
    """The annotator's whole story of a run over the budget, in the UI only: queued (no worker yet), taken by a
    real `clipseg worker`, done; then the predictions and their scores in the data manager. Its worker keeps
    running for the promotion's refresh; the big project's test, whose run must find no worker, stops it."""
    version = requests.get(f"{studio.budgeted.base_url}/health", timeout=10).json()["model_version"]
    data_manager(browser, studio.ending)
    retrieve_predictions(browser, None)
    queued = rf"clipseg · pre-label run of {N_ENDING} tasks queued \(waiting for a worker\)"
    wait_until(lambda: re.search(queued, model_card(browser, studio.ending)), 30,
               f"the queued notice on the model card\n{studio.logs(studio.budgeted)}", interval=1)
    browser.save("docs-ending-run-queued")
    assert studio.client.predictions(studio.ending) == []  # /predict stored nothing: it queued the run
    worker = studio.start_worker()
    seen: list[str] = []

    def done() -> bool:
        text = model_card(browser, studio.ending)
        progress = re.search(rf"pre-labelling: (\d+) of {N_ENDING} tasks done", text)
        # A reload that catches the run going is worth a picture, not a condition (the tiny model is fast);
        # one with some tasks done beats the first "0 of 12".
        if progress and (not seen or (progress.group(0) not in seen and 0 < int(progress.group(1)) < N_ENDING)):
            browser.save("docs-ending-run-progress")
        if progress and progress.group(0) not in seen:
            seen.append(progress.group(0))
        return bool(re.search(rf"clipseg · {N_ENDING} tasks pre-labelled at \d\d:\d\d UTC with "
                              rf"{re.escape(version)}", text))

    # (each reload costs the browser a second of CPU the worker needs on a small machine: not much faster)
    wait_until(done, 90, f"the done notice on the model card\n{studio.logs(studio.budgeted, worker)}",
               interval=1.5)
    browser.save("docs-ending-run-done")
    print(f"\n[browser] progress titles seen on reloads: {seen or 'none'}")
    preds = studio.client.predictions(studio.ending)
    assert sorted(p["task"] for p in preds) == studio.ending_tasks, preds  # one each
    assert {p["model_version"] for p in preds} == {version}
    # The data manager, reloaded as the notice says: the footer counts them, each row in view shows its score (the
    # run's end set the project's model_version to the version it wrote; each title change makes Label Studio set
    # it to the title for a moment, until its /setup call lets the backend set it back: hence the wait).
    data_manager(browser, studio.ending)
    show_column(browser, "Prediction score")
    footer = re.compile(rf"Predictions:\s*{N_ENDING}\b")
    wait_until(lambda: footer.search(browser.find("body").text), 10,
               f"{footer.pattern!r} in the data manager's footer")
    in_view = rows_in_view(browser, studio.ending_tasks)
    assert len(in_view) >= 3, in_view
    scores = {p["task"]: p["score"] for p in preds}

    def numbers() -> dict[int, str] | None:
        read = column_cells(browser, "Prediction score", in_view)
        return read if all(map(is_number, read.values())) else None

    read = wait_until(numbers, 10, "the rows' prediction scores")
    browser.save("docs-ending-score-column")
    for task, text in read.items():
        assert float(text) == pytest.approx(scores[task], abs=0.001), (task, text, scores[task])


def test_score_column_shows_the_new_versions_scores_after_a_promotion(studio: Studio, browser: Browser):
    """Issue 26: a new version of the ending project becomes active, recorded and activated as the fine-tune job
    does when its gate promotes (`VersionRegistry.record` + `activate(..., "promoted")`). The backend makes it Label
    Studio's current model of the project, its promotion refresher queues a pre-label run of the unannotated tasks
    (the shared worker runs it), and the data manager's "Prediction score" column shows the new version's scores;
    the annotated task, whose only prediction is the old version's, shows none.

    The version's weights are the same preset from another seed, not a fine-tune: a real fine-tune of this random
    tiny model on a few corrections took 17 s here and its gate rejected it (tests/e2e/test_projects_e2e.py covers
    that path); the checkpoint has a fine-tune's shape (config + trainable state on the served backbone)."""
    import redis

    from clipseg_model.random_init import init_model
    from finetune.versions import VersionRecord, VersionRegistry

    c, project = studio.client, str(studio.ending)
    old = {p["task"]: p for p in c.predictions(studio.ending)}
    assert sorted(old) == studio.ending_tasks, "the ending project's test runs first and pre-labels every task"
    annotated = studio.ending_tasks[0]
    c.create_annotation(annotated, [])  # the refresh leaves an annotated task's prediction alone
    worker = studio.start_worker()
    version = f"p{project}-browser-promoted"
    path = init_model("tiny-clipseg", studio.tmp / version, seed=1)
    conn = redis.Redis.from_url(REDIS_TEST_URL)
    registry = VersionRegistry(conn)
    registry.record(VersionRecord(version, str(path), old[annotated]["model_version"], project=project))
    registry.activate(version, "promoted", "browser e2e", project=project)
    conn.close()
    refreshed = [t for t in studio.ending_tasks if t != annotated]

    def new_predictions() -> dict[int, dict] | None:
        by_task: dict[int, list[dict]] = {}
        for p in c.predictions(studio.ending):
            by_task.setdefault(p["task"], []).append(p)
        done = all([p["model_version"] for p in by_task.get(t, [])] == [version] for t in refreshed)
        return {t: by_task[t][0] for t in refreshed} if done else None

    new = wait_until(new_predictions, 60, f"one prediction of {version} per unannotated task\n"
                                          f"{studio.logs(studio.budgeted, worker)}", interval=1)
    assert [p["model_version"] for p in c.predictions(task=annotated)] == [old[annotated]["model_version"]]
    changed = [t for t in refreshed if abs(new[t]["score"] - old[t]["score"]) > 0.002]
    assert len(changed) >= len(refreshed) // 2, (new, old)  # the new version's scores are not the old ones

    data_manager(browser, studio.ending)
    in_view = rows_in_view(browser, studio.ending_tasks)
    assert annotated in in_view and len(in_view) >= 4, in_view

    def shows_new() -> dict[int, str | None] | None:
        read = column_cells(browser, "Prediction score", in_view)
        ok = all(is_number(read[t]) and abs(float(read[t]) - new[t]["score"]) < 0.001 for t in in_view if t in new)
        return read if ok and not is_number(read[annotated]) else None

    # Label Studio takes the new model_version from the run's end (and the backend's sync); each title change of
    # the run sets it to the title for a moment, so the annotator's reload may need a second try.
    deadline, read = time.monotonic() + 30, shows_new()
    while not read and time.monotonic() < deadline:
        time.sleep(2)
        data_manager(browser, studio.ending)
        read = wait_until(lambda: browser.find_text("Prediction score", "*"), 10, "the column") and shows_new()
    browser.save("docs-score-column-after-promotion")
    assert read, (f"the Prediction score column reads {column_cells(browser, 'Prediction score', in_view)}; "
                  f"{version}'s scores { {t: round(new[t]['score'], 3) for t in in_view if t in new} }, the old "
                  f"{ {t: round(old[t]['score'], 3) for t in in_view} }; project model_version "
                  f"{c.project(studio.ending)['model_version']!r}")


def test_selection_over_the_budget_shows_the_queued_run_on_the_model_card(studio: Studio, browser: Browser):
    studio.stop_worker()  # the run must stay queued
    data_manager(browser, studio.big)
    retrieve_predictions(browser, None)

    def card_title() -> str | None:
        text = model_card(browser, studio.big)
        return text if "pre-label run" in text else None

    text = wait_until(card_title, 30, f"the run notice on the model card\n{studio.logs()}", interval=2)
    browser.save("docs-model-card-run-queued")
    assert re.search(rf"clipseg · pre-label run of {N_BIG} tasks queued", text), text
    assert studio.client.predictions(studio.big) == []  # nothing stored by /predict: it queued the run instead
