"""Build of sharedllm_ops and its one extension, sharedllm_ops._C.

Knobs (environment variables):
  SHAREDLLM_OPS_CPU_ONLY=1   build the CPU kernels only, even where torch has CUDA and nvcc exists
  SHAREDLLM_OPS_SKIP_EXT=1   no extension at all (the package falls back to its Python backends)
  CUDA_HOME                  CUDA toolkit to use (e.g. /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST       archs to compile for, e.g. "8.0;9.0+PTX" (default: those of the local GPUs)
  MAX_JOBS                   parallel compile jobs (ninja)
  NVCC_THREADS               nvcc --threads (default 2)
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("SHAREDLLM_OPS_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    with_cuda = (
        not _flag("SHAREDLLM_OPS_CPU_ONLY")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = [s for s in rel("python/*.cpp") if not s.endswith("_cuda.cpp")] + rel("csrc/cpu/*.cpp")
    torch_version = torch.__version__.split("+")[0]
    macros = [("SHAREDLLM_TORCH_VERSION", f'"{torch_version}"')]
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # including file is compiled with OpenMP (it then shares torch's libgomp)
    # -Wno-psabi: the 32-byte vector helpers of cpu_vec.h are always inlined, never passed by ABI
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    cxx_flags += ["-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    link_flags = ["-fopenmp"]
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        sources += rel("python/*_cuda.cpp") + rel("csrc/cuda/*.cu")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        macros += [("SHAREDLLM_WITH_CUDA", None), ("SHAREDLLM_CUDA_ARCHS", f'"{archs}"')]
        ext = cpp_extension.CUDAExtension(
            "sharedllm_ops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "sharedllm_ops._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"sharedllm_ops: building {'CUDA' if with_cuda else 'CPU-only'} extension from {len(sources)} sources")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sharedllm_ops", "sharedllm_ops.*"]),
    # the trained injectors shipped with the package (config + safetensors)
    package_data={"sharedllm_ops.model": ["injectors/*/*.json", "injectors/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
