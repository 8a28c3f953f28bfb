"""torchao's ``quantize_``: module swaps to int8/int4/float8/MX/NVFP4 weights, per layer."""
