"""Reading torch's fp32 matmul precision setting, shared by every backend and the benchmark."""
import torch


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32, read the way F.linear's cuBLAS call reads it."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9: reading the legacy `allow_tf32` RAISES once the new fp32_precision API was used (e.g.
    # torch.backends.fp32_precision = "tf32"), so read fp32_precision, which resolves the inheritance and reflects
    # the legacy setter too ("none" = not set = IEEE). Older torch has no fp32_precision: fall back.
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)
