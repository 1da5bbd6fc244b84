/* Which of the kernel library's variants this CPU runs (build.py, library.py). Built for the
 * architecture's baseline, so that any CPU of it can load this and ask.
 *
 * x86-64: the highest micro-architecture level whose every feature the CPU has and the OS has
 * enabled (GCC's __builtin_cpu_supports reads cpuid, and XGETBV for the AVX and AVX-512 register
 * state): 4 = x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), 3 = v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE),
 * 2 = v2 (SSE4.2, POPCNT, SSSE3, CX16), 1 = plain x86-64. Other architectures: 0 (aarch64 always
 * has NEON; its one variant runs everywhere). */
int lumen_cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 4;
    if (__builtin_cpu_supports("x86-64-v3")) return 3;
    if (__builtin_cpu_supports("x86-64-v2")) return 2;
    return 1;
#else
    return 0;
#endif
}
