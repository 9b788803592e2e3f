"""Compiled denoising steps: ``torch.compile`` over the decoder layer of a denoising query.

A denoising step runs every decoder layer on the noisy latent blocks of its guidance branches.
Between the layer's matrix products sit a dozen element-wise passes (norms, q/k-norm, RoPE, SiLU,
the image markers' rows, residuals), each reading and writing the step's activations and each a
separate operator call; on a CPU they cost about a sixth of the step.  The model runs such a layer
as one function of tensors (:func:`unimedvl.model.llm.context_query_layer`), so the compiler can
take it whole (no graph break) and fuse those passes into a few loops around the products, which
stay the BLAS/cuBLAS calls they were.

Compiling is applied from outside the model, like device placement: :func:`compile_denoising`
swaps the function the model calls for its compiled form; :func:`uncompile_denoising` puts the
plain one back.  Everything else (prompts, text decoding, training) runs as before.

Costs: the first step of each new shape (image size, number of branches, context length) waits for
the compilation, about half a minute on a 2-core CPU (the compiler's on-disk cache makes a rerun in
a new process take a few seconds); later shapes of the same kind reuse a size-generic graph.  On a
CPU it needs a C++ compiler (``g++``/``clang++``), on CUDA the Triton package.
"""

from __future__ import annotations

import shutil

import torch

from ..model.llm import context_query_layer
from ..model.unimedvl import UniMedVL


class CompilationUnavailable(RuntimeError):
    """``compile=True`` on a machine that lacks what ``torch.compile`` needs for the model's device."""


def compiler_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or ``None`` when it can."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # searches the compilers inductor would use (CXX, then g++/clang++)
            return None
        except ImportError:
            if shutil.which("g++") or shutil.which("clang++"):
                return None
        except Exception:
            pass
        return ("compiling the denoising step on a CPU needs a C++ compiler (g++ or clang++), and none was "
                "found: install one (Debian/Ubuntu: apt-get install g++) or run without --compile")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if has_triton():
            return None
        return "compiling the denoising step on CUDA needs the triton package: pip install triton, or run without --compile"
    return f"compiling the denoising step is not supported on {device.type} devices; run without --compile"


def require_compiler(device: torch.device) -> None:
    """Raise :class:`CompilationUnavailable` with :func:`compiler_problem`'s reason, if there is one."""
    problem = compiler_problem(device)
    if problem is not None:
        raise CompilationUnavailable(problem)


def compile_denoising(model: UniMedVL) -> None:
    """Make the model's denoising steps run compiled (:mod:`module docs <unimedvl.inference.compilation>`).

    Raises :class:`CompilationUnavailable` (nothing changed) when the device's compiler is missing.
    ``fullgraph``: the layer function has no graph break by construction; one appearing (a future
    change) is an error in the tests instead of a silent fallback to slow, partly compiled code.
    """
    require_compiler(model.device)
    model.language_model.model.context_query_layer = torch.compile(context_query_layer, fullgraph=True)


def uncompile_denoising(model: UniMedVL) -> None:
    model.language_model.model.context_query_layer = context_query_layer


def is_compiled(model: UniMedVL) -> bool:
    return model.language_model.model.context_query_layer is not context_query_layer
