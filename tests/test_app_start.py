"""app.py's start and end, as a careless or hostile file and a busy machine meet them: a checkpoint's `trained_on`
record shown as plain text on the page and escaped in the terminal, whatever it holds; a taken --port said in one
line; SIGTERM ending the server with the project's own line, code 143 and its temporary folder removed."""
import json
import signal
import socket

import pytest
import torch
from test_app import browser, needs_chromium, serve, wait
from tooling import save_model_checkpoint, smoke_checkpoint, start_tool

import app
import model
from helpers import inference, provenance

# A record as a hostile file may hold it: Markdown (a phishing link, an image fetched from another host by every
# visitor, a heading), HTML, a terminal escape, a forged line of the tool's own, and fields of the wrong type.
NAME = ("[click here](http://evil.example/phish) ![pixel](http://evil.example/p.png)\n# Forged heading <b>bold</b> "
        "\x1b[2J\napp.py: note: forged")
HOSTILE = {"dataset": "x", "name": NAME, "train": {"split": 3, "tasks": 1, "images": 1}, "val": "x",
           "preset": {"nested": {"deeper": [1, 2]}}, "epochs": "many", "planned_epochs": 10 ** 30,
           "best_val_mIoU": float("nan"), "units": "u" * 1_000_000}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a smoke model's checkpoint with the hostile record, one whose record is not even a dict)."""
    out = smoke_checkpoint(tmp_path_factory.mktemp("start"), "photo.png", (40, 50))
    torch.manual_seed(0)
    net = model.build_model("smoke")
    return (save_model_checkpoint(net, out / "hostile.pth", trained_on=HOSTILE),
            save_model_checkpoint(net, out / "string.pth", trained_on="trained on everything"))


def started(ckpt, monkeypatch, capsys):
    """app.main on `ckpt` up to the launch: (what it printed, the page's Blocks config)."""
    seen = {}
    monkeypatch.setattr(app, "launch", lambda demo, host, port, share: seen.update(config=demo.get_config_file()))
    app.main(["--ckpt", str(ckpt), "--device", "cpu", "--precision", "fp32"])
    return capsys.readouterr().out, seen["config"]


def test_the_page_shows_the_record_as_text_and_the_terminal_escaped(files, monkeypatch, capsys):
    printed, config = started(files[0], monkeypatch, capsys)
    line = provenance.describe(inference.load_model(files[0], "cpu", precision="fp32").trained_on)
    assert line.startswith("trained on [click here](http://evil.example/phish)")
    assert line.endswith("(unreadable in the checkpoint's record: train, val, preset, epochs, planned_epochs, "
                         "best_val_mIoU)")
    # the terminal: one line, the escape and the forged line escaped
    assert printed.count("\n") == 1 and printed.startswith("app.py: ") and "\x1b" not in printed
    assert "\\x1b[2J\\napp.py: note: forged" in printed and "unreadable in the checkpoint's record" in printed
    # the page: the record in an HTML block, every character escaped; nothing of it in a Markdown block
    components = config["components"]
    shown = next(c for c in components if c.get("props", {}).get("elem_id") == "trained-on")
    assert shown["type"] == "html"
    value = shown["props"]["value"]
    assert value == app.trained_on_html(app_title(files[0]), line)
    assert "[click here](http://evil.example/phish)" in value and "&lt;b&gt;bold&lt;/b&gt;" in value
    assert "<a" not in value and "<img" not in value and "<b>" not in value
    markdown = [c["props"].get("value") or "" for c in components if c["type"] == "markdown"]
    assert markdown and not any("evil.example" in text for text in markdown)
    assert len(json.dumps(config)) < 100_000  # the megabyte of `units` is nowhere on the page


@pytest.mark.slow
@needs_chromium
def test_the_browser_shows_the_record_as_text(files):
    from selenium.webdriver.common.by import By
    demo, url = serve(inference.load_model(files[0], "cpu", precision="fp32"))
    driver = browser()
    try:
        driver.get(url)
        block = wait(lambda: driver.find_element(By.CSS_SELECTOR, "#trained-on"), what="the model's line")
        text = wait(lambda: "Trained on" in block.text and block.text, what="the model's line drawn")
        for literal in ("[click here](http://evil.example/phish)", "![pixel](http://evil.example/p.png)",
                        "# Forged heading <b>bold</b>", "app.py: note: forged"):
            assert literal in text, text
        assert not block.find_elements(By.CSS_SELECTOR, "a, img, b, h1, h3")  # only the title's h2 and the line
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and not any("evil.example" in name for name in fetched)
    finally:
        driver.quit()
        demo.close()


def app_title(ckpt):
    return f"SegVLM: {ckpt.parent.name}/{ckpt.name}"


def test_a_record_that_is_not_a_dict_is_said_unreadable(files, monkeypatch, capsys):
    printed, config = started(files[1], monkeypatch, capsys)
    assert printed.startswith(f"app.py: {files[1]} on cpu, engine ")
    assert printed.endswith(": trained on unknown (the checkpoint's record of it is unreadable)\n")
    assert "Trained on unknown (the checkpoint&#x27;s record of it is unreadable)." in json.dumps(config)


def test_a_taken_port_is_said_with_the_tools_flag(files, monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where main's temporary folder goes
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            app.main(["--ckpt", str(files[1]), "--device", "cpu", "--precision", "fp32", "--port", str(port)])
    assert exit_info.value.code == (f"app.py: error: port {port} is taken on 127.0.0.1; pass another --port, or "
                                    f"none for the next free one")
    assert list(tmp_path.iterdir()) == []  # its temporary folder removed


@pytest.mark.slow
def test_sigterm_ends_the_server_with_its_own_line_and_code_143(files, tmp_path):
    """app.py as a user runs it, stopped as a service manager stops it."""
    from test_app import free_port
    (tmp_path / "tmp").mkdir()
    proc = start_tool("app.py", "--ckpt", files[1], "--device", "cpu", "--port", free_port(),
                      env={"TMPDIR": str(tmp_path / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        for line in proc.stdout:  # until the page is served
            if line.startswith("app.py: open http://127.0.0.1:"):
                break
        assert list((tmp_path / "tmp").iterdir())  # the server's folder exists while it serves
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.splitlines()[-1] == "app.py: stopped by SIGTERM; temporary files removed", err[-2000:]
    assert "Keyboard interruption" not in err and "Traceback" not in err
    assert list((tmp_path / "tmp").iterdir()) == []
