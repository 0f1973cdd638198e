"""Overrides that make ``configs/Demo/fine_tiny.yaml`` a detector small and fast enough for the
inference tests (predictor, export, the demo tools), shared by them; ``tests/`` is on ``sys.path``
while the suite runs (see ``tool_scripts.py``)."""

__all__ = ["tiny_detector_opts"]


def tiny_detector_opts(
    *, pre_nms: int = 50, detections: int = 20, min_size: int = 64, max_size: int = 96
) -> list[str]:
    """KEY VALUE overrides: CPU, two blocks per Swin stage and two fused layers, every score kept
    (``INFERENCE_TH`` 0), ``pre_nms`` candidates per level, ``detections`` boxes per image, test
    images resized to ``min_size`` (short side) and at most ``max_size`` (long side)."""
    return [
        "MODEL.DEVICE", "cpu",
        "MODEL.ATSS.INFERENCE_TH", "0.0",
        "MODEL.ATSS.PRE_NMS_TOP_N", str(pre_nms),
        "MODEL.ATSS.DETECTIONS_PER_IMG", str(detections),
        "INPUT.MIN_SIZE_TEST", str(min_size),
        "INPUT.MAX_SIZE_TEST", str(max_size),
        "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
        "MODEL.FIBER.NUM_FUSION_LAYERS", "2",
    ]  # fmt: skip
