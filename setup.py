"""Build script: package metadata + the C++ extensions gptfast._C (the block manager) and gptfast._cpu
(the CPU decode linear), built by CMake with Ninja.

`pip install -e .` (build isolation fetches setuptools, wheel, pybind11, cmake, ninja) and
`python3 -m pip install --no-build-isolation --no-deps -e .` (those already installed, no index)
both build the extension. cmake and ninja are taken from their Python packages when importable,
else from PATH. Extra CMake arguments: the CMAKE_ARGS environment variable (space separated).
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(module: str, binary: str) -> str:
    """Path of `binary` from the Python package `module` if installed, else from PATH."""
    try:
        mod = __import__(module)
        candidate = Path(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR) / binary
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"building gptfast's extensions needs {binary!r}: pip install {module}")
    return found


def _pybind11_cmake_dir() -> str:
    try:
        import pybind11

        return pybind11.get_cmake_dir()
    except ImportError:
        out = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "cmake")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_pybind11_cmake_dir()}",
            f"-DGPTFAST_OUTPUT_DIR={target.parent}",
            "-DGPTFAST_BUILD_TESTS=OFF",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        subprocess.run(configure, check=True)
        module = ext.name.rsplit(".", 1)[-1]  # the CMake target: _C or _cpu
        subprocess.run([cmake, "--build", str(build_dir), "--target", module], check=True)
        built = [p for p in target.parent.glob(f"{module}.*") if p.suffix in (".so", ".pyd")]
        if target not in built:
            raise RuntimeError(f"CMake did not produce {target}; found {built}")
        # Editable installs import the package from the source tree: the module goes there too.
        if getattr(self, "editable_mode", False) or self.inplace:
            source_copy = ROOT / "gptfast" / target.name
            if source_copy != target:
                shutil.copy2(target, source_copy)


setup(
    name="gptfast",
    version="0.1.0",
    description="Fast GPT-2 generation: Triton kernels, a C++ paged KV-cache manager, "
                "a drop-in generate()",
    python_requires=">=3.10",
    packages=find_packages(include=["gptfast", "gptfast.*"]),
    ext_modules=[CMakeExtension("gptfast._C"), CMakeExtension("gptfast._cpu")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.1",
        # Triton wheels exist for Linux only; elsewhere gptfast runs the eager references and says
        # so. No upper bound: each torch CUDA wheel pins its own Triton (torch 2.13: 3.7.1).
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "tokenizers",
        "huggingface_hub",  # hub names ("gpt2") resolve through the local Hugging Face cache
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "pexpect",  # the interactive CLI tests drive a pseudo-terminal
            "transformers>=4.45",
            # the version the interpreter tests were validated with and the GPU machine has:
            # each Triton release changes the interpreter (3.9's is ~3x slower on these tests)
            "triton==3.6.0; platform_system == 'Linux'",
            "numpy<2.3",  # COMPAT(triton 3.6): its interpreter breaks on scalar arguments with numpy >= 2.3
            "matplotlib",
            "scipy",
            "ruff",  # .ci/run lints before testing (configuration: pyproject.toml)
        ],
        "bench": ["matplotlib", "transformers>=4.45"],
        # the CPU contender of `gptfast bench --suite e2e` (skipped with a note when absent)
        "ctranslate2": ["ctranslate2>=4.5", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["gptfast = gptfast.cli:main"]},
    zip_safe=False,
)
