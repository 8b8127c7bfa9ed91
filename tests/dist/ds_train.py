"""torchrun script: the DeepSpeed training worker of ``ucp.demo_deepspeed`` (one home for the
model, the config, the training steps and the reference dump), for the tests and the bench.

Usage (every rank): torchrun --nproc_per_node N ds_train.py --out DIR --stage S --dtype D ...
(options: see ``ucp/demo_deepspeed.py``).

fp16 on the CPU: DeepSpeed 0.19.8's CPU accelerator refuses fp16 ("Type fp16 is not supported on
your device.", ``DeepSpeedEngine._do_sanity_check``) unless ``torch.ops.mkldnn._is_mkldnn_fp16_supported()``,
a property of the processor (AVX512-FP16 / AMX-FP16), is true. torch computes in fp16 on any
CPU, so with ``--dtype fp16`` this script answers that capability query with yes; everything
else (DeepSpeed's fp16 ZeRO optimizers, the dynamic loss scaler, the saved files) runs unchanged.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ucp.demo_deepspeed import main  # noqa: E402


def allow_cpu_fp16() -> None:
    """Make DeepSpeed's CPU accelerator report fp16 support (see the module docstring)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    cls = type(get_accelerator())
    cls.is_fp16_supported = lambda self: True
    cls.supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]


if __name__ == "__main__":
    if "fp16" in sys.argv and sys.argv[sys.argv.index("fp16") - 1] == "--dtype":
        allow_cpu_fp16()
    main()
