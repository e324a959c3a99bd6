"""Try a checkpoint in a browser: upload a picture, type phrases, see each phrase's mask.

    python app.py                                 # the newest demo run's best.pth under runs/
    python app.py --ckpt runs/paper/best.pth      # any checkpoint model_files.load_checkpoint reads
    python app.py --ckpt best_model.pth           # written by CRIS's training code (docs/cris.md)
    python app.py --host 0.0.0.0 --port 8080 --share   # only when asked for (see below)

Then open the address it prints (http://127.0.0.1:7860 unless that port is taken). The page takes a
picture (uploaded, pasted, or one of the examples), one phrase per line, a threshold (default 0.35,
the evaluation's) and a view: the masks, each in its own colour with a legend, or the probability
maps. It shows the picture with every phrase drawn on it and offers each mask as a PNG. Under the
title it says what the checkpoint was trained on (`model.trained_on`: dataset, split sizes, preset,
epochs, best val score), as plain text: the record is the file's, so nothing in it is read as
Markdown or HTML (a link, an image from another host, a heading), and the terminal gets it with its
control characters escaped (helpers.cli.shown). A field the file holds in the wrong form is named as
unreadable (provenance.checked), never a traceback. On a model trained on the synthetic set only, a
note says that its masks on photos mean nothing.

The page calls the Python API, nothing else: `inference.iter_proba` for all the phrases at once
(the image encoded once, as `inference.predict` does) and overlay's `tint` and `draw_legend` for the
picture, so the page's picture is exactly `overlay(image, predict(model, image, phrases), phrases)`. On a CUDA
machine the model runs as `engines.FastSegVLM`, on a CPU on OpenVINO where it is installed (load_model's "auto").

Serving: it listens on 127.0.0.1, this machine only; `--host 0.0.0.0` opens it to the network and
`--share` asks Gradio for a public link, each only when given. Requests wait in one queue and the
model runs one at a time, so a burst of users cannot run it out of memory. A file that is not an
image or is past PIL's decompression-bomb limit (inference.open_image), an upload over 20 MB, no
phrase, more phrases than there are colours, or a phrase longer than the model reads gets a
one-line message on the page; any other failure is logged here and the page says only that it
failed, so no traceback reaches the page. Uploads and results are deleted from Gradio's cache
after an hour.

Memory: one request's work is bounded by the picture the page works on, whatever the upload. A
picture over MAX_SIDE (3072) pixels a side is reduced to it while it is decoded (a JPEG at a reduced
DCT scale, so a 1.6 MB JPEG of 9,400 x 9,400 never costs its full size), and the legend says so; its
masks are at the reduced size. The phrases' full-size maps are made one at a time and kept only as
bool masks (`segment`). docs/measurements.md has the server's peak memory for ten phrases on such a
picture. The server's files (its masks, and Gradio's cache of the uploads, GRADIO_TEMP_DIR pointed
there) live in one temporary folder, removed however it ends: an error, or Ctrl-C and SIGTERM, which
end it with one line ("app.py: stopped by SIGTERM; temporary files removed") and the shell's code
128 + the signal's number, as every tool of this project (helpers.cli.run_tool). A --port that is
taken is said in one line, with the flag to change.
"""
import argparse
import atexit
import errno
import html
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import provenance, transforms
from helpers.cli import parse_device, run_tool, shown
from helpers.engines import CHOICES, PRECISIONS, net_device
from helpers.files import read_json, save_mask
from helpers.inference import NOT_FOUND, PALETTE, as_image, draw_legend, iter_proba, load_model, open_image, tint
from model import DEFAULT_THRESHOLD

MAX_PHRASES = len(PALETTE)  # one colour each
SYNTHETIC_NOTE_HTML = html.escape(provenance.SYNTHETIC_NOTE)
MAX_UPLOAD = "20mb"
MAX_SIDE = 3072  # a picture with a longer side is reduced to this many pixels (the model sees input_size)
NUM_EXAMPLES = 4
VIEWS = ("masks", "probability")
DEMO_COMMAND = ".venv/bin/torchrun --standalone --nproc_per_node=2 train.py --preset demo"
log = logging.getLogger("segvlm.app")


def parse_phrases(text, word_len):
    """The page's text box -> its phrases, one per non-blank line; a ValueError with the message to
    show when there is none, too many, or one longer than the model's word_len tokens."""
    phrases = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not phrases:
        raise ValueError("Type a phrase (one per line), e.g. small red square.")
    if len(phrases) > MAX_PHRASES:
        raise ValueError(f"{len(phrases)} phrases: at most {MAX_PHRASES} at once, one colour each.")
    for phrase in phrases:
        kept = transforms.kept_words(phrase, word_len)
        if kept is not None:
            raise ValueError(f'"{phrase[:80]}" is longer than this model reads ({word_len - 2} tokens): it would see '
                             f'only "{kept}". Shorten it.')
    return phrases


def fit_picture(image):
    """(the picture the page works on, its original (width, height) or None): a picture whose longer side
    exceeds MAX_SIDE is reduced to it (aspect kept). decode_upload has already reduced an upload while
    decoding it (image.info["original_size"] says from what); a path or an array given to segment is
    reduced here."""
    original = image.info.get("original_size")
    if max(image.size) > MAX_SIDE:
        original = original or image.size
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
    return image, original


def segment(model, image, text, threshold=DEFAULT_THRESHOLD, view="masks", out_dir=None):
    """What the page shows for one request: (picture, legend HTML, mask PNG paths).

    image: an RGB PIL image (the page's upload, decoded by open_image); text: the phrases, one per
    line. The picture is overlay(image, masks, phrases) with masks = predict's (probabilities >
    threshold), or, for view "probability", the probability maps themselves. Each mask is written to
    out_dir as <k>_<phrase>.png (0/255, the image's size). Bad input: a ValueError with the message.

    Memory is bounded by the picture, not by the number of phrases: the model runs once, then each
    phrase's map is made at full size, tinted into the picture, thresholded into a bool mask, written
    and dropped before the next (inference.iter_proba). A picture over MAX_SIDE is reduced first
    (fit_picture), and the legend says so."""
    if image is None:
        raise ValueError("Upload a picture first (or pick an example below).")
    phrases = parse_phrases(text, model.config.word_len)
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"The threshold must be between 0 and 1, got {threshold!r}.")
    if view not in VIEWS:
        raise ValueError(f"Show one of {', '.join(VIEWS)}, not {view!r}.")
    image, original = fit_picture(as_image(image))  # a path or an array too, as predict takes them
    base = np.asarray(image, dtype=np.float32)  # overlay's own start: the page's picture is overlay's
    rows, paths = [], []
    for k, (phrase, prob, color) in enumerate(zip(phrases, iter_proba(model, image, phrases), PALETTE), 1):
        mask = prob > threshold  # one forward pass for all phrases: the image encoded once
        tint(base, prob if view == "probability" else mask, color, out=base)  # in place: no second copy
        del prob  # the only float map of the picture's size, one phrase at a time
        if mask.any():
            rows.append(f'<li><span style="display:inline-block;width:1em;height:1em;vertical-align:middle;'
                        f'background:rgb{tuple(color)}"></span> {html.escape(phrase)}: {100 * mask.mean():.1f}% of '
                        f'the picture</li>')
        else:  # an empty mask is the answer "no target": said in words, without a colour
            rows.append(f'<li class="not-found">{html.escape(phrase)}: {NOT_FOUND}</li>')
        if out_dir is not None:
            slug = "".join(ch if ch.isalnum() else "_" for ch in phrase)[:40].strip("_") or "phrase"
            paths.append(Path(out_dir) / f"{k}_{slug}.png")
            save_mask(mask, paths[-1])
    picture = draw_legend(Image.fromarray(np.round(base, out=base).astype(np.uint8)), phrases, PALETTE)
    note = "" if original is None else (
        f"<p>The picture is {original[0]}x{original[1]} pixels; the page works at most {MAX_SIDE} pixels a side, so "
        f"it was reduced to {image.width}x{image.height}, and the masks are at that size.</p>")
    legend = f'{note}<ul style="list-style:none;padding:0">{"".join(rows)}</ul>'
    return picture, legend, [str(p) for p in paths]


def message(text):
    """A gr.Error message: Gradio renders it as HTML, and it may hold a phrase or a file name the user typed."""
    return html.escape(text, quote=False)


def build_app(model, examples=(), title="SegVLM", work=None):
    """The Gradio page around `model` (a SegVLM or FastSegVLM): a gr.Blocks, queued, not launched.
    examples: [(image path, phrases text)] shown under the inputs. Under the title: what the model was
    trained on (load_model's `model.trained_on`, provenance.describe) and, for a model trained on the
    synthetic set, a note that its masks on photos mean nothing (provenance.SYNTHETIC_NOTE). work: the
    folder of this page's mask PNGs (main's, which also holds Gradio's cache); default a new temporary
    one, removed at exit."""
    import gradio as gr  # here, so that `python app.py --help` and a missing run answer at once

    def decode_upload(payload):
        """The picture's upload decoded by inference.open_image: a file that is not an image, or a
        decompression bomb, becomes a message instead of Gradio's own failure. (It replaces the
        gr.Image's preprocess on the one instance: a subclass would make Gradio write a .pyi stub
        beside this file.)"""
        if payload is None or not payload.path:
            return None
        name = Path(payload.orig_name or "the upload").name
        try:
            return open_image(payload.path, max_side=MAX_SIDE)  # a huge picture decoded reduced
        except (ValueError, OSError) as e:
            raise gr.Error(message(str(e).replace(str(payload.path), name)), print_exception=False) from None

    if work is None:
        work = Path(tempfile.mkdtemp(prefix="segvlm-app-"))  # this process's mask PNGs, one folder per request
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    state = {"request": 0}

    def run(image, text, threshold, view):
        state["request"] += 1
        previous, out_dir = work / str(state["request"] - 1), work / str(state["request"])
        shutil.rmtree(previous, ignore_errors=True)  # Gradio has copied its files into its cache by now
        out_dir.mkdir()
        try:
            return segment(model, image, text, threshold, view, out_dir)
        except ValueError as e:
            raise gr.Error(message(str(e)), print_exception=False) from None
        except Exception:  # noqa: BLE001 - logged here in full; the page gets one line, no traceback
            log.exception("segmenting failed")
            raise gr.Error("The model failed on this input; the server's log has the details.",
                           print_exception=False) from None

    record = getattr(model, "trained_on", None) or dict(provenance.UNKNOWN)
    with gr.Blocks(title=title, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        known = provenance.describe(record)  # the file's own text: HTML-escaped in an HTML block, never Markdown
        gr.HTML(trained_on_html(title, known), elem_id="trained-on")
        if provenance.knows_only_synthetic(record):
            gr.Markdown(f"**Note:** {SYNTHETIC_NOTE_HTML}", elem_id="synthetic-note",
                        container=True, padding=True)
        gr.Markdown(f"Upload a picture, type what to segment (one phrase per line, up to {MAX_PHRASES}) and press "
                    f"**Segment**.")
        with gr.Row():
            with gr.Column():
                picture = gr.Image(label="picture", type="pil", sources=["upload", "clipboard"], elem_id="picture")
                picture.preprocess = decode_upload
                text = gr.Textbox(label="phrases, one per line", lines=3, max_lines=MAX_PHRASES,
                                  placeholder="small red square\ntriangle left of the blue circle", elem_id="phrases")
                threshold = gr.Slider(0.01, 0.99, value=DEFAULT_THRESHOLD, step=0.01, label="threshold",
                                      elem_id="threshold")
                view = gr.Radio(list(VIEWS), value="masks", label="show", elem_id="view")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                result = gr.Image(label="result", type="pil", format="png", interactive=False, elem_id="result")
                legend = gr.HTML(label="legend", elem_id="legend")
                downloads = gr.File(label="masks (PNG, 0/255, the picture's size)", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        if examples:
            gr.Examples([list(e) for e in examples], inputs=[picture, text], label="examples (synthetic test images)")
        button.click(run, [picture, text, threshold, view], [result, legend, downloads], api_name="segment",
                     concurrency_limit=1)
    return demo.queue(max_size=32, default_concurrency_limit=1)


def trained_on_html(title, known):
    """The page's heading and its line on the model (provenance.describe's) as HTML that shows both as plain text:
    every character of the file's record escaped, and no Markdown, which would read `[text](link)` as a link and
    `![](url)` as an image every visitor's browser fetches."""
    return f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(known[:1].upper() + known[1:])}.</p>"


def launch(demo, host="127.0.0.1", port=None, share=False, block=True):
    """Serve the page (127.0.0.1 unless host says otherwise); block=False returns at once (tests).

    Gradio's own start-up lines are silenced (quiet): they tell a user to "set `share=True` in `launch()`",
    while this tool's flag is --share. served_lines says where the page is instead. With block, it waits
    here, not in Gradio's wait (which ends Ctrl-C with its own line and a normal exit): Ctrl-C and SIGTERM
    reach the caller (run_tool's line and exit code) once the server is closed."""
    demo.launch(server_name=host, server_port=port, share=share, show_error=False,
                max_file_size=MAX_UPLOAD, prevent_thread_lock=True, quiet=True)
    if block:
        print(served_lines(demo), flush=True)
        try:
            while demo.is_running:
                time.sleep(0.1)
        finally:
            demo.close(verbose=False)
    return demo


def cannot_serve(host, port) -> str:
    """What to tell a user whom launch refused (an OSError): Gradio's message says the same for every cause and
    advises launch()'s `server_port`, while this tool's flag is --port. The cause is asked of the system, by
    binding the port as Gradio does."""
    from gradio import http_server  # imported by build_app already
    first, last = http_server.INITIAL_PORT_VALUE, http_server.INITIAL_PORT_VALUE + http_server.TRY_NUM_PORTS - 1
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port or first))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return (f"port {port} is taken on {host}; pass another --port, or none for the next free one" if port
                    else f"ports {first} to {last} are all taken on {host}; pass a free one with --port")
        return f"cannot listen on {host}{f':{port}' if port else ''} ({e.strerror or e}); is --host an address of this machine?"
    return f"cannot serve on {host}:{port or f'{first}-{last}'}; pass another --port"


def served_lines(demo) -> str:
    """Where a launched page is served, and how to get a public link (this tool's --share)."""
    lines = [f"app.py: open {demo.local_url} in a browser (Ctrl-C stops the page)"]
    if demo.share_url:
        lines.append(f"app.py: public link {demo.share_url} (anyone with it can use the page)")
    else:
        lines.append("app.py: for a public link as well, run it with --share")
    return "\n".join(lines)


def newest_demo_checkpoint(runs="runs"):
    """The most recently written runs/demo/best.pth or runs/demo-*/best.pth (an older run's name), or None."""
    found = sorted([*Path(runs).glob("demo/best.pth"), *Path(runs).glob("demo-*/best.pth")], key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def synthetic_examples(ckpt, num=NUM_EXAMPLES):
    """[(image path, phrases)] of the first `num` test images of the synthetic data the checkpoint's
    run trained on (its config.json's data_dir), or [] when that is not at hand."""
    config = Path(ckpt).parent / "config.json"
    if not config.is_file():
        return []
    data_dir = Path(read_json(config, dict).get("data_dir") or "")
    root = next((d / "VGPhraseCut_v0" for d in (data_dir, Path(ckpt).resolve().parent.parent.parent / data_dir)
                 if (d / "VGPhraseCut_v0" / "refer_test.json").is_file()), None)
    if not str(data_dir) or root is None:
        return []
    root = root.resolve()  # the examples' paths must not depend on the folder the page was started from
    phrases = {}
    for task in read_json(root / "refer_test.json", list):
        if task["image_id"] in phrases or len(phrases) < num:
            phrases.setdefault(task["image_id"], []).append(task["phrase"])
    return [(str(root / "images" / f"{image_id}.jpg"), "\n".join(p[:MAX_PHRASES])) for image_id, p in phrases.items()
            if (root / "images" / f"{image_id}.jpg").is_file()]


def port_number(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="app.py", description="A web page to try a SegVLM checkpoint on any picture.")
    p.add_argument("--ckpt", help="a checkpoint (a run's best.pth, CRIS's best_model.pth, ...); "
                                  "default: the newest runs/demo/best.pth or runs/demo-*/best.pth")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
    p.add_argument("--port", type=port_number, help="port (default 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link")
    p.add_argument("--device", type=parse_device, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--engine", choices=CHOICES, default="auto",
                   help="what runs the model: auto (default) the fastest here (OpenVINO on a CPU where installed: it "
                        "converts the model at start), eager, torch, openvino, onnxruntime (an ONNX --ckpt)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 on CUDA and on a CPU with native bf16, float32 elsewhere")
    p.add_argument("--engine-cache", metavar="DIR",
                   help="a folder of your own where OpenVINO keeps the converted model for the next start")
    args = p.parse_args(argv)
    ckpt = args.ckpt or newest_demo_checkpoint()
    if ckpt is None:
        sys.exit(f"app.py: no --ckpt and no demo run under runs/; make one with: {DEMO_COMMAND}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # not httpx's line per request
    try:
        model = load_model(ckpt, args.device, engine=args.engine, precision=args.precision, cache_dir=args.engine_cache)
        examples = synthetic_examples(ckpt)
    except (ValueError, OSError) as e:
        sys.exit(f"app.py: error: {e}")
    print(f"app.py: {shown(ckpt)} on {net_device(model)}, engine {model.engine} ({model.precision}): "
          f"{shown(provenance.describe(model.trained_on))}", flush=True)
    if provenance.knows_only_synthetic(model.trained_on):
        print(f"app.py: note: {provenance.SYNTHETIC_NOTE}", flush=True)
    # This server's files, the masks it writes and the uploads Gradio caches for it, live in one temporary
    # folder that every way out removes: a return, an error, Ctrl-C and SIGTERM (raised here by run_tool).
    work = Path(tempfile.mkdtemp(prefix="segvlm-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")  # read when the page is built
    try:
        demo = build_app(model, examples, title=f"SegVLM: {Path(ckpt).parent.name}/{Path(ckpt).name}", work=work)
        try:
            launch(demo, args.host, args.port, args.share)
        except OSError:  # Gradio's refusal: the port is taken, the host is not this machine's, ...
            sys.exit(f"app.py: error: {cannot_serve(args.host, args.port)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_tool("app.py", main)
