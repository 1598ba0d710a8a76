// The query-heads-per-KV-head counts the AVX512-BF16 attention kernels are compiled for
// (attention_bf16.cpp, prefill_bf16.cpp): `with_group(g, f)` calls
// f(std::integral_constant<int, G>{}) for G == g and returns 1, or returns 0 for any other g
// (the caller then takes its generic path).
#pragma once

#include <cstdint>
#include <type_traits>

template <typename F>
int with_group(int64_t group, F&& f) {
    switch (group) {
        case 1: f(std::integral_constant<int, 1>{}); return 1;
        case 2: f(std::integral_constant<int, 2>{}); return 1;
        case 3: f(std::integral_constant<int, 3>{}); return 1;
        case 4: f(std::integral_constant<int, 4>{}); return 1;
        case 8: f(std::integral_constant<int, 8>{}); return 1;
        default: return 0;
    }
}
