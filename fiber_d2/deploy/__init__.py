"""Deployment: export a FIBER detector (ONNX, TorchScript) and run the exports.

``tools/deploy/export_model.py`` writes an export directory; :class:`ONNXPredictor` and
:class:`TorchScriptPredictor` run it with ``FIBERPredictor``'s call
signature and outputs. ONNX needs the ``deploy`` extra (``pip install fiber_d2[deploy]``).
"""

from .export import FORMATS, check_exportable, export_detector
from .graph import ExportableFIBER, batched_postprocess
from .runtime import ONNXPredictor, TorchScriptPredictor, graph_inputs

__all__ = [
    "FORMATS",
    "ExportableFIBER",
    "ONNXPredictor",
    "TorchScriptPredictor",
    "batched_postprocess",
    "check_exportable",
    "export_detector",
    "graph_inputs",
]
