"""Triton import shared by the kernel files.  Without triton (a torch-only install) the module
still imports: `triton.jit` becomes a no-op decorator so the references and launch guards load,
and no kernel is ever launched (the dispatchers in valor_fast.ops choose torch)."""
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

__all__ = ["triton", "tl", "HAS_TRITON"]
