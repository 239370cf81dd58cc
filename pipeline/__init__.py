"""Lethe's pipeline: data, model, circuits, unlearning, evaluation, gate and registry.

Importing it pins the vector kernels torch and MKL use on x86: the same seed trains other weights with AVX512
kernels than with AVX2 ones (other float rounding), so the same params would give another model, and other
benchmark figures, on another processor. AVX2 is what every x86 machine seen here has. It made an AVX512 and an
AVX2 AMD EPYC train the same base; an Intel Xeon under the same pin still trains other weights, so results
name the machine and the weights' hash (README "Results"). The variables are read when torch first dispatches a
kernel, so this must run before any tensor work; an explicit setting in the environment wins."""

import os
import platform

KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
X86 = platform.machine().lower() in {"x86_64", "amd64"}

if X86:
    for name, value in KERNELS.items():
        os.environ.setdefault(name, value)
