#!/usr/bin/env python
"""A browser demo of FIBER grounding (Gradio): upload an image, type categories or a caption with
phrases, see the boxes and a table of detections.

    pip install fiber_d2[web]          # Gradio is an optional extra, not a core dependency
    python tools/web_demo.py [--weights demo | fiber-b/coco | FILE] [--config-file ...] [--port 7860]

Without ``--weights`` the Demo weights (``make demo``'s, see README "Model zoo") are used when present,
otherwise the Demo architecture with random weights (a warning says so: the boxes are meaningless).
Runs on the CPU when no GPU is available. The server listens on 127.0.0.1 only (never on a public
interface, no share link); ``make web-test`` drives it in headless Chromium.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Union

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the demo

try:
    # first: registers FIBER's components and quiets fvcore's import-time TorchScript warning
    import fiber_d2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the environment
    sys.exit(
        f"error: detectron2 is not importable ({e}); run `make test` or see README 'Troubleshooting the detectron2 install'."
    )
import numpy as np
import torch
from detectron2.utils.logger import setup_logger

from fiber_d2.engine.setup import ConfigError, load_config
from fiber_d2.predictor import FIBERPredictor, split_prompt

logger = logging.getLogger("fiber_d2.web_demo")

HOST = "127.0.0.1"  # local only, by design
DEMO_CONFIG = "configs/Demo/fine_tiny.yaml"
TABLE_HEADERS = ["label", "score", "x1", "y1", "x2", "y2"]


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        sys.exit(
            "error: the web demo needs Gradio: pip install 'fiber_d2[web]' (or pip install gradio)"
        )
    return gr


# longest error text shown in the page (a 200,000-character category name came back whole)
MAX_MESSAGE_CHARS = 500
# Category names one request may ask for (--max-categories): LVIS's 1,203, the largest vocabulary
# FIBER is evaluated with. Requests run one at a time, and a longer list (run in prompt chunks) would
# hold the server for minutes on a CPU (3,000 names: about 250 s) while every other request waits.
MAX_CATEGORIES = 1203


def predict(
    predictor: FIBERPredictor,
    image: Union[str, np.ndarray, None],
    mode: str,
    text: str,
    phrases_text: str,
    threshold: float,
    max_categories: Optional[int] = MAX_CATEGORIES,
):
    """One request: returns (drawn RGB image or None, table rows, status markdown).

    Args:
        image: the uploaded file's path, read as :meth:`FIBERPredictor.read_image` reads files
            (an unreadable, 16-bit or oversized file is an error message, not a white image or a
            server-side traceback); or an RGB uint8 array (H, W, 3 or 4).
        max_categories: more category names than this are refused (None: no limit).
    """
    if image is None:
        return None, [], "Upload an image first."
    text = (text or "").strip()
    try:
        if mode == "caption":
            phrases = [p.strip() for p in (phrases_text or "").split(";") if p.strip()] or None
            prompt = text
        else:
            prompt, phrases = split_prompt(text, predictor.separator), None
            if max_categories is not None and len(prompt) > max_categories:
                raise ValueError(
                    f"{len(prompt)} categories; this server takes at most {max_categories} per "
                    "request (--max-categories)"
                )
        if isinstance(image, np.ndarray):
            array, order = np.ascontiguousarray(image[..., :3]), "RGB"
        else:
            array, order = predictor.read_image(image), predictor.input_format
        result = predictor(array, prompt, phrases=phrases, image_format=order, threshold=threshold)
    except (OSError, ValueError) as e:
        message = str(e)
        if isinstance(image, (str, os.PathLike)):  # the server's upload folder stays private
            message = message.replace(os.fspath(image), os.path.basename(image))
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + " ..."
        return None, [], f"**Error:** {message}"
    inst = result["instances"].to("cpu")
    rows: List[list] = [
        [label, round(float(s), 3), *[round(float(v), 1) for v in box]]
        for label, s, box in zip(result["pred_labels"], inst.scores, inst.pred_boxes.tensor)
    ]
    drawn = predictor.draw(array, result, threshold=threshold, image_format=order)
    return drawn, rows, f"{len(rows)} detection(s) with score >= {threshold:.2f}"


def build_app(
    predictor: FIBERPredictor,
    *,
    note: str = "",
    threshold: float = 0.3,
    max_categories: Optional[int] = MAX_CATEGORIES,
):
    """The Gradio Blocks app around ``predictor`` (not launched)."""
    gr = _import_gradio()

    def run(image, mode, text, phrases_text, thr):
        return predict(predictor, image, mode, text, phrases_text, float(thr), max_categories)

    # uploads older than an hour are removed, hourly and when the server stops
    with gr.Blocks(title="FIBER grounding demo", delete_cache=(3600, 3600)) as app:
        gr.Markdown("## FIBER: open-vocabulary detection and phrase grounding" + note)
        with gr.Row():
            with gr.Column():
                # the file undecoded: Gradio's own decoding turned a 16-bit image white and an
                # unreadable one into an empty error; fiber_d2 reads it (predict)
                image = gr.File(
                    label="image", file_types=["image"], type="filepath", elem_id="input-image"
                )
                mode = gr.Radio(["categories", "caption"], value="categories", label="prompt type")
                text = gr.Textbox(
                    label="categories separated by '. ' (or a caption)",
                    value="red circle. blue square",
                    elem_id="prompt",
                )
                phrases = gr.Textbox(
                    label="caption phrases, separated by ';' (empty: the whole caption)",
                    elem_id="phrases",
                )
                thr = gr.Slider(0.0, 1.0, value=threshold, step=0.01, label="score threshold")
                button = gr.Button("Detect", variant="primary", elem_id="detect")
            with gr.Column():
                drawn = gr.Image(label="detections", elem_id="result-image")
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="boxes", elem_id="result-table")
        button.click(run, [image, mode, text, phrases, thr], [drawn, table, status])
    return app


def build_predictor(weights: Optional[str], config: Optional[str], device: str, dtype: str):
    """(predictor, note shown in the page)."""
    from fiber_d2 import model_zoo

    if weights:
        return (
            FIBERPredictor.from_pretrained(weights, config=config, device=device, dtype=dtype),
            "",
        )
    try:
        model_zoo.get_weights_path("demo")
        return FIBERPredictor.from_pretrained("demo", device=device, dtype=dtype), ""
    except FileNotFoundError as e:
        logger.warning("%s; using random weights (boxes are meaningless)", e)
    cfg = load_config(config or DEMO_CONFIG, ["MODEL.DEVICE", device])
    torch.manual_seed(0)
    note = (
        "\n\n*No trained weights found (run `make demo` or pass `--weights`): "
        "this model is randomly initialised.*"
    )
    return FIBERPredictor(cfg, dtype=dtype), note


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="model-zoo name or weights file (default: demo)")
    parser.add_argument("--config-file", help="config of a weights file (yaml or zoo name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--port", type=int, default=7860, help=f"port on {HOST}")
    parser.add_argument(
        "--max-upload-mb", type=int, default=50, help="larger uploads are refused (HTTP 413)"
    )
    parser.add_argument(
        "--max-categories",
        type=int,
        default=MAX_CATEGORIES,
        help="category names one request may ask for (requests run one at a time)",
    )
    args = parser.parse_args(argv)
    if args.max_upload_mb < 1:
        sys.exit(f"error: --max-upload-mb must be at least 1, got {args.max_upload_mb}")
    if args.max_categories < 1:
        sys.exit(f"error: --max-categories must be at least 1, got {args.max_categories}")
    _import_gradio()
    try:
        predictor, note = build_predictor(args.weights, args.config_file, args.device, args.dtype)
    except (ConfigError, ValueError, KeyError, OSError) as e:
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    app = build_app(predictor, note=note, max_categories=args.max_categories)
    app.launch(
        server_name=HOST,
        server_port=args.port,
        share=False,
        max_file_size=f"{args.max_upload_mb}mb",
    )


if __name__ == "__main__":
    setup_logger(name="fiber_d2", abbrev_name="fiber").setLevel(logging.INFO)
    main()
