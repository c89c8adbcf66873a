"""llama.cpp's weight repacking ("extra buffer types") for the bench scripts' reference runs.

llama.cpp repacks weights at load into layouts for its faster CPU paths, among them AMX tiles on
CPUs with AMX-INT8. On the AMX Xeon these benchmarks ran on (2026-12-03), llama-cpp-python 0.3.36
segfaults in that path (ggml_backend_amx_mul_mat) at its first forward pass, an open llama.cpp
bug (ggml-org/llama.cpp#20824). A user there turns repacking off (llama.cpp's -nr / --no-repack;
the model parameter use_extra_bufts = false), so the scripts do the same by default on CPUs with
AMX-INT8, say so in their output, and keep repacking (llama.cpp's default) everywhere else.
--llama-repack on|off overrides the choice.
"""
from __future__ import annotations

import argparse
from pathlib import Path



def turn_off_in_defaults() -> None:
    """Makes llama-cpp-python's default model parameters, which its Llama class (and so
    llama_cpp.server) asks for, carry repacking off. The package itself is not changed."""
    import llama_cpp.llama_cpp as lc
    defaults = lc.llama_model_default_params

    def no_repack():
        p = defaults()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = no_repack


def server_launcher() -> str:
    """Code for `python -c CODE ARGS...` that runs llama_cpp.server ARGS with repacking off (the
    server has no option for it)."""
    return (f"import runpy, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "import llama_repack; llama_repack.turn_off_in_defaults(); "
            "sys.argv[0] = 'llama_cpp.server'; "
            "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


def cpu_has_amx_int8() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " amx_int8" in line for line in text.splitlines())


def add_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--llama-repack", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp weight repacking (its -nr turns it off); auto: off on CPUs "
                         "with AMX-INT8, where llama-cpp-python 0.3.36 crashes in its AMX path "
                         "(ggml-org/llama.cpp#20824), on elsewhere")


def repack(choice: str) -> bool:
    """Whether llama.cpp repacks weights for --llama-repack `choice`."""
    return choice == "on" or (choice == "auto" and not cpu_has_amx_int8())


def describe(on: bool) -> str:
    return "on" if on else "off (-nr)"
