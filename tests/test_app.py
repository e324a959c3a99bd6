"""app.py, the Gradio page: served on 127.0.0.1 with a small checkpoint made here, driven by a real
headless browser (Debian's chromium + chromedriver through Selenium) and by gradio_client. The page's
picture must be the API's overlay, byte for byte in pixels; bad input gets a message and the server
keeps serving; requests run one at a time.

This file's browser driver also makes README's screenshot and docs/measurements.md's timings:

    python tests/test_app.py screenshot --ckpt runs/demo/best.pth --out docs/app.png
    python tests/test_app.py measure --ckpt runs/demo/best.pth
"""
import argparse
import io
import os
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import save_model_checkpoint, smoke_checkpoint

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import app
from helpers import inference

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PHRASES = ["red circle", "blue square"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model, examples=()):
    """The app on 127.0.0.1 at a free port in this process: (demo, url). demo.close() stops it."""
    demo = app.build_app(model, examples)
    app.launch(demo, port=free_port(), block=False)
    return demo, demo.local_url


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A smoke-sized checkpoint (random weights) and a picture: (checkpoint path, picture path)."""
    out = smoke_checkpoint(tmp_path_factory.mktemp("app"), "photo.png", (90, 120))
    return out / "best.pth", out / "photo.png"


@pytest.fixture(scope="module")
def server(ckpt):
    """(model, url, picture) with the app serving; stopped when the module's tests are done."""
    model = inference.load_model(ckpt[0], "cpu")
    demo, url = serve(model)
    try:
        yield model, url, ckpt[1]
    finally:
        demo.close()


def expected_overlay(model, image, phrases, threshold=0.35):
    """What the page must show: the Python API's overlay of the Python API's masks."""
    return inference.overlay(inference.open_image(image), inference.predict(model, image, phrases, threshold), phrases)


# ----------------------------------------------------------------------------- the browser

def browser(width=1280, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def wait(condition, timeout=60, what="the page"):
    """condition()'s first truthy value, polled; a clear failure after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - the element is not there yet, or is being redrawn
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not appear within {timeout} s")


def result_src(driver):
    """The src of the result's picture once the browser has it loaded and drawn, else None."""
    return driver.execute_script(
        "const img = document.querySelector('#result img');"
        "return img && img.complete && img.naturalWidth > 0 ? img.src : null;")


def upload(driver, path):
    from selenium.webdriver.common.by import By
    wait(lambda: driver.find_element(By.CSS_SELECTOR, "#picture input[type=file]"),
         what="the picture's upload field").send_keys(str(path))
    wait(lambda: driver.execute_script("return document.querySelector('#picture img') !== null"),
         what="the uploaded picture's preview")


def segment(driver, phrases, previous=None):
    """Type the phrases (one per line), press Segment: (the picture's URL, seconds from the press to the
    picture drawn on the page)."""
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.CSS_SELECTOR, "#phrases textarea")
    box.clear()
    box.send_keys("\n".join(phrases))
    start = time.perf_counter()
    driver.find_element(By.CSS_SELECTOR, "#segment").click()
    src = wait(lambda: (s := result_src(driver)) and s != previous and s, what="the result picture")
    return src, time.perf_counter() - start


def fetch_image(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


needs_chromium = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                                           "chromium-driver; .ci/run installs them)")


@pytest.mark.slow
@needs_chromium
def test_browser_shows_the_api_overlay_and_a_message_for_a_bad_file(server, tmp_path):
    from selenium.webdriver.common.by import By
    model, url, photo = server
    (tmp_path / "notes.png").write_text("this is not a picture")
    driver = browser()
    try:
        driver.get(url)
        wait(lambda: driver.find_element(By.CSS_SELECTOR, "#segment"), what="the app's page")
        upload(driver, photo)
        src, _ = segment(driver, PHRASES)
        shown = np.asarray(fetch_image(src))
        assert shown.shape == (90, 120, 3)  # the picture's own size
        assert np.array_equal(shown, np.asarray(expected_overlay(model, photo, PHRASES)))
        legend = driver.find_element(By.CSS_SELECTOR, "#legend").text
        assert all(p in legend for p in PHRASES)
        links = driver.find_elements(By.CSS_SELECTOR, "#downloads a")
        assert any("1_red_circle.png" in (a.get_attribute("href") or "") for a in links)
        driver.save_screenshot(str(tmp_path / "page.png"))
        with Image.open(tmp_path / "page.png") as shot:
            assert shot.size[0] > 600

        upload(driver, tmp_path / "notes.png")  # not an image, though named .png
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        page = wait(lambda: (t := driver.find_element(By.TAG_NAME, "body").text) and "not an image" in t and t,
                    what="the message for a file that is not an image")
        assert "notes.png: not an image" in page and "Traceback" not in driver.page_source

        upload(driver, photo)  # and the server still serves
        src2, _ = segment(driver, PHRASES[:1], previous=src)
        assert np.array_equal(np.asarray(fetch_image(src2)), np.asarray(expected_overlay(model, photo, PHRASES[:1])))
    finally:
        driver.quit()


# ----------------------------------------------------------------------------- the Python client

def test_client_gets_predicts_masks_and_messages(server, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    model, url, photo = server
    client = Client(url, verbose=False)
    picture, legend, files = client.predict(handle_file(str(photo)), "\n".join(PHRASES) + "\n\n", 0.4, "masks",
                                            api_name="/segment")
    masks = inference.predict(model, photo, PHRASES, threshold=0.4)
    assert [Path(f).name for f in files] == ["1_red_circle.png", "2_blue_square.png"]
    for f, mask in zip(files, masks):
        with Image.open(f) as im:
            assert np.array_equal(np.asarray(im) > 0, mask)
    with Image.open(picture) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected_overlay(model, photo, PHRASES, 0.4)))
    prob_picture = client.predict(handle_file(str(photo)), PHRASES[0], 0.35, "probability", api_name="/segment")[0]
    probs = inference.predict_proba(model, photo, PHRASES[:1])
    with Image.open(prob_picture) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")),
                              np.asarray(inference.overlay(inference.open_image(photo), probs, PHRASES[:1])))

    (tmp_path / "notes.jpg").write_text("not an image")
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    # the server runs in this process: 40,000 pixels > 2 x 15,000 (PIL's error) > 90 x 120 (the photo's)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15000)
    too_long = " ".join(["small red square"] * 10)
    cases = [(tmp_path / "notes.jpg", "x", "notes.jpg: not an image"),
             (tmp_path / "big.png", "x", "big.png: image too large to decode safely"),
             (photo, " \n \n", "Type a phrase"),
             (photo, too_long, "is longer than this model reads"),
             (photo, "<img src=x onerror=alert(1)> " * 5, '"&lt;img src=x onerror=alert\\(1\\)&gt;'),  # shown as text
             (photo, "\n".join(f"shape {k}" for k in range(app.MAX_PHRASES + 1)), f"at most {app.MAX_PHRASES}")]
    for image, text, message in cases:
        with pytest.raises(AppError, match=message) as error:
            client.predict(handle_file(str(image)), text, 0.35, "masks", api_name="/segment")
        assert "Traceback" not in str(error.value) and str(tmp_path) not in str(error.value)
    monkeypatch.undo()
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(21 * 2**20)  # past app.MAX_UPLOAD (20 MB), which the page tells its clients
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(handle_file(str(tmp_path / "huge.png")), "x", 0.35, "masks", api_name="/segment")
    assert client.predict(handle_file(str(photo)), "red circle", 0.35, "masks", api_name="/segment")[2]


def test_requests_queue_and_the_model_runs_one_at_a_time(server, monkeypatch):
    from gradio_client import Client, handle_file
    model, url, photo = server
    inside, most, lock = [0], [0], threading.Lock()
    forward = type(model).forward

    def counted(self, *args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.2)  # long enough for the requests to overlap if they could
            return forward(self, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1
    monkeypatch.setattr(type(model), "forward", counted)
    client = Client(url, verbose=False)
    jobs = [client.submit(handle_file(str(photo)), f"shape {k}", 0.35, "masks", api_name="/segment") for k in range(4)]
    assert all(job.result(timeout=60)[2] for job in jobs)
    assert most[0] == 1


def test_the_page_listens_on_this_machine_only_unless_asked(server, monkeypatch, ckpt, tmp_path, capsys):
    from cris_files import write_cris_checkpoint

    import model
    _, url, _ = server
    assert url.startswith("http://127.0.0.1:")
    seen = {}
    monkeypatch.setattr(app, "launch", lambda demo, host, port, share: seen.update(host=host, port=port, share=share))
    app.main(["--ckpt", str(ckpt[0]), "--device", "cpu"])
    assert seen == {"host": "127.0.0.1", "port": None, "share": False}
    assert not (ROOT / "app.pyi").exists()  # building the page writes nothing into the repository
    app.main(["--ckpt", str(ckpt[0]), "--device", "cpu", "--host", "0.0.0.0", "--port", "8123", "--share"])
    assert seen == {"host": "0.0.0.0", "port": 8123, "share": True}
    write_cris_checkpoint(model.build_model("smoke", deform=False, se=False), tmp_path / "best_model.pth")
    app.main(["--ckpt", str(tmp_path / "best_model.pth"), "--device", "cpu"])  # CRIS's training code's format
    assert "best_model.pth on cpu" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="app.py: error: .*missing.pth"):
        app.main(["--ckpt", str(tmp_path / "missing.pth"), "--device", "cpu"])
    with pytest.raises(SystemExit):
        app.main(["--ckpt", str(ckpt[0]), "--port", "70000"])
    assert "expected a port number from 1 to 65535" in capsys.readouterr().err


def test_without_a_checkpoint_it_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    with pytest.raises(SystemExit) as exit_info:
        app.main([])
    assert exit_info.value.code == f"app.py: no --ckpt and no demo run under runs/; make one with: {app.DEMO_COMMAND}"
    assert app.DEMO_COMMAND.split("/")[-1] in (ROOT / "README.md").read_text()  # the README's own command


def test_the_newest_demo_run_and_its_test_images_are_the_default(tmp_path, monkeypatch):
    data = tmp_path / "cache" / "synthetic"
    (data / "VGPhraseCut_v0" / "images").mkdir(parents=True)
    tasks = [{"image_id": i, "phrase": f"shape {i}.{k}", "task_id": f"{i}__{k}"} for i in (7, 3, 9, 4, 5) for k in (0, 1)]
    (data / "VGPhraseCut_v0" / "refer_test.json").write_text(__import__("json").dumps(tasks))
    for i in (7, 3, 9, 4, 5):
        Image.new("RGB", (8, 8)).save(data / "VGPhraseCut_v0" / "images" / f"{i}.jpg")
    for k, name in enumerate(["demo-20260101-000000", "demo-20260102-000000", "paper-20260103-000000"]):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "best.pth").write_bytes(b"")
        os.utime(run / "best.pth", (1000 + k, 1000 + k))
        (run / "config.json").write_text('{"data_dir": "cache/synthetic"}')  # relative to where train.py ran
    monkeypatch.chdir(tmp_path)
    newest = app.newest_demo_checkpoint()
    assert newest == Path("runs/demo-20260102-000000/best.pth")
    examples = app.synthetic_examples(newest)
    assert [(Path(p).name, text) for p, text in examples] == [
        (f"{i}.jpg", f"shape {i}.0\nshape {i}.1") for i in (7, 3, 9, 4)]
    monkeypatch.chdir(ROOT)  # the data_dir is then found beside the run's folder
    assert all(Path(p).is_absolute() for p, _ in examples)
    assert app.synthetic_examples(tmp_path / newest) == [(str(data.resolve() / "VGPhraseCut_v0" / "images" / Path(p).name), t)
                                                         for p, t in examples]
    assert app.synthetic_examples(tmp_path / "elsewhere" / "best.pth") == []
    (tmp_path / "runs" / "demo").mkdir()  # the name train.py gives a demo run now, newer than the dated ones
    (tmp_path / "runs" / "demo" / "best.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert app.newest_demo_checkpoint() == Path("runs/demo/best.pth")


# ----------------------------------------------------------------------------- one heavy request, every way out

TEN_PHRASES = [f"shape number {k}" for k in range(10)]


def huge_jpeg(path, side=9400):
    """A small JPEG of side x side pixels (a few MB of memory here, 88 million pixels decoded in full)."""
    from PIL import ImageDraw
    image = Image.new("RGB", (side, side), (120, 80, 40))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, side // 2, side // 2), fill=(200, 30, 30))
    image.save(path, quality=60)
    return path


def start_server(ckpt, tmp_path):
    """app.py in its own process, as a user starts it, with its temporary files under tmp_path/"tmp":
    (process, url) once the page answers."""
    from tooling import start_tool
    (tmp_path / "tmp").mkdir()
    port = free_port()
    proc = start_tool("app.py", "--ckpt", ckpt, "--device", "cpu", "--port", port,
                      env={"TMPDIR": str(tmp_path / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    end = time.monotonic() + 240
    while time.monotonic() < end and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"app.py did not serve within 240 s:\n{proc.communicate()[1][-3000:]}")


def peak_memory(pid):
    """The process's peak resident memory in bytes (Linux: VmHWM of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def left_behind(tmp_path):
    return sorted(p.name for p in (tmp_path / "tmp").iterdir())


def test_fit_picture_reduces_a_large_picture_and_says_so(ckpt, tmp_path):
    model = inference.load_model(ckpt[0], "cpu")
    big = Image.new("RGB", (app.MAX_SIDE * 2 + 10, 300), (10, 200, 30))
    picture, legend, files = app.segment(model, big, "red circle\nblue square", out_dir=tmp_path)
    assert picture.size == (app.MAX_SIDE, round(300 * app.MAX_SIDE / (app.MAX_SIDE * 2 + 10)))
    assert f"The picture is {app.MAX_SIDE * 2 + 10}x300 pixels" in legend and f"reduced to {picture.width}x" in legend
    with Image.open(files[0]) as mask:
        assert mask.size == picture.size
    jpeg = huge_jpeg(tmp_path / "big.jpg", side=5000)
    decoded = inference.open_image(jpeg, max_side=app.MAX_SIDE)
    assert decoded.size == (app.MAX_SIDE, app.MAX_SIDE) and decoded.info["original_size"] == (5000, 5000)
    small = app.segment(model, ckpt[1], "red circle")[1]
    assert "reduced" not in small


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc (Linux)")
def test_one_huge_picture_with_ten_phrases_stays_bounded_and_sigterm_cleans_up(ckpt, tmp_path):
    """docs/measurements.md's figure: a 9,400 x 9,400 JPEG with ten phrases, on the loopback."""
    from gradio_client import Client, handle_file
    jpeg = huge_jpeg(tmp_path / "huge.jpg")
    proc, url = start_server(ckpt[0], tmp_path)
    try:
        before = peak_memory(proc.pid)
        start = time.perf_counter()
        picture, legend, files = Client(url, verbose=False).predict(
            handle_file(str(jpeg)), "\n".join(TEN_PHRASES), 0.35, "masks", api_name="/segment")
        seconds = time.perf_counter() - start
        peak = peak_memory(proc.pid)
        print(f"huge request: {jpeg.stat().st_size / 2 ** 20:.1f} MB JPEG of 9400x9400, ten phrases: "
              f"{seconds:.1f} s, server peak {peak / 2 ** 30:.2f} GiB (at start {before / 2 ** 30:.2f} GiB)")
        assert peak < 2 * 2 ** 30, f"the server's peak memory was {peak / 2 ** 30:.2f} GiB"
        side = app.MAX_SIDE
        assert len(files) == 10 and f"was reduced to {side}x{side}" in legend
        with Image.open(picture) as shown:
            assert shown.size == (side, side)
        assert left_behind(tmp_path)  # the server's folder, with Gradio's cache of the upload in it
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err, err[-3000:]
    assert left_behind(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_removes_the_servers_files_too(ckpt, tmp_path):
    from gradio_client import Client, handle_file
    proc, url = start_server(ckpt[0], tmp_path)
    try:
        assert Client(url, verbose=False).predict(handle_file(str(ckpt[1])), "red circle", 0.35, "masks",
                                                  api_name="/segment")[2]
        assert left_behind(tmp_path)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "Traceback" not in err and left_behind(tmp_path) == []


# ----------------------------------------------------------------------------- README's screenshot, the timings

def main(argv=None):
    p = argparse.ArgumentParser(description="Drive app.py in headless chromium: the README screenshot, the timings.")
    p.add_argument("what", choices=["screenshot", "measure"])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", default="docs/app.png")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    model = inference.load_model(args.ckpt, "cpu")
    examples = app.synthetic_examples(args.ckpt)
    if not examples:
        sys.exit("the checkpoint's run has no synthetic test images beside it (its config.json's data_dir)")
    image, text = examples[0]
    phrases = text.splitlines()
    demo, url = serve(model, examples)
    driver = browser(1280, 1000)
    try:
        driver.get(url)
        upload(driver, image)
        if args.what == "screenshot":
            segment(driver, phrases[:3])
            driver.save_screenshot(args.out + ".tmp.png")
            shutil.move(args.out + ".tmp.png", args.out)
            print(f"{args.out}: {image} with {phrases[:3]}")
            return
        print(f"{args.ckpt}: {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; {image}")
        src = None
        pool = list(dict.fromkeys(p for _, t in examples for p in t.splitlines()))  # the examples' phrases
        for n in (1, 5):
            times = []
            for k in range(args.repeat + 1):  # the first press warms up, not counted
                words = (pool[k:] + pool[:k])[:n]  # each press other phrases: a new picture, a new src to wait for
                src, seconds = segment(driver, words, previous=src)
                times.append(seconds)
            print(f"{n} phrase{'s' * (n > 1)}, e.g. {words}: median {np.median(times[1:]):.3f} s, min {min(times[1:]):.3f} s "
                  f"over {args.repeat} presses (first press {times[0]:.3f} s)")
    finally:
        driver.quit()
        demo.close()


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- what the page says of its model

def test_the_page_says_what_its_model_knows_and_how_to_share(ckpt, tmp_path, capsys):
    import json

    from helpers import provenance
    header = {"dataset": "phrasecut", "split": "train", "num_tasks": 40, "num_images": 10, "synthetic": {"seed": 0}}
    record = provenance.run_record("smoke", 2, 2, 0.25, header, {**header, "split": "val"})
    net = inference.load_model(ckpt[0], "cpu", engine="eager", precision="fp32")  # the plain model, to save
    path = save_model_checkpoint(net, tmp_path / "synthetic.pth", trained_on=record)
    pages = {}
    for name, checkpoint in (("synthetic", path), ("unknown", ckpt[0])):
        demo, url = serve(inference.load_model(checkpoint, "cpu"))
        try:
            with urllib.request.urlopen(url + "config", timeout=30) as response:  # what the browser renders
                pages[name] = json.dumps(json.load(response))
            lines = app.served_lines(demo)
        finally:
            demo.close()
    assert "Trained on synthetic shapes and colours (sources/synthetic.py) (train split: 40 phrases on 10 images), " \
           "preset smoke, 2 epochs, best val mean IoU 25.0 %." in pages["synthetic"]
    assert app.SYNTHETIC_NOTE_HTML in pages["synthetic"] and "synthetic-note" in pages["synthetic"]
    assert "Trained on unknown" in pages["unknown"] and app.SYNTHETIC_NOTE_HTML not in pages["unknown"]
    # Gradio's own advice names launch()'s argument; the tool's flag is --share
    printed = capsys.readouterr().out + lines
    assert "share=True" not in printed and "--share" in lines and url in lines


@pytest.mark.slow
def test_the_tool_names_its_own_share_flag(ckpt):
    """app.py as a user starts it: its start-up lines give the address and --share, never Gradio's
    `share=True` advice (a launch() argument the user cannot type)."""
    from tooling import start_tool
    proc = start_tool("app.py", "--ckpt", ckpt[0], "--device", "cpu", "--port", free_port(),
                      env={"GRADIO_ANALYTICS_ENABLED": "False"})
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("--share" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    printed = "".join(lines) + out
    assert "app.py: open http://127.0.0.1:" in printed and "run it with --share" in printed, (printed, err[-2000:])
    assert "share=True" not in printed + err


# ----------------------------------------------------------------------------- a phrase that names nothing

def rigged_gres_model(photo, nothing, something):
    """A demo-gres model (random weights) whose no-target head answers "nothing" for the phrase `nothing` and
    "target" for `something` on `photo`: its last layer is set to separate the two phrases' hidden features."""
    import model as model_module
    torch.manual_seed(0)
    net = model_module.build_model("demo-gres").eval()
    pixels, _ = inference.transforms.letterbox(inference.open_image(photo), net.config.input_size)
    tokens = inference.transforms.tokenize([nothing, something], net.config.word_len)
    hidden = {}
    handle = net.no_target.mlp[1].register_forward_hook(lambda m, i, out: hidden.update(h=out.detach().clone()))
    with torch.no_grad():
        net(pixels[None].repeat(2, 1, 1, 1), tokens)
        handle.remove()
        a, b = hidden["h"]
        last = net.no_target.mlp[2]
        last.weight.copy_((a - b)[None])
        last.bias.fill_(float(-(a - b) @ (a + b) / 2))  # > 0 for `nothing`, < 0 for `something`
    return net


@pytest.mark.slow
@needs_chromium
def test_browser_says_not_found_for_a_phrase_that_names_nothing(ckpt, tmp_path):
    from selenium.webdriver.common.by import By
    photo = ckpt[1]
    candidates = ["red circle", "blue square", "green star", "small white hexagon", "yellow diamond"]
    net = rigged_gres_model(photo, "purple star", "red circle")
    masks = inference.predict(net, photo, candidates)
    found = next(p for p, m in zip(candidates, masks) if m.any() and p != "purple star")  # one that shows a mask
    net = rigged_gres_model(photo, "purple star", found)
    save_model_checkpoint(net, tmp_path / "gres.pth")
    model = inference.load_model(tmp_path / "gres.pth", "cpu")
    masks = inference.predict(model, photo, ["purple star", found])
    assert not masks[0].any() and masks[1].any()  # the API: an empty mask for the phrase that names nothing
    picture, legend, _ = app.segment(model, inference.open_image(photo), f"purple star\n{found}")
    assert f"purple star: {inference.NOT_FOUND}" in legend and f"{found}: {inference.NOT_FOUND}" not in legend
    demo, url = serve(model)
    driver = browser()
    try:
        driver.get(url)
        wait(lambda: driver.find_element(By.CSS_SELECTOR, "#segment"), what="the app's page")
        upload(driver, photo)
        segment(driver, ["purple star", found])
        rows = wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#legend li"), what="the legend")
        texts = [r.text for r in rows]
        assert texts[0] == "purple star: not found in the picture" and "% of the picture" in texts[1]
        assert not rows[0].find_elements(By.TAG_NAME, "span")  # no colour for it: nothing is painted
        assert rows[1].find_elements(By.TAG_NAME, "span")
    finally:
        driver.quit()
        demo.close()
