"""cpm_live: CPM-Bee fine-tuning with QLoRA on BMTrain and PyTorch FSDP2."""

import logging

__version__ = "0.1.0"


class _DropKernelsCommunityNotice(logging.Filter):
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    bitsandbytes logs it at import on CPUs with AVX-512 BF16 when the optional ``kernels`` package
    (which downloads a kernel from a model hub at run time) is absent. That kernel only serves
    bitsandbytes' CPU ``gemv_4bit``, which cpm_live never calls, and the fallback is correct anyway.
    Every other record passes. The package's ``__init__`` runs before any cpm_live module imports
    bitsandbytes, so this one place covers every entry point that goes through cpm_live.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsCommunityNotice())
