"""valor_fast.ops: the model's entry points to fused kernels.  Each op dispatches among
Triton (valor_fast.kernels), CUDA C++ (csrc/) and an eager torch reference."""
from .attention import attention  # noqa: F401
from .contrastive import contrastive_loss, fine_similarity, grouped_contrastive_loss  # noqa: F401
from .distributed import Negatives, all_reduce_sum, gather_negatives  # noqa: F401
