"""Build and install kasa_kernels (and the kasa_reference oracle it is tested against)."""
import os
import re
import runpy
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "kasa_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------------------
# The CUDA extension kasa_kernels._C (csrc/, source list in csrc/sources.txt, shared with CMakeLists.txt).
#   KASA_KERNELS_BUILD_CUDA=auto (default): build when torch has CUDA and nvcc is found, else say why and skip.
#                           1: build or fail.  0: never build.
#   KASA_KERNELS_CUDA_ARCHS="80;86;90" (default; "80" when CI=true, see _cuda_archs). MAX_JOBS caps ninja's jobs.
# ---------------------------------------------------------------------------------------------------------------------
def _say(msg):
    print(f"kasa_kernels setup: {msg}", file=sys.stderr)


def _nvcc_toolkit_root():
    """The CUDA toolkit folder that the nvcc on PATH runs. A wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`)
    makes torch guess CUDA_HOME from the wrapper's folder and then fail to link -lcudart, so read the script."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for tok in re.findall(rb"(/[^\s\"']*/bin/nvcc)\b", head):
                cand = os.path.realpath(tok.decode())
                if cand != real and os.path.isfile(cand):
                    real = cand
                    break
    except OSError:
        pass
    root = os.path.dirname(os.path.dirname(real))
    return root if os.path.isfile(os.path.join(root, "bin", "nvcc")) else None


def _cuda_archs():
    archs = os.environ.get("KASA_KERNELS_CUDA_ARCHS")
    if not archs:
        # CI only needs to prove the extension builds, links and imports; one architecture keeps that bounded.
        archs = "80" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "80;86;90"
    out = []
    for a in re.split(r"[;,\s]+", archs.strip()):
        a = a.replace(".", "").replace("sm_", "")
        if not a:
            continue
        if not re.fullmatch(r"\d{2,3}a?", a) or int(a.rstrip("a")) < 80:
            raise SystemExit(f"KASA_KERNELS_CUDA_ARCHS: {a!r} is not a compute capability >= 80 (e.g. 80;86;90)")
        out.append(a)
    if not out:
        raise SystemExit("KASA_KERNELS_CUDA_ARCHS is empty")
    return out


def cuda_extension():
    """(ext_modules, cmdclass) for setup(): the extension, or nothing with the reason printed."""
    mode = os.environ.get("KASA_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"KASA_KERNELS_BUILD_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _say("KASA_KERNELS_BUILD_CUDA=0: not building the CUDA extension (the torch and triton backends still work)")
        return [], {}

    def skip(why):
        if mode == "1":
            raise SystemExit(f"kasa_kernels setup: KASA_KERNELS_BUILD_CUDA=1 but {why}")
        _say(f"not building the CUDA extension: {why}. Set KASA_KERNELS_BUILD_CUDA=1 to make this an error.")
        return [], {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable (install torch first and use --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        root = _nvcc_toolkit_root()
        if root is None:
            return skip("nvcc was not found on PATH and CUDA_HOME is not set")
        os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME})")
    archs = _cuda_archs()
    # SASS for every listed architecture, plus PTX of the newest so later GPUs can JIT-compile it. Passing -gencode
    # ourselves makes torch add none of its own (it would otherwise read TORCH_CUDA_ARCH_LIST).
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    with open(os.path.join(HERE, "csrc", "sources.txt")) as f:
        sources = [os.path.join("csrc", line.strip()) for line in f if line.strip() and not line.startswith("#")]
    _say(f"building kasa_kernels._C for sm_{', sm_'.join(archs)} with CUDA_HOME={CUDA_HOME} "
         f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'ninja default')})")
    # the dropout hash's constants, defined once in Python (kasa_kernels/ops/rng_constants.py imports nothing)
    rng_defines = runpy.run_path(os.path.join(HERE, "kasa_kernels", "ops", "rng_constants.py"))["cxx_defines"]()
    ext = CUDAExtension(
        name="kasa_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", f"-DKASA_CUDA_ARCHS_TOKEN={'_'.join(archs)}"] + rng_defines,
            "nvcc": ["-O3", "-lineinfo"] + gencode + rng_defines,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = cuda_extension()


setup(
    name="kasa_kernels",
    version=read_version(),
    description="Fused Triton and CUDA kernels for KaSA (Knowledge-aware Singular-value Adaptation) fine-tuning",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["kasa_kernels", "kasa_kernels.*"]) + ["kasa_reference"],
    package_dir={"kasa_reference": "python/kasa_reference"},
    # the torch backend's CPU kernels in C (dropout masks, the rank-r dY pass, the fp32 GEMM with the rank-r term),
    # compiled at first use (kasa_kernels/ops/cpu_mask.py)
    package_data={"kasa_kernels.ops": ["cpu_mask.c", "cpu_rank.c", "cpu_gemm.c"]},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "peft>=0.21",
            "transformers",
            "safetensors",
            "matplotlib",
            # KasaCallback is tested in trl's SFTTrainer too (tests/test_trainer_callback.py, test_examples_hf.py);
            # trl brings datasets, pandas and pyarrow (~70 MB of wheels, ~20 s to install)
            "trl",
            # the quantized-base tests (tests/test_quant.py): bitsandbytes 0.50 quantizes and dequantizes on the CPU
            "bitsandbytes==0.50.2",
        ],
        # the peers (PEFT's KaSA layer, the transformers training step) are what the benchmark compares against
        "bench": ["matplotlib", "pytest-benchmark", "peft>=0.21", "transformers"],
    },
    entry_points={"console_scripts": ["kasa-bench = kasa_kernels.bench.__main__:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
