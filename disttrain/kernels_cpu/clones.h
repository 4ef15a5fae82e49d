// DT_CLONES: a function built for AVX-512, for AVX2 + FMA and for plain x86-64, one picked at load time, so
// one build runs on every x86-64 CPU and uses the vector units it has (no -march=native). A call into a clone
// goes through that choice and is not inlined: mark the function that holds the loop, not a helper called
// per element.
#ifndef DISTTRAIN_CLONES_H
#define DISTTRAIN_CLONES_H

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DT_CLONES
#endif

#endif
