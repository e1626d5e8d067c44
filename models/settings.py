"""Which code computes our models' numbers in this process: one explicit, process-wide setting, never a measurement.

`set_cpu_kernels(matmul, decoding, paths)` sets it and `cpu_kernels()` reads it; a process that sets nothing computes
with the reference path (the model files as written, plain PyTorch). The pipeline applies params.yaml's `kernels:`
section at the start of every stage (`pipeline/common.py`), logs it in MLflow and keeps it in the resume fingerprint.

    paths     "reference": `models/t5.py`, `models/reformer.py` as written; "fast": the speed paths of `models/fast/`
              stand in where they apply (fused projections, attention differentiated by hand, decoding shortcuts,
              the unpadded encoder, weight copies), each tested equal to the reference within rounding.
    matmul    the kernel of the fast paths' dense products: "blas" (F.linear: MKL in torch's x86 wheels) or "onednn"
              (torch's oneDNN linear); "auto" resolves by `default_matmul_kernel`, a fixed rule of the processor.
    decoding  the fast decode step's few-row products: "plain" (as every other product) or "shaped" (a fixed rule of
              each product's shape, `models.fast.products.decoding_form`).

Every setting gives the same bytes run after run on one machine and software stack; two settings differ in the last
bits. The reference path takes neither oneDNN nor shaped decoding (both are speed paths): asking for them with
`paths="reference"` is an error, and `auto` resolves to "blas" there.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.fast.private import onednn_available

PATHS = ("reference", "fast")
MATMUL_KERNELS = ("blas", "onednn")
DECODING_FORMS = ("plain", "shaped")
SPEED = ("onednn", "shaped")  # the settings of matmul and decoding that only the fast paths take


@dataclass(frozen=True)
class CpuKernels:
    """The code that computes this process's products (see the module docstring); every field is resolved."""

    matmul: str = "blas"
    decoding: str = "plain"
    paths: str = "reference"


_KERNELS = [CpuKernels()]  # the reference path until `set_cpu_kernels` says otherwise


def processor_vendor() -> str:
    """The CPU vendor string of this machine (`AuthenticAMD`, `GenuineIntel`, ...), or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def default_matmul_kernel() -> str:
    """`auto`'s kernel for the fast paths: a fixed function of the machine, never of its load. oneDNN on AMD
    processors, where torch's MKL takes its slow generic paths (measured on an AMD EPYC: MKL 0.10-0.11 TFLOP/s on one
    core, oneDNN 0.24-0.26, for every T5-small training shape); the BLAS elsewhere (on Intel Xeons MKL is faster)."""
    return "onednn" if processor_vendor() == "AuthenticAMD" and onednn_available() else "blas"


def set_cpu_kernels(matmul: str = "blas", decoding: str = "plain", paths: str = "reference") -> CpuKernels:
    """Set this process's `CpuKernels`; returns the resolved setting. Impossible combinations are errors that say
    what to change, never silent fallbacks: oneDNN where torch was built without it, or a speed path's kernel
    (`matmul="onednn"`, `decoding="shaped"`) with `paths="reference"`."""
    if paths not in PATHS:
        raise ValueError(f"paths {paths!r}: expected one of {', '.join(PATHS)}")
    if matmul == "auto":
        matmul = default_matmul_kernel() if paths == "fast" else "blas"
    if matmul not in MATMUL_KERNELS:
        raise ValueError(f"matmul kernel {matmul!r}: expected auto or one of {', '.join(MATMUL_KERNELS)}")
    if decoding not in DECODING_FORMS:
        raise ValueError(f"decoding forms {decoding!r}: expected one of {', '.join(DECODING_FORMS)}")
    if matmul == "onednn" and not onednn_available():
        raise ValueError("matmul kernel 'onednn': this torch build has no oneDNN linear; use 'blas'")
    speed = [f"{name} {value!r}" for name, value in (("matmul", matmul), ("decoding", decoding)) if value in SPEED]
    if paths == "reference" and speed:
        use = "matmul 'blas' (or 'auto') and decoding 'plain'"
        raise ValueError(
            f"{' and '.join(speed)}: a speed path, taken only with paths 'fast'; with 'reference' use {use}"
        )
    _KERNELS[0] = CpuKernels(matmul, decoding, paths)
    return _KERNELS[0]


def cpu_kernels() -> CpuKernels:
    """The code this process computes with (`set_cpu_kernels`)."""
    return _KERNELS[0]


def fast_paths() -> bool:
    """Whether the speed paths of `models/fast/` stand in for the reference code (`paths="fast"`)."""
    return _KERNELS[0].paths == "fast"
