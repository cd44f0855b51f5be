"""Run `python -m MODULE ARGS...` as if this CPU's oneDNN had no fp16 (AMD EPYC without avx512_fp16, most cloud
AMD machines), whatever the CPU running the test has:

    torchrun --nproc_per_node 2 tests/helpers/without_fp16.py training --config ...

DeepSpeed's CPU accelerator asks torch.ops.mkldnn._is_mkldnn_fp16_supported(); on such CPUs DeepSpeed 0.19.8
`zero.Init(dtype=...)` ignored the dtype it was given and built parameters in bf16 (issue 10). Patching torch, not
DeepSpeed, keeps the test honest about whichever check DeepSpeed makes.
"""
import runpy
import sys

import torch



class _NoFp16:
    """The op packet, answering False when called (its overloads stay reachable: torch.export walks them)."""

    def __init__(self, packet):
        self._packet = packet

    def __call__(self, *args, **kwargs):
        return False

    def __getattr__(self, name):
        return getattr(self._packet, name)


torch.ops.mkldnn._is_mkldnn_fp16_supported = _NoFp16(torch.ops.mkldnn._is_mkldnn_fp16_supported)

from deepspeed.accelerator import get_accelerator  # noqa: E402

assert not get_accelerator().is_fp16_supported(), "the patch did not reach DeepSpeed's accelerator"
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
