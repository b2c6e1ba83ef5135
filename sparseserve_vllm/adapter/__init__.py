"""The vLLM adapter layer: every module that imports vLLM lives here (plus `patches/` and `platform.py`).

The core (`sparseserve_vllm.core`, `sparseserve_vllm.kernels`, `sparseserve_vllm.config`) never imports vLLM.
"""
