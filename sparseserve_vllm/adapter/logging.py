"""The plugin's loggers live under vLLM's `vllm` logger, so vLLM's logging configuration (level, format, the
`(EngineCore pid=...)` prefixes) applies to them: `logger(__name__)` -> `vllm.plugins.sparseserve_vllm....`."""

from vllm.logger import init_logger


def logger(module: str):
    return init_logger(f"vllm.plugins.{module}")
