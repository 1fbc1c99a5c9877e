"""Device helpers shared by the Triton kernels."""
from ._compat import tl, triton


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; PRECISION (a constexpr, so each flavour compiles straight):
    "native"  the operands as they are: 16-bit operands on tensor cores, fp32 ones by torch's
              default tl.dot precision.
    "upcast"  both operands to fp32, IEEE products: bf16 under TRITON_INTERPRET, whose numpy dot
              multiplies bf16 bit patterns as integers (triton 3.x interpreter); bf16 -> fp32 is
              exact, so the product is what a tensor core computes.
    "ieee" / "tf32" / "tf32x3": both operands to fp32 (a no-op for fp32 ones), that
              input_precision; lets an fp32 tile (softmax gradients) meet 16-bit features."""
    if PRECISION == "native":
        return tl.dot(a, b)
    elif PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
