"""Chapter 13's widget demo in a real browser (issue 18, part 4): `python -m tinydit demo` serves it with
Voila, Selenium drives the system's headless Chromium through it (Debian's `chromium` and
`chromium-driver`, which `.ci/run` installs; nothing is downloaded at run time): type a prompt, press
Generate, read the picture that appears back from the page's pixels with chapter 10's reader. About 20 s
on 2 cores (printed). Without a browser: the demo command's one-line errors, and `GenerateDemo` itself
(the samplers it offers, one map per kept token, any failure of a click shown in the page)."""

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tinydit import cli, data, evaluate


ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = ("no system Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver; .ci/run "
              "installs them, and this test is skipped only where apt cannot)")

PROMPT = "a blue circle on the right"
IMAGE_PIXELS = """const img = document.querySelector('img.tinydit-image');
if (!img || !img.complete || img.naturalWidth === 0) return null;
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
canvas.getContext('2d').drawImage(img, 0, 0);
return canvas.toDataURL('image/png');"""  # the PNG's own pixels at its own size, not the enlarged rendering


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`python -m tinydit demo` on a free port, until the test ends; yields its address."""
    port = free_port()
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tinydit", "demo", "--port", str(port)], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, start = f"http://127.0.0.1:{port}/", time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo server exited with {proc.returncode}:\n{(tmp_path / 'voila.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.perf_counter() - start > 300:
                    pytest.fail(f"the demo server did not answer in 300 s:\n{(tmp_path / 'voila.log').read_text()[-3000:]}")
                time.sleep(0.5)
        print(f"server up: {time.perf_counter() - start:.1f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its kernel
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(NO_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: no Selenium Manager download
    try:
        yield driver
    finally:
        driver.quit()


def page_image(driver) -> Image.Image | None:
    url = driver.execute_script(IMAGE_PIXELS)
    return None if url is None else Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, ".tinydit-status").text


def test_demo_in_headless_chromium_draws_the_typed_prompt(server, browser, tmp_path):
    start = time.perf_counter()
    browser.get(server)
    wait = WebDriverWait(browser, 180)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".tinydit-prompt input"))
    first = wait.until(page_image)  # the page opens with the default prompt's picture
    assert PROMPT not in status(browser)

    box.clear()
    box.send_keys(PROMPT)
    browser.find_element(By.CSS_SELECTOR, "button.tinydit-generate").click()
    wait.until(lambda d: PROMPT in status(d))  # the kernel ran the pipeline on the typed prompt
    image = wait.until(lambda d: (im := page_image(d)) is not None and  # a blob URL: it loads after the status
                       data.pil_to_tensor(im).ne(data.pil_to_tensor(first)).any() and im)
    browser.save_screenshot(str(tmp_path / "demo.png"))
    if os.environ.get("TINYDIT_UPDATE_SCREENSHOT") == "1":  # the book's picture of the demo, from this very run
        Image.open(tmp_path / "demo.png").crop((0, 0, 1200, 460)).save(ROOT / "book" / "images" / "demo.png", optimize=True)
    print(f"page, prompt, Generate, image: {time.perf_counter() - start:.1f} s; status {status(browser)!r}")

    assert image.size == (32, 32)  # the PNG itself, not the 256 px rendering
    reading = evaluate.read_image(data.pil_to_tensor(image))
    assert [(o.color, o.shape) for o in reading.objects] == [("blue", "circle")], reading
    assert reading.objects[0].cx > 0.5, reading  # on the right

    seed = browser.find_element(By.CSS_SELECTOR, ".tinydit-seed input")
    seed.send_keys(Keys.CONTROL, "a")  # select the 0 (clear() on a number box is undone by the widget)
    seed.send_keys("-1", Keys.ENTER)  # the seed box takes any integer; the pipeline wants >= 0
    browser.find_element(By.CSS_SELECTOR, "button.tinydit-generate").click()
    wait.until(lambda d: "error" in status(d))
    assert "seed: expected an integer >= 0, got -1" in status(browser)  # the pipeline's one line, in the page
    assert data.pil_to_tensor(page_image(browser)).equal(data.pil_to_tensor(image))  # the last good picture stays


def one_line_error(argv: list[str], capsys) -> str:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m tinydit demo: error: "), err
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--port", "0"], "argument --port: expected an integer in 1..65535, got 0"),
    (["--model", "{d}/no_such_model"], "--model: no local folder '"),
    (["--ip", "no.such.host.invalid"], "--ip: cannot listen on no.such.host.invalid:"),
    (["--ip", "192.0.2.1"], "--ip: cannot listen on 192.0.2.1:"),  # a documentation address, not this machine's
])
def test_bad_demo_flags_are_one_line_before_any_server(args, expected, tmp_path, capsys):
    port = [] if "--port" in args else ["--port", str(free_port())]  # the default port may be in use here
    assert expected in one_line_error(["demo", *port, *(a.format(d=tmp_path) for a in args)], capsys)


def test_a_busy_port_is_refused_not_moved(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(["demo", "--port", str(port)], capsys)
    assert f"--port: cannot listen on 127.0.0.1:{port}" in line


@pytest.fixture(scope="module")
def pipe():
    from tinydit.pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained()


def test_demo_offers_only_samplers_that_fit_the_model(pipe):
    from tinydit.demo import GenerateDemo
    from tinydit.samplers import SAMPLERS

    demo = GenerateDemo(pipe)
    assert set(demo.sampler.options) == {n for n in SAMPLERS if not n.endswith("_rf")}  # a v-prediction model
    for name in demo.sampler.options:  # every offered one draws
        demo.sampler.value, demo.steps.value = name, 2
        assert demo.generate() is not None, (name, demo.status.value)


def test_demo_maps_one_panel_per_kept_token(pipe):
    from tinydit.demo import attention_maps

    with pytest.warns(UserWarning, match="62 tokens is more than"):  # 62 tokens > 32: truncated, and said so
        _, attn, words = attention_maps(pipe, " ".join(["a red circle"] * 20), num_inference_steps=2)
    assert len(words) == attn.shape[0] and words[-1] == "<|endoftext|>"  # what the encoder kept, truncated as it does


def test_any_failure_of_a_click_is_shown_in_the_page(pipe):
    from tinydit.demo import GenerateDemo
    from tinydit.pipeline import TextToImagePipeline

    def broken_checker(images, prompts):
        raise RuntimeError("checker offline")

    demo = GenerateDemo(TextToImagePipeline(**{**pipe.components, "safety_checker": broken_checker}))
    demo.steps.value = 2
    demo.button.click()  # what a press in the page does: the click handler, in the kernel
    assert demo.status.value == "<b>error</b>: RuntimeError: checker offline"
    assert not demo.button.disabled  # ready for the next press
