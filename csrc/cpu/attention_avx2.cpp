// The CPU attention kernels for AVX2 + FMA + F16C CPUs (ATen's AVX2 Vectorized). setup.py and
// CMakeLists.txt compile this file alone with the flags of its line in variants.txt.
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(CPU_CAPABILITY_AVX2)
#error "attention_avx2.cpp needs -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#define ANLLM_CPU_NS cpu_avx2
#define ANLLM_CPU_ENTRY anllm_cpu_attention_avx2
#include "attention_kernels.h"
