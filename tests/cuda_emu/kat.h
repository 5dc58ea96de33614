// The known-answer kernels of kat.cpp, called by driver.cpp's `kat` op.
#pragma once
#include <cstdint>

void kat_ldmatrix(int n, bool trans, const uint16_t* in, const int* rows, uint32_t* out);
void kat_mma(int kind, const uint32_t* a, const uint32_t* b, const float* c, float* d);
void kat_ldmatrix_mma(int kind, bool b_kmajor, const unsigned char* a, const unsigned char* b, float* d);
void kat_cp_async(const unsigned char* src, unsigned char* out);
