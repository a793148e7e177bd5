"""Build and install detr-irpe: the `detr_irpe` library, the compiled `rpe_ops` op, the data folder datasets/
as `detr_irpe_datasets`, and the tools as console scripts (detr-irpe-train, ...).

    pip install --no-build-isolation -e .     # what `make` runs

rpe_ops compiles C++ kernels for the CPU; on CUDA the ops run Triton kernels (rpe_ops/triton_kernels.py), which
torch's CUDA wheels bring along: no nvcc, and one build for every GPU and CUDA version. MAX_JOBS=N: parallel
compile jobs.
"""
import os
import sys

from setuptools import find_packages, setup

try:
    from torch.utils import cpp_extension
except ImportError as error:
    raise SystemExit(f'detr-irpe: building rpe_ops needs torch installed first ({error}). Install torch, '
                     f'then run `pip install --no-build-isolation -e .` (or `make setup`).')

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join('rpe_ops', 'csrc')
def rpe_ops_extension():
    sources = [os.path.join(CSRC, 'rpe_index.cpp')] + [
        os.path.join(CSRC, 'cpu', name) for name in ('rpe_index_kernel.cpp', 'avx512.cpp', 'loops.cpp', 'block_cache.cpp')]
    # -fopenmp: at::parallel_for is a header template that splits work only where the including code is
    # built with OpenMP; without it every CPU kernel runs on one thread. The link resolves libgomp.so.1 to
    # the copy torch has already loaded, so the process keeps one OpenMP runtime.
    openmp = ['-fopenmp'] if sys.platform.startswith('linux') else []  # where torch ships libgomp
    cxx_flags = ['-O3'] + openmp
    link_flags = openmp
    return cpp_extension.CppExtension('rpe_ops._C', sources, extra_compile_args={'cxx': cxx_flags},
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
    python_requires='>=3.10',  # annotations such as `dict | None` are evaluated at import
    install_requires=['torch>=2.7', 'torchvision', 'numpy', 'scipy', 'pycocotools', 'pyyaml', 'tqdm',
                      'matplotlib', 'safetensors'],
    ext_modules=[rpe_ops_extension()],
    cmdclass={'build_ext': BuildExtension},
    zip_safe=False,
)
