"""`torchrun --nproc_per_node=N -m valor_fast.train --config tiny [--a.b v ...]`"""
import sys

from ..cli import main

sys.exit(main(["pretrain"] + sys.argv[1:]))
