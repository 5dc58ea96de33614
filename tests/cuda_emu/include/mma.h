#pragma once
#include "../emu_cuda.h"
#include "../emu_wmma.h"
