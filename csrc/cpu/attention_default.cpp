// The CPU attention kernels for any x86-64 (or other) CPU: no instruction-set flags beyond the baseline
// (its line in variants.txt).
#define ANLLM_CPU_NS cpu_default
#define ANLLM_CPU_ENTRY anllm_cpu_attention_default
#include "attention_kernels.h"
