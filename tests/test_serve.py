"""`python -m lseg_jax.serve`, the web demo: the page in a real browser
(headless Chromium through Selenium), its downloads against predict's, every
bad request answered in one line, 20 concurrent requests, and usage errors.

The server runs in a subprocess on conftest's trained tiny run, on a free
loopback port it prints. The browser test needs Debian's `chromium` and
`chromium-driver` and pip `selenium`: it skips without them, and fails
under CI=true (.ci/run installs them).
"""

import base64
import io
import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from helpers import cpu_env
from lseg_jax import export, predict
from lseg_jax.data import shapes

MAX_SIDE = 256  # over the lseg_shapes images' 128-192 px
MAX_UPLOAD_MB = 2
LABELS = ",".join(shapes.LABELS)


class Server:
  """A `python -m lseg_jax.serve` subprocess and its output so far."""

  def __init__(self, source: Path, kind: str = "--checkpoint"):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "lseg_jax.serve", kind, str(source), "--port", "0",
         "--max_side", str(MAX_SIDE), "--max_upload_mb", str(MAX_UPLOAD_MB), "--queue", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cpu_env(1))
    self.lines: list[str] = []
    self.url: str | None = None
    ready = threading.Event()

    def read():
      for line in self.proc.stdout:
        self.lines.append(line)
        if line.startswith("ready: "):
          self.url = line.split()[1].rstrip("/")
          ready.set()
      ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout=300)
    assert self.url, "".join(self.lines)[-3000:]
    self.port = int(self.url.rsplit(":", 1)[1])

  def rss_mb(self) -> float:
    status = Path(f"/proc/{self.proc.pid}/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmRSS")).split()[1]) / 1024

  def post(self, payload: dict, timeout: float = 300) -> tuple[int, dict]:
    req = urllib.request.Request(f"{self.url}/api/segment", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def raw(self, request: bytes, shutdown: bool = False) -> tuple[int, bytes]:
    """(status, body) of a request sent byte for byte (what urllib would not send)."""
    with socket.create_connection(("127.0.0.1", self.port), timeout=120) as s:
      s.sendall(request)
      if shutdown:
        s.shutdown(socket.SHUT_WR)
      response = b""
      while chunk := s.recv(65536):
        response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture(scope="module")
def server(trained):
  s = Server(trained)
  yield s
  s.proc.terminate()
  s.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pictures(shapes_config, tmp_path_factory) -> dict[str, Path]:
  """Two lseg_shapes training images (the trained run knows them), one
  enlarged past MAX_SIDE, and a file that is not an image."""
  folder = tmp_path_factory.mktemp("serve_images")
  ds = tfds.data_source("lseg_shapes/tiny", split="train", data_dir=shapes_config["data_dir"])
  out = {}
  for i in range(2):
    out[f"shapes{i}"] = folder / f"shapes{i}.png"
    Image.fromarray(ds[i]["image"]).save(out[f"shapes{i}"])
  out["large"] = folder / "large.png"
  Image.fromarray(ds[0]["image"]).resize((400, 300)).save(out["large"])
  out["bad"] = folder / "bad.png"
  out["bad"].write_text("not an image")
  return out


def upload(path: Path, **options) -> dict:
  return {"image": base64.b64encode(path.read_bytes()).decode(), "name": path.name, "labels": LABELS, **options}


def decode(url: str) -> bytes:
  return base64.b64decode(url.split(",", 1)[1])


def predict_ids(trained, image: Path, out: Path, *flags: str) -> np.ndarray:
  assert predict.main(["--checkpoint", str(trained), "--labels", LABELS, "--out", str(out), *flags, str(image)]) == 0
  return np.load(out / f"{image.name}_ids.npy")


def test_the_page_and_its_info(server, trained):
  with urllib.request.urlopen(f"{server.url}/") as r:
    page = r.read().decode()
  assert 'id="labels"' in page and 'id="file"' in page
  with urllib.request.urlopen(f"{server.url}/api/info") as r:
    info = json.loads(r.read())
  assert info["vocabularies"]["this model's training labels"] == list(shapes.LABELS)
  assert len(info["vocabularies"]["ADE20K (150)"]) == 150 and info["features"] and info["max_side"] == MAX_SIDE
  assert "not CLIP" in info["note"]


@pytest.mark.parametrize("path", ["/../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd", "/web/index.html",
                                  "//etc/passwd", "/index.html/../../serve.py"])
def test_only_its_own_page_is_served(server, path):
  status, body = server.raw(f"GET {path} HTTP/1.0\r\n\r\n".encode())
  assert status == 404 and b"no such page" in body


def test_results_equal_predicts(server, trained, pictures, tmp_path):
  """Label ids (NPY and PNG downloads) equal predict's for the same image and
  labels, single scale and multi-scale + flip; the legend lists the labels
  present; an image over --max_side is resized, and the answer says so."""
  image = pictures["shapes0"]
  status, single = server.post(upload(image))
  assert status == 200, single
  ids = np.load(io.BytesIO(decode(single["downloads"]["ids.npy"])))
  expected = predict_ids(trained, image, tmp_path / "single")
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(decode(single["downloads"]["ids.png"])))), expected)
  assert [p["name"] for p in single["present"]] == [shapes.LABELS[i] for i in np.unique(expected)]
  assert len(single["present"]) >= 2 and set(single["heatmaps"]) == {str(p["id"]) for p in single["present"]}
  assert single["resized"] is None and (single["width"], single["height"]) == Image.open(image).size
  status, listed = server.post(upload(image, labels=[label.strip() for label in LABELS.split(",")]))  # a JSON list
  assert status == 200 and listed["labels"] == single["labels"] and listed["downloads"] == single["downloads"], listed

  status, multi = server.post(upload(image, multiscale=True))
  assert status == 200, multi
  np.testing.assert_array_equal(np.load(io.BytesIO(decode(multi["downloads"]["ids.npy"]))),
                                predict_ids(trained, image, tmp_path / "multi", "--scales",
                                            "0.5,0.75,1.0,1.25,1.5,1.75", "--flip"))

  status, large = server.post(upload(pictures["large"], features=True))
  assert status == 200, large
  assert large["resized"] == f"resized from 400x300 to 256x192 (the server's --max_side {MAX_SIDE})"
  assert (large["width"], large["height"]) == (256, 192)
  assert Image.open(io.BytesIO(decode(large["features"]))).size == (128, 96)  # native: half size


def test_an_artifact_serves_the_checkpoints_labels(server, trained, pictures, tmp_path):
  """--exported: the artifact of the same run gives the same label ids as
  --checkpoint (it records the run's square resize), and a request for the
  dense features, which an artifact does not carry, gets one line."""
  path = tmp_path / "trained.jaxexport"
  assert export.main(["--checkpoint", str(trained), "--out", str(path), "--platforms", "cpu"]) == 0
  artifact = Server(path, "--exported")
  try:
    with urllib.request.urlopen(f"{artifact.url}/api/info") as r:
      assert json.loads(r.read())["features"] is False
    for image in (pictures["shapes0"], pictures["shapes1"]):
      results = [s.post(upload(image)) for s in (server, artifact)]
      assert [status for status, _ in results] == [200, 200], results
      ids = [np.load(io.BytesIO(decode(r["downloads"]["ids.npy"]))) for _, r in results]
      np.testing.assert_array_equal(ids[1], ids[0])
      assert len(np.unique(ids[0])) >= 2
    status, answer = artifact.post(upload(pictures["shapes0"], features=True))
    assert status == 400 and answer["error"] == "dense features need a checkpoint: this server runs an export artifact"
  finally:
    artifact.proc.terminate()
    artifact.proc.wait(timeout=30)


def long_label() -> str:
  return "a " + "very " * 80 + "long label"


@pytest.mark.parametrize("payload, status, message", [
    (dict(image=base64.b64encode(b"not an image").decode(), name="x.png", labels="a,b"), 400,
     "cannot read image x.png: not an image format Pillow can decode"),
    (dict(image="@@@", name="y.png", labels="a,b"), 400, "y.png is not base64 image data"),
    (dict(image="", labels="a,b"), 400, "no image: choose or drop an image file"),
    (dict(labels=" , "), 400, "empty label list"),
    (dict(labels="dog, Dog"), 400, "duplicate label 'Dog'"),
    (dict(labels=f"dog, {long_label()}"), 400, "is too long for context length 77"),
    (dict(labels="dog, cat", template="a photo"), 400, "has no {} for the label"),
    (dict(labels=["dog", 3]), 400, "labels must be one comma-separated string or a list of strings"),
    (dict(labels=["dog", "cat, mouse"]), 400, "a label may not contain a comma"),
])
def test_bad_requests_get_one_line(server, pictures, payload, status, message):
  got, answer = server.post({**upload(pictures["shapes1"]), **payload})
  assert got == status and message in answer["error"] and "\n" not in answer["error"], answer


def test_bad_bodies_get_one_line(server, pictures):
  status, body = server.raw(b"POST /api/segment HTTP/1.1\r\nContent-Length: 9\r\n\r\nnot json!")
  assert status == 400 and json.loads(body) == {"error": "the request body is not JSON"}
  status, body = server.raw(b"POST /api/segment HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_UPLOAD_MB * 10**6 + 1))
  assert status == 413 and "over the server's limit of 2 MB" in json.loads(body)["error"]
  status, body = server.raw(b"POST /api/segment HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"labels\"", shutdown=True)
  assert status == 400 and json.loads(body)["error"] == "the upload was cut short (9 of 1000 bytes arrived)"
  status, body = server.raw(b"POST /api/segment HTTP/1.1\r\n\r\n")
  assert status == 411
  assert server.post(upload(pictures["shapes1"]))[0] == 200  # and it goes on
  assert server.proc.poll() is None


def test_twenty_concurrent_requests(server, pictures):
  """Good and bad mixed, one oversized body and one truncated upload: each is
  answered (200, its error, or 503 busy: --queue 3) within a bound, the
  server's memory stays bounded, and the next request is served."""
  assert server.post(upload(pictures["shapes1"]))[0] == 200  # compiled: the rest measures serving
  rss = server.rss_mb()
  good, bad = upload(pictures["shapes0"]), upload(pictures["bad"])
  calls = [lambda: server.post(good, timeout=120)] * 12 + [lambda: server.post(bad, timeout=120)] * 4 + [
      lambda: server.post({**good, "labels": ""}, timeout=120)] * 2 + [
      lambda: server.raw(b"POST /api/segment HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n"),
      lambda: server.raw(b"POST /api/segment HTTP/1.1\r\nContent-Length: 500\r\n\r\n{", shutdown=True)]
  answers: list = [None] * len(calls)

  def call(i):
    t = time.time()
    try:
      answers[i] = (*calls[i](), time.time() - t)
    except OSError as e:  # a connection refused or reset is a failure too
      answers[i] = (type(e).__name__, str(e), time.time() - t)

  threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=180)
  statuses = [a and a[0] for a in answers]
  assert {s for s in statuses[:12]} <= {200, 503} and statuses.count(200) >= 4, statuses
  assert all(a[1]["error"].startswith("busy") for a in answers[:12] if a[0] == 503)
  assert set(statuses[12:18]) == {400} and statuses[18:] == [413, 400], statuses
  assert max(a[-1] for a in answers) < 120
  assert server.rss_mb() < rss + 300, (rss, server.rss_mb())
  assert server.post(good)[0] == 200


def test_usage_errors_are_one_line(trained, tmp_path, capsys):
  from lseg_jax import serve  # pylint: disable=g-import-not-at-top
  assert serve.main(["--checkpoint", str(tmp_path / "missing")]) == 2
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    assert serve.main(["--checkpoint", str(trained), "--port", str(taken.getsockname()[1])]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
  assert "missing" in err[0] and "in use" in err[1], err


# ------------------------------------------------------------------ the page, in a browser

def browser():
  """Headless Chromium through Selenium with the system chromedriver (Selenium
  Manager kept offline), or a skip naming what is missing (a failure in CI)."""
  missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
  try:
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
  except ImportError:
    missing.append("pip selenium<4.52")
  if missing:
    message = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)
  os.environ["SE_OFFLINE"] = "true"
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
    options.add_argument(flag)
  return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def test_the_page_in_a_browser(server, trained, pictures, tmp_path):
  """Upload, type labels, segment: the page's NPY download equals predict's
  ids, its legend lists the labels present; a bad image and an empty label
  list show their one-line errors, and the next good request works. The
  screenshot goes to tmp_path (and to LSEG_SCREENSHOT, for the README)."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  driver = browser()
  try:
    wait = WebDriverWait(driver, 120)
    driver.get(server.url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#vocabulary option")) > 1)

    def segment(image: Path, labels: str) -> None:
      driver.find_element(By.ID, "file").send_keys(str(image))
      wait.until(lambda d: image.name in d.find_element(By.ID, "status").text)
      box = driver.find_element(By.ID, "labels")
      box.clear()
      box.send_keys(labels)
      driver.find_element(By.ID, "segment").click()
      wait.until(lambda d: d.find_element(By.ID, "segment").is_enabled() and "segmenting" not in
                 d.find_element(By.ID, "status").text)

    def error() -> str:
      return driver.find_element(By.ID, "error").text

    image = pictures["shapes0"]
    segment(image, LABELS.replace(",", ", "))
    assert error() == ""
    href = driver.find_element(By.ID, "download-ids-npy").get_attribute("href")
    expected = predict_ids(trained, image, tmp_path / "predict")
    np.testing.assert_array_equal(np.load(io.BytesIO(decode(href))), expected)
    assert driver.find_element(By.ID, "download-ids-npy").get_attribute("download") == "shapes0_ids.npy"
    legend = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#legend .name")]
    assert legend == [shapes.LABELS[i] for i in np.unique(expected)]
    result = driver.find_element(By.ID, "result")
    assert result.get_attribute("src").startswith("data:image/png") and result.size["width"] > 0
    driver.save_screenshot(str(tmp_path / "web_demo.png"))
    if os.environ.get("LSEG_SCREENSHOT"):
      shutil.copy(tmp_path / "web_demo.png", os.environ["LSEG_SCREENSHOT"])
    shot = np.asarray(Image.open(tmp_path / "web_demo.png").convert("RGB"))
    assert shot.std() > 20  # the page drew something, not a blank window

    overlay = result.get_attribute("src")
    driver.find_element(By.CSS_SELECTOR, "input[name=view][value=label_map]").click()
    assert result.get_attribute("src") != overlay

    segment(pictures["bad"], "dog, cat")
    assert error() == "cannot read image bad.png: not an image format Pillow can decode"
    segment(pictures["shapes1"], " ")
    assert error().startswith("empty label list") and "\n" not in error()
    segment(pictures["shapes1"], LABELS)
    assert error() == "" and driver.find_elements(By.CSS_SELECTOR, "#legend .name")
  finally:
    driver.quit()
