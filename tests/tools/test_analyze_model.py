"""tools/analyze_model.py: FIBER-B parameter total (meta device), FLOPs of the tiny model, the
matmul / attention flop counters, one-line errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]
FIBER_B = str(ROOT / "configs" / "FIBER-B" / "coco.yaml")
FINE = str(ROOT / "configs" / "Demo" / "fine_tiny.yaml")
COARSE = str(ROOT / "configs" / "Demo" / "coarse_tiny.yaml")
SPEC_TOTAL = 252_055_304  # fine_grained.md §7.2, FIBER-B v2


tool = load_tool("analyze_model")


def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_fiber_b_parameter_total_matches_the_spec(capsys):
    tool.main(["--config-file", FIBER_B, "--tasks", "parameter", "--max-depth", "1"])
    out = capsys.readouterr().out
    last = _last_line(out)
    assert last.startswith("total_parameters: ")
    total = int(last.split(":")[1])
    assert abs(total - SPEC_TOTAL) <= 0.005 * SPEC_TOTAL, total
    assert "backbone" in out and "head" in out  # the table precedes the total


def test_meta_build_counts_like_a_real_build():
    cfg = tool.load_config(FINE, [])
    cfg.freeze()
    meta = tool.build_analysis_model(cfg, meta=True)
    real = tool.build_analysis_model(cfg, meta=False)
    assert all(p.device.type == "meta" for p in meta.parameters())
    shapes = {k: tuple(v.shape) for k, v in meta.named_parameters()}
    assert shapes == {k: tuple(v.shape) for k, v in real.named_parameters()}


def test_flop_total_of_the_tiny_detector(capsys):
    tool.main(["--config-file", FINE, "--tasks", "flop", "--height", "64", "--width", "64"])
    last = _last_line(capsys.readouterr().out)
    assert last.startswith("total_flops: ")
    assert float(last.split(":")[1]) > 0


class _Ops(torch.nn.Module):
    def forward(self, a, b, v, q, k, val):
        return torch.matmul(a, b), torch.matmul(a, v), F.scaled_dot_product_attention(q, k, val)


def test_matmul_and_attention_counters():
    a, b, v = torch.zeros(3, 1, 4, 5), torch.zeros(2, 5, 6), torch.zeros(5)
    q, k, val = torch.zeros(2, 3, 7, 8), torch.zeros(2, 3, 9, 8), torch.zeros(2, 3, 9, 10)
    flops = FlopCountAnalysis(_Ops(), (a, b, v, q, k, val))
    flops.set_op_handle("aten::matmul", tool._matmul_flops)
    flops.set_op_handle("aten::scaled_dot_product_attention", tool._sdpa_flops)
    flops.unsupported_ops_warnings(False)
    by_op = flops.by_operator()
    # broadcast (3, 2) batches of (4 x 5) @ (5 x 6), and (3, 1, 4, 5) @ (5,)
    assert by_op["matmul"] == 3 * 2 * 4 * 5 * 6 + 3 * 1 * 4 * 5
    # QK^T: 6 heads x 7 x 9 x 8, AV: 6 x 7 x 9 x 10
    assert by_op["scaled_dot_product_attention"] == 6 * 7 * 9 * 8 + 6 * 7 * 9 * 10


def test_meta_with_flop_is_refused():
    with pytest.raises(SystemExit) as exc:
        tool.main(["--config-file", FINE, "--tasks", "flop", "--meta"])
    assert str(exc.value.code).startswith("error:") and "--meta" in str(exc.value.code)


def test_bad_key_is_a_one_line_error_with_nonzero_exit(capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--config-file", FINE, "MODEL.DYHEAD.NOT_A_KEY", "3"])
    message = exc.value.code
    # sys.exit(<str>) prints the string to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith("error:")
    assert "MODEL.DYHEAD.NOT_A_KEY" in message and "\n" not in message
    assert "total_parameters" not in capsys.readouterr().out


def test_a_zero_size_is_refused_not_replaced_by_the_default():
    """``--height 0`` was read as "not given" and measured at the configured size, while ``-5`` was
    refused."""
    from fiber_d2.engine.setup import load_config, tool_image_size

    cfg = load_config(str(ROOT / "configs/Demo/fine_tiny.yaml"), [])
    assert tool_image_size(cfg) == (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    assert tool_image_size(cfg, 64) == (64, cfg.INPUT.MAX_SIZE_TEST)
    with pytest.raises(ValueError, match="image size must be positive, got --height 0"):
        tool_image_size(cfg, 0)
    assert tool_image_size(cfg, width=64) == (cfg.INPUT.MIN_SIZE_TEST, 64)
    with pytest.raises(ValueError, match="image size must be positive, got --height .* --width 0"):
        tool_image_size(cfg, None, 0)


def test_a_size_that_cannot_be_allocated_is_one_line(capsys):
    """An input larger than any address space ended in the CPU allocator's RuntimeError traceback."""
    side = str(10**7)  # 3 x 1e14 floats: more than a 47-bit address space, on any machine
    with pytest.raises(SystemExit) as exc:
        tool.main(["--config-file", FINE, "--tasks", "flop", "--height", side, "--width", side])
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"error: --tasks flop at {side}x{side}: out of memory:")
    assert "total_flops" not in capsys.readouterr().out
