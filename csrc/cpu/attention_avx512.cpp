// The CPU attention kernels for AVX-512 (F, BW, VL, DQ) CPUs, ATen's AVX512 capability. setup.py and
// CMakeLists.txt compile this file alone with the flags of its line in variants.txt.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(CPU_CAPABILITY_AVX512)
#error "attention_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -DCPU_CAPABILITY_AVX512"
#endif
#define ANLLM_CPU_NS cpu_avx512
#define ANLLM_CPU_ENTRY anllm_cpu_attention_avx512
#include "attention_kernels.h"
