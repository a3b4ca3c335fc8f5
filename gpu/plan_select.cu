// Plan stage on the GPU (docs/design.rst sections 3-4): tile means for the block scores, and per
// query tile the ordered visit list of TopK / TopP / dense-by-score, with no host round trip.
//
//   tile_means:   mean of each tile's valid rows, fp32, times a factor (the logit scale for q).
//   block_scores: q-tile means . (k-tile means - their mean over tiles), 16 x 64 blocks of
//                 scores per step from shared memory, one CTA per 16 query tiles of a kv head.
//   select_tiles: one CTA per query tile sorts its nk scores (bitonic, in shared memory;
//                 descending score, ties to the lower tile index), keeps the TopK count, the
//                 TopP prefix or exactly the tiles of a given bitmap, and writes the kept tiles
//                 in natural, score or peak order.

#include "element_types.cuh"

namespace psa {

// grid (tiles, H, B); blockDim.x = (HEAD_DIM / 8) * ROW_GROUPS. Each thread sums 8 consecutive
// dims (one 16-byte load a row) over every ROW_GROUPS-th row of the tile.
template <class Element, int HEAD_DIM, int ROW_GROUPS>
__global__ void __launch_bounds__((HEAD_DIM / 8) * ROW_GROUPS) tile_means(
    const unsigned short* __restrict__ x, long long batch_stride, long long head_stride,
    long long row_stride, int n_rows, int tile, float factor, float* __restrict__ means) {
    constexpr int kChunks = HEAD_DIM / 8;
    __shared__ float partial[ROW_GROUPS][HEAD_DIM];
    const int chunk = threadIdx.x % kChunks;
    const int group = threadIdx.x / kChunks;
    const int first = blockIdx.x * tile;
    const int rows = min(tile, n_rows - first);
    const unsigned short* slab = x + blockIdx.z * batch_stride + blockIdx.y * head_stride +
                                 (long long)first * row_stride + chunk * 8;
    float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int row = group; row < rows; row += ROW_GROUPS) {
        const uint4 packed = *reinterpret_cast<const uint4*>(slab + (long long)row * row_stride);
        const unsigned words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            sum[2 * w] += Element::to_float(static_cast<unsigned short>(words[w] & 0xffffu));
            sum[2 * w + 1] += Element::to_float(static_cast<unsigned short>(words[w] >> 16));
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) partial[group][chunk * 8 + e] = sum[e];
    __syncthreads();
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float total = 0.f;
#pragma unroll
        for (int g = 0; g < ROW_GROUPS; ++g) total += partial[g][d];
        const long long tile_index =
            ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        means[tile_index * HEAD_DIM + d] = total * (factor / rows);
    }
}

// grid (ceil(group * nq / 16), Hkv, B), 256 threads. Rows of q_means are taken kv-head-grouped
// (the `group` query heads sharing kv head h are rows h*group*nq ...), as GQA shares k_means.
template <int HEAD_DIM>
__global__ void __launch_bounds__(256, 1) block_scores(const float* __restrict__ q_means,
                                                    const float* __restrict__ k_means, int nq,
                                                    int nk, int group,
                                                    float* __restrict__ scores) {
    constexpr int kRows = 16;                      // query tiles (grouped rows) per CTA
    constexpr int kCols = 64;                      // key tiles per step
    constexpr int kColumns4 = HEAD_DIM / 4;        // float4 columns of a k_means row
    constexpr int kParts = 256 / kColumns4;        // rows summed in parallel per column
    constexpr int kLoads = kCols * kColumns4 / 256;
    __shared__ float4 centre_parts[kParts][kColumns4];
    __shared__ float centre[HEAD_DIM];
    // +1 column: the 16 k rows a warp reads at one d fall in 16 different banks.
    __shared__ float q_rows[kRows][HEAD_DIM + 1];
    __shared__ float k_rows[kCols][HEAD_DIM + 1];
    const int tid = threadIdx.x;
    const long long kv = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    const float* k_head = k_means + kv * nk * HEAD_DIM;
    {  // centre = mean over key tiles, in a fixed order (the plan must be reproducible);
       // 16-byte loads, eight in flight per thread.
        const int column = tid % kColumns4, part = tid / kColumns4;
        const float4* rows = reinterpret_cast<const float4*>(k_head);
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int j = part; j < nk; j += kParts) {
            const float4 x = rows[(long long)j * kColumns4 + column];
            sum.x += x.x;
            sum.y += x.y;
            sum.z += x.z;
            sum.w += x.w;
        }
        centre_parts[part][column] = sum;
    }
    const int grouped_rows = group * nq;
    const int first_row = blockIdx.x * kRows;
    for (int e = tid; e < kRows * HEAD_DIM; e += 256) {
        const int i = e / HEAD_DIM, d = e % HEAD_DIM, row = first_row + i;
        float value = 0.f;
        if (row < grouped_rows) {
            const long long head = (long long)blockIdx.y * group + row / nq;
            value = q_means[(((long long)blockIdx.z * gridDim.y * group + head) * nq + row % nq) *
                                HEAD_DIM + d];
        }
        q_rows[i][d] = value;
    }
    __syncthreads();
    if (tid < HEAD_DIM) {
        float sum = 0.f;
#pragma unroll
        for (int p = 0; p < kParts; ++p)
            sum += reinterpret_cast<const float*>(centre_parts[p])[tid];
        centre[tid] = sum / nk;
    }
    // Steps of kCols key tiles: each thread issues its kLoads 16-byte loads of the next block
    // before the barrier, then computes 4 of the 16 x 64 scores from shared memory.
    const float4* rows4 = reinterpret_cast<const float4*>(k_head);
    const int i = tid / 16, jq = tid % 16, row = first_row + i;
    for (int j0 = 0; j0 < nk; j0 += kCols) {
        float4 loaded[kLoads];
#pragma unroll
        for (int l = 0; l < kLoads; ++l) {
            const int e = l * 256 + tid, r = e / kColumns4, c = e % kColumns4;
            loaded[l] = j0 + r < nk ? rows4[(long long)(j0 + r) * kColumns4 + c]
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        __syncthreads();  // centre is ready; the previous block of k rows is consumed
#pragma unroll
        for (int l = 0; l < kLoads; ++l) {
            const int e = l * 256 + tid, r = e / kColumns4, c = e % kColumns4;
            const bool valid = j0 + r < nk;
            k_rows[r][4 * c] = valid ? loaded[l].x - centre[4 * c] : 0.f;
            k_rows[r][4 * c + 1] = valid ? loaded[l].y - centre[4 * c + 1] : 0.f;
            k_rows[r][4 * c + 2] = valid ? loaded[l].z - centre[4 * c + 2] : 0.f;
            k_rows[r][4 * c + 3] = valid ? loaded[l].w - centre[4 * c + 3] : 0.f;
        }
        __syncthreads();
        float dot[kCols / 16] = {};
#pragma unroll 8
        for (int d = 0; d < HEAD_DIM; ++d) {
            const float qd = q_rows[i][d];
#pragma unroll
            for (int c = 0; c < kCols / 16; ++c) dot[c] = fmaf(qd, k_rows[jq + 16 * c][d], dot[c]);
        }
        if (row < grouped_rows) {
            const long long head = (long long)blockIdx.y * group + row / nq;
            float* out = scores + (((long long)blockIdx.z * gridDim.y * group + head) * nq +
                                   row % nq) * nk;
#pragma unroll
            for (int c = 0; c < kCols / 16; ++c)
                if (j0 + jq + 16 * c < nk) out[j0 + jq + 16 * c] = dot[c];
        }
    }
}

// True when entry a comes before entry b: higher score first, then lower tile index.
__device__ __forceinline__ bool comes_before(float score_a, int index_a, float score_b,
                                             int index_b) {
    return score_a > score_b || (score_a == score_b && index_a < index_b);
}

// Bitonic sort of n (a power of two) (score, index) pairs in shared memory, comes_before order.
__device__ void bitonic_sort(float* score, int* index, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
                const int lo = 2 * i - (i & (stride - 1));
                const int hi = lo + stride;
                const bool forward = (lo & size) == 0;
                const bool swap =
                    forward ? comes_before(score[hi], index[hi], score[lo], index[lo])
                            : comes_before(score[lo], index[lo], score[hi], index[hi]);
                if (swap) {
                    const float s = score[lo];
                    score[lo] = score[hi];
                    score[hi] = s;
                    const int t = index[lo];
                    index[lo] = index[hi];
                    index[hi] = t;
                }
            }
            __syncthreads();
        }
    }
}

enum VisitOrder { kNatural = 0, kScore = 1, kPeak = 2 };

// grid (nq, H, B); dynamic shared memory 2 * n_pow2 words + blockDim.x floats.
// keep > 0: keep exactly `keep` tiles (TopK, the SLA critical set, or every tile); keep == 0:
// TopP with `top_p`. The kept tiles go to this row's `max_count` slots of `visit` (-1 after);
// a row keeps at most max_count tiles (the caller sizes it from the selector).
// write_marginal != 0 (the SLA split): marginal[row, j] = 1 exactly for the tiles of sorted
// rank in [marginal_begin, marginal_end), 0 elsewhere (every tile of the row is written once).
// use_mask != 0: the row keeps exactly the tiles j with mask[row, j] != 0 (`keep` and `top_p`
// unused), ordered among themselves as above.
__global__ void select_tiles(const float* __restrict__ scores, int n_key_tiles, int n_pow2,
                             int keep, float top_p, int order, int peak,
                             int* __restrict__ visit, int max_count, int* __restrict__ count,
                             unsigned char* __restrict__ marginal, int write_marginal,
                             int marginal_begin, int marginal_end,
                             const unsigned char* __restrict__ mask, int use_mask) {
    extern __shared__ __align__(16) unsigned char shared_raw[];
    float* score = reinterpret_cast<float*>(shared_raw);
    int* index = reinterpret_cast<int*>(score + n_pow2);
    float* partial = reinterpret_cast<float*>(index + n_pow2);
    __shared__ int kept_count;
    // Tiles outside the mask sort after every tile in it (index + kUnlisted breaks the -inf
    // tie), and the count of tiles in it bounds every read of index[] below to real tiles.
    constexpr int kUnlisted = 1 << 24;  // above any tile index (n_pow2 <= 4096)
    __shared__ int listed_count;

    const long long row = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const float* row_scores = scores + row * n_key_tiles;
    if (threadIdx.x == 0) listed_count = 0;
    __syncthreads();
    int listed_here = 0;
    for (int i = threadIdx.x; i < n_pow2; i += blockDim.x) {
        const bool valid = i < n_key_tiles;
        const bool listed = valid && (!use_mask || mask[row * n_key_tiles + i]);
        listed_here += listed;
        // A NaN score (NaN inputs, unchecked on the GPU) becomes -inf: every real tile then
        // sorts before the padding (ties go to the lower index), so index[t] < n_key_tiles
        // for every t < n_key_tiles and no write below can leave the row.
        const float s = listed ? row_scores[i] : 0.f;
        score[i] = listed && s == s ? s : __int_as_float(0xff800000);
        index[i] = !valid ? 0x7fffffff : listed ? i : i + kUnlisted;
    }
    if (use_mask && listed_here) atomicAdd(&listed_count, listed_here);
    __syncthreads();
    bitonic_sort(score, index, n_pow2);

    int n_keep = use_mask ? listed_count : keep;
    if (!use_mask && keep <= 0) {
        // TopP: the shortest prefix of the sorted tiles whose softmax mass reaches top_p.
        // Each thread owns a contiguous run; run sums are scanned across the block.
        const int per_thread = (n_pow2 + blockDim.x - 1) / blockDim.x;
        const int begin = threadIdx.x * per_thread;
        const float top = score[0];
        float local = 0.f;
        for (int i = begin; i < min(begin + per_thread, n_key_tiles); ++i)
            local += __expf(score[i] - top);
        partial[threadIdx.x] = local;
        __syncthreads();
        for (int offset = 1; offset < (int)blockDim.x; offset <<= 1) {  // inclusive scan
            const float add = threadIdx.x >= offset ? partial[threadIdx.x - offset] : 0.f;
            __syncthreads();
            partial[threadIdx.x] += add;
            __syncthreads();
        }
        const float total = partial[blockDim.x - 1];
        if (threadIdx.x == 0) kept_count = 0;
        __syncthreads();
        float running = partial[threadIdx.x] - local;  // exclusive prefix of this run
        int below = 0;
        for (int i = begin; i < min(begin + per_thread, n_key_tiles); ++i) {
            running += __expf(score[i] - top);
            below += running / total < top_p;
        }
        if (below) atomicAdd(&kept_count, below);
        __syncthreads();
        n_keep = min(kept_count + 1, n_key_tiles);
    }
    n_keep = min(min(n_keep, n_key_tiles), max_count);
    if (write_marginal) {
        unsigned char* row_marginal = marginal + row * n_key_tiles;
        for (int t = threadIdx.x; t < n_key_tiles; t += blockDim.x)
            row_marginal[index[t] & (kUnlisted - 1)] = t >= marginal_begin && t < marginal_end;
    }

    int* row_visit = visit + row * max_count;
    if (order == kNatural) {
        // Kept tiles in index order: flag them, then compact the flags with a block scan
        // (each thread a contiguous run), cheaper than a second sort.
        int* flag = reinterpret_cast<int*>(score);
        __syncthreads();
        for (int i = threadIdx.x; i < n_pow2; i += blockDim.x) flag[i] = 0;
        __syncthreads();
        for (int t = threadIdx.x; t < n_keep; t += blockDim.x) flag[index[t]] = 1;
        __syncthreads();
        const int per_thread = (n_pow2 + blockDim.x - 1) / blockDim.x;
        const int begin = threadIdx.x * per_thread, end = min(begin + per_thread, n_key_tiles);
        int local = 0;
        for (int i = begin; i < end; ++i) local += flag[i];
        int* running = reinterpret_cast<int*>(partial);
        running[threadIdx.x] = local;
        __syncthreads();
        for (int offset = 1; offset < (int)blockDim.x; offset <<= 1) {  // inclusive scan
            const int add = threadIdx.x >= offset ? running[threadIdx.x - offset] : 0;
            __syncthreads();
            running[threadIdx.x] += add;
            __syncthreads();
        }
        int position = running[threadIdx.x] - local;
        for (int i = begin; i < end; ++i)
            if (flag[i]) row_visit[position++] = i;
        for (int t = n_keep + threadIdx.x; t < max_count; t += blockDim.x) row_visit[t] = -1;
    } else {
        const int first = order == kPeak ? min(peak, n_keep) : n_keep;
        for (int t = threadIdx.x; t < max_count; t += blockDim.x) {
            int tile = -1;
            if (t < first) tile = index[t];
            else if (t < n_keep) tile = index[n_keep - 1 - (t - first)];  // rest: ascending score
            row_visit[t] = tile;
        }
    }
    if (threadIdx.x == 0) count[row] = n_keep;
}

}  // namespace psa
