"""A frozen base that moves fewer bytes: the base's matrices stored in int8 (weight-only, one scale per
output channel), for generation and for adapter tuning. The adapter's own tensors stay in float32.

    from adapterlab.quant import quantize_base
    model = load_llama("smollm2")            # float32 (or dtype=torch.bfloat16: half the bytes, no swap)
    quantize_base(model)                     # int8 base, bfloat16 products; attach the adapter before or after
"""
from .int8 import (COMPUTE_DTYPES, KERNEL_MAX_ROWS, Int8Linear, base_bytes, int8_matmul, is_quantized,
                   quantize_base, quantize_weight)

__all__ = ["Int8Linear", "quantize_base", "quantize_weight", "int8_matmul", "is_quantized", "base_bytes",
           "KERNEL_MAX_ROWS", "COMPUTE_DTYPES"]
