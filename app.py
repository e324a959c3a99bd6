"""Try a checkpoint in a browser: upload a picture, type phrases, see each phrase's mask.

    python app.py                                 # the newest demo run's best.pth under runs/
    python app.py --ckpt runs/paper/best.pth      # any checkpoint checkpoints.load_checkpoint reads
    python app.py --ckpt best_model.pth           # written by CRIS's training code (docs/cris.md)
    python app.py --host 0.0.0.0 --port 8080 --share   # only when asked for (see below)

Then open the address it prints (http://127.0.0.1:7860 unless that port is taken). The page takes a
picture (uploaded, pasted, or one of the examples), one phrase per line, a threshold (default 0.35,
the evaluation's) and a view: the masks, each in its own colour with a legend, or the probability
maps. It shows the picture with every phrase drawn on it and offers each mask as a PNG.

The page calls the Python API, nothing else: `inference.predict_proba` for all the phrases at once
(the image encoded once, as `inference.predict` does) and `inference.overlay` for the picture, so
the page's picture is exactly `overlay(image, predict(model, image, phrases), phrases)`. On a CUDA
machine the model runs as `inference.FastSegVLM` (load_model's default there).

Serving: it listens on 127.0.0.1, this machine only; `--host 0.0.0.0` opens it to the network and
`--share` asks Gradio for a public link, each only when given. Requests wait in one queue and the
model runs one at a time, so a burst of users cannot run it out of memory. A file that is not an
image or is past PIL's decompression-bomb limit (inference.open_image), an upload over 20 MB, no
phrase, more phrases than there are colours, or a phrase longer than the model reads gets a
one-line message on the page; any other failure is logged here and the page says only that it
failed, so no traceback reaches the page. Uploads and results are deleted from Gradio's cache
after an hour.
"""
import argparse
import atexit
import html
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from helpers import transforms
from helpers.cli import parse_device
from helpers.files import read_json, save_mask
from helpers.inference import PALETTE, as_image, load_model, open_image, overlay, predict_proba
from model import DEFAULT_THRESHOLD

MAX_PHRASES = len(PALETTE)  # one colour each
MAX_UPLOAD = "20mb"
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


def segment(model, image, text, threshold=DEFAULT_THRESHOLD, view="masks", out_dir=None):
    """What the page shows for one request: (picture, legend HTML, mask PNG paths).

    image: an RGB PIL image (the page's upload, decoded by open_image); text: the phrases, one per
    line. The picture is overlay(image, masks, phrases) with masks = predict's (probabilities >
    threshold), or, for view "probability", the probability maps themselves. Each mask is written to
    out_dir as <k>_<phrase>.png (0/255, the image's size). Bad input: a ValueError with the message."""
    if image is None:
        raise ValueError("Upload a picture first (or pick an example below).")
    phrases = parse_phrases(text, model.config.word_len)
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"The threshold must be between 0 and 1, got {threshold!r}.")
    if view not in VIEWS:
        raise ValueError(f"Show one of {', '.join(VIEWS)}, not {view!r}.")
    image = as_image(image)  # a path or an array too, as predict takes them
    probs = predict_proba(model, image, phrases)  # one forward pass: the image encoded once
    masks = [p > threshold for p in probs]
    picture = overlay(image, probs if view == "probability" else masks, phrases)
    rows = "".join(
        f'<li><span style="display:inline-block;width:1em;height:1em;vertical-align:middle;'
        f'background:rgb{tuple(c)}"></span> {html.escape(p)}: {100 * m.mean():.1f}% of the picture</li>'
        for p, m, c in zip(phrases, masks, PALETTE))
    legend = f'<ul style="list-style:none;padding:0">{rows}</ul>'
    paths = []
    if out_dir is not None:
        for k, (phrase, mask) in enumerate(zip(phrases, masks), 1):
            slug = "".join(ch if ch.isalnum() else "_" for ch in phrase)[:40].strip("_") or "phrase"
            paths.append(Path(out_dir) / f"{k}_{slug}.png")
            save_mask(mask, paths[-1])
    return picture, legend, [str(p) for p in paths]


def message(text):
    """A gr.Error message: Gradio renders it as HTML, and it may hold a phrase or a file name the user typed."""
    return html.escape(text, quote=False)


def build_app(model, examples=(), title="SegVLM"):
    """The Gradio page around `model` (a SegVLM or FastSegVLM): a gr.Blocks, queued, not launched.
    examples: [(image path, phrases text)] shown under the inputs."""
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
            return open_image(payload.path)
        except (ValueError, OSError) as e:
            raise gr.Error(message(str(e).replace(str(payload.path), name)), print_exception=False) from None

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

    with gr.Blocks(title=title, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(title)}\nUpload a picture, type what to segment (one phrase per line, "
                    f"up to {MAX_PHRASES}) and press **Segment**.")
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


def launch(demo, host="127.0.0.1", port=None, share=False, block=True):
    """Serve the page (127.0.0.1 unless host says otherwise); block=False returns at once (tests)."""
    return demo.launch(server_name=host, server_port=port, share=share, show_error=False,
                       max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, quiet=not block)


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
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip's import, not ours
    p = argparse.ArgumentParser(prog="app.py", description="A web page to try a SegVLM checkpoint on any picture.")
    p.add_argument("--ckpt", help="a checkpoint (a run's best.pth, CRIS's best_model.pth, ...); "
                                  "default: the newest runs/demo/best.pth or runs/demo-*/best.pth")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
    p.add_argument("--port", type=port_number, help="port (default 7860, or the next free one)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link")
    p.add_argument("--device", type=parse_device, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    args = p.parse_args(argv)
    ckpt = args.ckpt or newest_demo_checkpoint()
    if ckpt is None:
        sys.exit(f"app.py: no --ckpt and no demo run under runs/; make one with: {DEMO_COMMAND}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        model = load_model(ckpt, args.device)
        examples = synthetic_examples(ckpt)
    except (ValueError, OSError) as e:
        sys.exit(f"app.py: error: {e}")
    print(f"app.py: {ckpt} on {next(model.parameters()).device}", flush=True)
    demo = build_app(model, examples, title=f"SegVLM: {Path(ckpt).parent.name}/{Path(ckpt).name}")
    try:
        launch(demo, args.host, args.port, args.share)
    except OSError as e:  # the port is taken, the host is not this machine's, ...
        sys.exit(f"app.py: error: cannot serve on {args.host}:{args.port or 'default port'}: {e}")


if __name__ == "__main__":
    main()
