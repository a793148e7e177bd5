"""Build and install detr-irpe: the `detr_irpe` library, the compiled `rpe_ops` op, the data folder datasets/
as `detr_irpe_datasets`, and the tools as console scripts (detr-irpe-train, ...).

    pip install --no-build-isolation -e .     # what `make` runs

The CUDA kernels are compiled whenever nvcc is found (no GPU is needed to build
them). Environment:
    RPE_OPS_NO_CUDA=1         CPU kernels only (quick rebuilds while iterating)
    TORCH_CUDA_ARCH_LIST=...  GPU architectures (default: sm_75, sm_80, sm_90 + PTX)
    MAX_JOBS=N                parallel compile jobs
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    from torch.utils import cpp_extension
except ImportError as error:
    raise SystemExit(f'detr-irpe: building rpe_ops needs torch installed first ({error}). Install torch, '
                     f'then run `pip install --no-build-isolation -e .` (or `make setup`).')

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join('rpe_ops', 'csrc')
DEFAULT_CUDA_ARCH_FLAGS = [
    '-gencode=arch=compute_75,code=sm_75',  # Turing (T4), the oldest CUDA 13 still builds for
    '-gencode=arch=compute_80,code=sm_80',
    '-gencode=arch=compute_90,code=sm_90',
    '-gencode=arch=compute_90,code=compute_90',  # PTX, so newer GPUs can JIT it
]


def find_cuda_toolkit():
    """The toolkit nvcc belongs to, or None.

    torch guesses CUDA_HOME as the parent of the directory holding nvcc, which
    is wrong when nvcc is a wrapper script (e.g. /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc); nvcc's own --dryrun names its real home.
    """
    if os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH'):
        return os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run([nvcc, '--dryrun', '-E', '-x', 'cu', os.devnull], capture_output=True,
                                text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        dryrun = ''
    homes = [os.path.dirname(line.split('=', 1)[1].strip())
             for line in dryrun.splitlines() if line.startswith('#$ _HERE_=')]  # nvcc binary's dir
    homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in homes:
        if os.path.exists(os.path.join(home, 'include', 'cuda_runtime.h')):
            return os.path.realpath(home)
    print(f'rpe_ops: found {nvcc} but not its CUDA headers (tried {homes}); set CUDA_HOME. '
          f'Building the CPU kernels only.')
    return None


def pip_cuda_include_dirs():
    """Include dirs of the nvidia-* pip packages installed with torch.

    PyTorch's CUDA headers include cuBLAS / cuSPARSE / cuSOLVER headers that a
    bare nvcc toolkit may lack; torch's own CUDA wheels bring them. (Nothing to
    link from there: the extension only needs libcudart from the toolkit.)
    """
    site = sysconfig.get_paths()['purelib']
    return sorted(d for d in glob.glob(os.path.join(site, 'nvidia', '*', 'include')) if os.path.isdir(d))


def rpe_ops_extension():
    sources = [os.path.join(CSRC, 'rpe_index.cpp')] + [
        os.path.join(CSRC, 'cpu', name) for name in ('rpe_index_kernel.cpp', 'avx512.cpp', 'loops.cpp', 'block_cache.cpp')]
    # -fopenmp: at::parallel_for is a header template that splits work only where the including code is
    # built with OpenMP; without it every CPU kernel runs on one thread. The link resolves libgomp.so.1 to
    # the copy torch has already loaded, so the process keeps one OpenMP runtime.
    openmp = ['-fopenmp'] if sys.platform.startswith('linux') else []  # where torch ships libgomp
    cxx_flags = ['-O3'] + openmp
    link_flags = openmp
    toolkit = None if os.environ.get('RPE_OPS_NO_CUDA') == '1' else find_cuda_toolkit()
    if toolkit is None:
        return cpp_extension.CppExtension('rpe_ops._C', sources, extra_compile_args={'cxx': cxx_flags},
                                          extra_link_args=link_flags)

    cpp_extension.CUDA_HOME = toolkit  # where BuildExtension looks for nvcc, headers, libcudart
    sources.append(os.path.join(CSRC, 'cuda', 'rpe_index_kernel.cu'))
    # -idirafter: the pip headers only fill gaps; the toolkit's own headers win.
    extra_includes = [f'-idirafter{d}' for d in pip_cuda_include_dirs()]
    nvcc_flags = ['-O3', '-DWITH_CUDA'] + [f'-Xcompiler={flag}' for flag in extra_includes]
    if not os.environ.get('TORCH_CUDA_ARCH_LIST'):
        nvcc_flags += DEFAULT_CUDA_ARCH_FLAGS  # torch's default needs a visible GPU
    return cpp_extension.CUDAExtension(
        'rpe_ops._C', sources,
        extra_compile_args={'cxx': cxx_flags + ['-DWITH_CUDA'] + extra_includes, 'nvcc': nvcc_flags},
        extra_link_args=link_flags)


class BuildExtension(cpp_extension.BuildExtension):
    """Keeps object files in build/, so that re-running `pip install -e .` recompiles only
    the sources that changed (pip's editable build otherwise starts from an empty temp dir)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(HERE, 'build', 'temp-rpe_ops')


TOOLS = ('train', 'eval', 'predict', 'export', 'benchmark', 'benchmark_op', 'sweep', 'plot_logs', 'visualize_buckets',
         'visualize_rpe', 'pretrain_backbone', 'gpu_check')

setup(
    name='detr-irpe',
    version='0.1.0',
    description='DETR with image relative position encoding (iRPE) in the encoder self-attention',
    # datasets/ has no __init__.py: under its folder's name it can never shadow an installed `datasets` package
    # (Hugging Face's); it is installed, and imported, as detr_irpe_datasets.
    packages=find_packages(include=['detr_irpe', 'detr_irpe.*', 'rpe_ops', 'rpe_ops.*']) + ['detr_irpe_datasets'],
    package_dir={'detr_irpe_datasets': 'datasets'},
    entry_points={'console_scripts': [f"detr-irpe-{tool.replace('_', '-')} = detr_irpe.cli.{tool}:main"
                                      for tool in TOOLS]},
    python_requires='>=3.9',
    install_requires=['torch>=2.4', 'torchvision', 'numpy', 'scipy', 'pycocotools', 'pyyaml', 'tqdm',
                      'matplotlib', 'safetensors'],
    ext_modules=[rpe_ops_extension()],
    cmdclass={'build_ext': BuildExtension},
    zip_safe=False,
)
