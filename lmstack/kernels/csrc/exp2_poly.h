// Coefficients of 2^f on |f| <= 1/2, highest degree first (degree 5, relative error ~3e-6),
// shared by the tiled prefill kernels (prefill_bf16.cpp, prefill_f32.cpp): each computes
// 2^x as 2^round(x) times this polynomial of the remainder, in its own vector width.
#pragma once

constexpr float kExp2Poly[6] = {1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f,
                                2.4022651e-1f, 6.9314718e-1f, 1.f};
