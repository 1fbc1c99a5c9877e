"""valor-fast: a performance-first training engine for VALOR."""
__version__ = "0.1.0"


def accelerate(model):
    """Patch a Hugging Face BERT / CLIP-vision / AST model in place so its attention runs
    through `valor_fast.ops.attention`; returns the same object."""
    from .accelerate import accelerate as _acc
    return _acc(model)


def revert(model):
    """Undo `accelerate(model)`; returns the same object."""
    from .accelerate import revert as _rev
    return _rev(model)
