"""pdserve: disaggregated prefill/decode LLM serving."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "GenerationOutput", "__version__"]


def __getattr__(name: str):
    # Lazy: `import pdserve` stays cheap for the CLI and the proto stubs.
    if name in ("LLM", "GenerationOutput"):
        from pdserve import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from pdserve.sampling.params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
