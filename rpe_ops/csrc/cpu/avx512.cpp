// AVX-512 loops of the CPU kernels; see avx512.h. No ATen headers
// here (see there why).
#include "avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

namespace rpe_ops {
namespace avx512 {

bool available() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

namespace {

// Mask of the first n < 16 lanes.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// In-register transpose: on entry r[l] holds 16 keys of row l; on exit r[j]
// holds key j of the 16 rows. Three shuffle stages of 16 instructions each
// plus one of 16 lane-block moves.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  // Pairs of rows interleaved: t[2p] lane q = r2p[4q], r2p+1[4q], r2p[4q+1], r2p+1[4q+1].
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
  }
  // Quads of rows: u[4g + c] lane q = key 4q + c of rows 4g .. 4g + 3.
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // A 4x4 transpose of 128-bit blocks across u[c], u[4 + c], u[8 + c], u[12 + c]:
  // key 4q + c of all 16 rows.
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

inline void add_to(float* bucket, __m512 x) { _mm512_storeu_ps(bucket, _mm512_add_ps(_mm512_loadu_ps(bucket), x)); }

}  // namespace

namespace {

// Writes out_row[0, Lk) one vector at a time, value(j, mask) giving keys j .. j + 15: masked
// stores up to the first 64-byte boundary and for the tail, whole aligned vectors in between (a
// store across two cache lines costs two).
template <typename Value>
inline void write_row(float* out_row, int64_t Lk, Value value) {
  int64_t j = std::min<int64_t>(Lk, ((64 - reinterpret_cast<uintptr_t>(out_row) % 64) % 64) / 4);
  if (j > 0) _mm512_mask_storeu_ps(out_row, first_lanes(j), value(0, first_lanes(j)));
  for (; j + 16 <= Lk; j += 16) _mm512_store_ps(out_row + j, value(j, static_cast<__mmask16>(0xFFFF)));
  if (j < Lk) _mm512_mask_storeu_ps(out_row + j, first_lanes(Lk - j), value(j, first_lanes(Lk - j)));
}

// Offsets t * Lk + j of keys j .. j + 15 in a (Kt, Lk) table, t = their bucket ids.
inline __m512i key_offsets(__m512i ids_t, int64_t j, int64_t Lk) {
  return _mm512_add_epi32(_mm512_mullo_epi32(ids_t, _mm512_set1_epi32(static_cast<int32_t>(Lk))),
                          _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)));
}

// True if all 16 ids equal the first, `first` (then the 16 keys' entries are contiguous).
inline bool one_bucket(__m512i ids, int32_t first) {
  return _mm512_cmpeq_epi32_mask(ids, _mm512_set1_epi32(first)) == 0xFFFF;
}
}  // namespace

bool all_in_range(const int32_t* ids, int64_t n, int64_t K, int64_t* one_bucket_vectors) {
  // As unsigned numbers, negative ids are above every K: one compare per id.
  const __m512i k = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(K, INT32_MAX)));
  __mmask16 bad = 0;
  int64_t e = 0, runs = 0;
  for (; e + 16 <= n; e += 16) {
    const __m512i v = _mm512_loadu_si512(ids + e);
    bad |= _mm512_cmpge_epu32_mask(v, k);
    if (one_bucket_vectors != nullptr) runs += one_bucket(v, ids[e]);
  }
  if (one_bucket_vectors != nullptr) *one_bucket_vectors = runs;
  if (e < n) bad |= _mm512_mask_cmpge_epu32_mask(first_lanes(n - e), _mm512_maskz_loadu_epi32(first_lanes(n - e), ids + e), k);
  return bad == 0;
}

namespace {

// A row of K <= kMaxPermuteK entries held in registers, 32 per pair: one vpermt2ps looks 16 ids up
// in a pair, where vgatherdps costs about as much as 16 scalar loads. Looking 16 ids up in P pairs
// takes P permutes and P - 1 blends (rpe-2.0-product's K = 81: 3 and 2); entries past K are zero
// and never selected (ids are checked to lie in [0, K) before any loop runs).
template <int P>
struct RowInRegisters {
  __m512 lo[P], hi[P];

  explicit RowInRegisters(const float* row, int64_t K) {
    for (int p = 0; p < P; ++p) {
      lo[p] = load_first(row + 32 * p, K - 32 * p);
      hi[p] = load_first(row + 32 * p + 16, K - 32 * p - 16);
    }
  }

  static __m512 load_first(const float* p, int64_t n) {
    return n >= 16 ? _mm512_loadu_ps(p) : n <= 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(first_lanes(n), p);
  }

  __m512 lookup(__m512i ids) const {
    __m512 x = _mm512_permutex2var_ps(lo[0], ids, hi[0]);  // uses the low 5 bits of each id
    for (int p = 1; p < P; ++p)
      x = _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(ids, _mm512_set1_epi32(32 * p)), x,
                               _mm512_permutex2var_ps(lo[p], ids, hi[p]));
    return x;
  }
};

// Calls body(lookup) with lookup(ids, mask) the 16 entries of in_row at ids: by permutes where K
// is at most kMaxPermuteK, else by gathers.
template <typename Body>
inline void with_row_lookup(const float* in_row, int64_t K, Body body) {
  auto permuted = [&](auto pairs) {
    const RowInRegisters<decltype(pairs)::value> row(in_row, K);
    body([&](__m512i ids, __mmask16) { return row.lookup(ids); });
  };
  if (K <= 32) permuted(std::integral_constant<int, 1>());
  else if (K <= 64) permuted(std::integral_constant<int, 2>());
  else if (K <= 96) permuted(std::integral_constant<int, 3>());
  else if (K <= kMaxPermuteK) permuted(std::integral_constant<int, 4>());
  else body([&](__m512i ids, __mmask16 m) { return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, ids, in_row, 4); });
}

}  // namespace

void index_row(const float* in_row, int64_t K, const int32_t* index_row, float* out_row, int64_t Lk) {
  with_row_lookup(in_row, K, [&](auto lookup) {
    write_row(out_row, Lk, [&](int64_t j, __mmask16 m) { return lookup(_mm512_maskz_loadu_epi32(m, index_row + j), m); });
  });
}

void index_qk_row(const float* in_row, int64_t K, const int32_t* index_row, const float* keys_t,
                  const int32_t* index_t_row, int64_t Lk, float* out_row) {
  with_row_lookup(in_row, K, [&](auto lookup) {
    write_row(out_row, Lk, [&](int64_t j, __mmask16 m) {
      const __m512 q = lookup(_mm512_maskz_loadu_epi32(m, index_row + j), m);
      const __m512i ids_t = _mm512_maskz_loadu_epi32(m, index_t_row + j);
      const __m512 k = m == 0xFFFF && one_bucket(ids_t, index_t_row[j])
                           ? _mm512_loadu_ps(keys_t + index_t_row[j] * Lk + j)
                           : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, key_offsets(ids_t, j, Lk), keys_t, 4);
      return _mm512_add_ps(q, k);
    });
  });
}

namespace {

// 16 values as float32, lanes outside m zero (and not read).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BFloat16Bits* p, __mmask16 m) {  // bfloat16: the upper half of a float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const Float16Bits* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

template <typename T>
void reduce_rows_of(const T* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                    float* const* out_rows, float* scratch, const int32_t* index_t_row, int64_t Kt, float* key_sums) {
  // Two copies of the (K, 16) sums, for even and odd keys: neighbouring keys
  // often share a bucket, and one copy would chain each add on the last.
  float* even = scratch;
  float* odd = scratch + K * kRows;
  std::memset(scratch, 0, sizeof(float) * 2 * K * kRows);
  __m512 col[16];
  for (int64_t j0 = 0; j0 < Lk; j0 += 16) {
    const int64_t n = Lk - j0 < 16 ? Lk - j0 : 16;
    const __mmask16 keys = n == 16 ? static_cast<__mmask16>(0xFFFF) : first_lanes(n);
    for (int r = 0; r < 16; ++r)  // rows past n_rows read nothing and stay zero
      col[r] = load16((r < n_rows ? rows[r] : rows[0]) + j0, r < n_rows ? keys : 0);
    transpose16(col);
    if (key_sums != nullptr)  // key j0 + jj, bucket index_t[j0 + jj]: one vector of kRows sums each
      for (int64_t jj = 0; jj < n; ++jj) add_to(key_sums + ((j0 + jj) * Kt + index_t_row[j0 + jj]) * kRows, col[jj]);
    const int32_t* ids = index_row + j0;
    if (n == 16) {
      // All 16 keys in one bucket (e.g. the clipped far distances): one add.
      const __m512i v = _mm512_loadu_si512(ids);
      if (_mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(ids[0])) == 0xFFFF) {
        __m512 s[8];
        for (int p = 0; p < 8; ++p) s[p] = _mm512_add_ps(col[2 * p], col[2 * p + 1]);
        for (int p = 0; p < 4; ++p) s[p] = _mm512_add_ps(s[2 * p], s[2 * p + 1]);
        add_to(even + ids[0] * kRows, _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
        continue;
      }
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; jj += 2) {
        add_to(even + ids[jj] * kRows, col[jj]);
        add_to(odd + ids[jj + 1] * kRows, col[jj + 1]);
      }
    } else {
      for (int64_t jj = 0; jj < n; ++jj) add_to((jj & 1 ? odd : even) + ids[jj] * kRows, col[jj]);
    }
  }
  for (int64_t t = 0; t < K; ++t) {
    alignas(64) float sum[16];
    _mm512_store_ps(sum, _mm512_add_ps(_mm512_loadu_ps(even + t * kRows), _mm512_loadu_ps(odd + t * kRows)));
    for (int r = 0; r < n_rows; ++r) out_rows[r][t] = sum[r];
  }
}

}  // namespace

void reduce_rows(const float* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch, const int32_t* index_t_row, int64_t Kt, float* key_sums) {
  reduce_rows_of(rows, n_rows, index_row, Lk, K, out_rows, scratch, index_t_row, Kt, key_sums);
}

void reduce_rows(const BFloat16Bits* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch, const int32_t* index_t_row, int64_t Kt, float* key_sums) {
  reduce_rows_of(rows, n_rows, index_row, Lk, K, out_rows, scratch, index_t_row, Kt, key_sums);
}

void reduce_rows(const Float16Bits* const* rows, int n_rows, const int32_t* index_row, int64_t Lk, int64_t K,
                 float* const* out_rows, float* scratch, const int32_t* index_t_row, int64_t Kt, float* key_sums) {
  reduce_rows_of(rows, n_rows, index_row, Lk, K, out_rows, scratch, index_t_row, Kt, key_sums);
}

#pragma GCC pop_options

}  // namespace avx512
}  // namespace rpe_ops
