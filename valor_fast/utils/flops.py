"""Device peak throughput for MFU (the model's FLOP count is valor_fast.model.flops)."""
from __future__ import annotations

# dense bf16 peak TFLOP/s by device name fragment (vendor figures; MFU is against these unless
# a measured peak is given)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_tflops(device) -> float:
    import torch
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return 0.0
