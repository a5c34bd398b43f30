"""Export to ONNX or TorchScript, int8 quantization of the ONNX graph, and the predictor
that runs the exported graph."""
from .exporter import (
    EXPORT_FORMATS,
    MIN_ONNX_OPSET,
    ExportableQueryInst,
    ExportError,
    check_exportable,
    export_info_path,
    export_model,
    output_names,
)
from .predictor import ExportedPredictor
from .quantize import (
    CalibrationImages,
    QuantizeError,
    calibration_dicts,
    check_quantizable,
    quantize_int8,
    quantized_path,
)

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
