"""Quantization building blocks: fake quant (QAT), binary layers, bit packing, ONNX Runtime PTQ."""
