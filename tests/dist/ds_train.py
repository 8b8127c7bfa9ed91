"""torchrun script: the DeepSpeed training worker of ``ucp.demo_deepspeed`` (one home for the
model, the config, the training steps and the reference dump), for the tests and the bench.

Usage (every rank): torchrun --nproc_per_node N ds_train.py --out DIR --stage S --dtype D ...
(options: see ``ucp/demo_deepspeed.py``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ucp.demo_deepspeed import main  # noqa: E402

if __name__ == "__main__":
    main()
