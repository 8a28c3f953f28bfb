"""PT2E: torch.export graphs quantized by a Quantizer (torchao's pt2e prepare/convert)."""
