// The CPU kernels (selfattn/_settings.py: CPU_KERNEL_SOURCES) are compiled once per CPU
// capability — DEFAULT (the x86-64 baseline), AVX2, AVX512 — into one library, each copy with its
// own instruction-set flags and in a namespace of its own, selfattn::SELFATTN_CPU_NS (cpu_default,
// cpu_avx2, cpu_avx512), as ATen does with CPU_CAPABILITY. csrc/cpu/dispatch.cpp picks the copy
// at run time. Everything a kernel file defines with external linkage must live in that namespace
// (or an anonymous one): a name shared by two copies would be merged by the linker into one
// copy, compiled for some one instruction set. Code that needs more than its copy's flags (a
// bf16 micro-kernel under __attribute__((target("avx512bf16"))), say) checks the CPU itself
// before running it.
#pragma once

#ifndef SELFATTN_CPU_NS
#error \
    "csrc/cpu kernel files are compiled once per CPU capability, with SELFATTN_CPU_NS naming each copy's namespace: list this file in CPU_KERNEL_SOURCES (selfattn/_settings.py) and its entry points in csrc/cpu/kernels.h"
#endif
