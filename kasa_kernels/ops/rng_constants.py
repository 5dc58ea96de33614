"""The dropout hash's constants, defined once (the spec is ops/rng.py's docstring).

This file imports nothing, so the C++ builds can read it without importing the package: setup.py and
tests/cuda_emu/build.py through runpy, CMakeLists.txt by running it (`python rng_constants.py` prints the
definitions). csrc/kasa_common.cuh refuses to compile without them; Triton reads them through ops/rng.py.
"""
MIX_MUL1 = 0x21F0AAAD  # lowbias32's first multiplier
MIX_MUL2 = 0xD35A2D97  # and its second
MASK32 = 0xFFFFFFFF


def cxx_defines():
    """The -D flags every C++/CUDA build of csrc/ passes."""
    return [f"-DKASA_MIX_MUL1={MIX_MUL1:#010x}u", f"-DKASA_MIX_MUL2={MIX_MUL2:#010x}u"]


if __name__ == "__main__":
    print(";".join(d[2:] for d in cxx_defines()))
