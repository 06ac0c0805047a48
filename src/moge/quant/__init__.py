"""W8A8 inference: int8 weights (per output channel) and int8 activations (per token) with a real
integer matmul, expert-aware smoothing and router-aligned calibration (arXiv 2505.21411, sec. 5).
Saving and loading quantized checkpoints lives with the other checkpoint formats, in
moge.checkpoint.quantized.

    from moge.quant import balanced_calibration_set, quantize_model
    from moge.checkpoint.quantized import save_quantized, load_quantized

    calib = balanced_calibration_set(model, "data/corpus", windows=32, seq_len=128)
    report = quantize_model(model, calib.input_ids)       # in place
    save_quantized(model, "runs/quant", report=report.to_dict())
    model = load_quantized("runs/quant")                  # or moge.checkpoint.load_pretrained

Weight-only int8 / int4 (float activations, no calibration; fast CPU decode): moge.quant.weight_only,

    quantize_weight_only(model, "int4-wo", group_size=32)  # in place; save_quantized as above
"""

from moge.quant.calibrate import CalibrationSet, balanced_calibration_set
from moge.quant.experts import QuantExperts
from moge.quant.int8 import (QuantLinear, dequantize, int8_kernel, int8_linear, int8_mm, quantize_per_channel,
                             quantize_per_token, set_int8_kernel)
from moge.quant.model import DEFAULT_ALPHA_GRID, QuantizationReport, is_quantized, quantize_model, weight_memory
from moge.quant.weight_only import WO_SCHEMES, WOExperts, WOLinear, quantize_weight_only

__all__ = [
    "CalibrationSet", "balanced_calibration_set", "QuantExperts", "QuantLinear", "dequantize", "int8_linear",
    "int8_mm", "quantize_per_channel", "quantize_per_token", "int8_kernel", "set_int8_kernel", "DEFAULT_ALPHA_GRID",
    "QuantizationReport", "is_quantized", "quantize_model", "weight_memory", "WO_SCHEMES", "WOExperts", "WOLinear",
    "quantize_weight_only",
]
