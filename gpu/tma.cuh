// TMA bulk tensor copies (sm_90): global -> shared through a host-encoded tensor map.
//
// The host encodes one rank-4 map per input (pysparse_attn/backends/cupy.py,
// `_tensor_map`): dims (D, N, H, B) with the tensor's real strides, a box of 64 elements by
// `rows` rows, 128-byte swizzle. Each copy fills one 64-column panel of a tile in exactly the
// layout WarpgroupTileTraits::tile_offset describes (the SW128 pattern wgmma reads) and
// zero-fills rows past N, so partial tiles need no masking of the loads.
#pragma once

namespace psa {

// The 128 opaque bytes of a CUtensorMap, as the kernel receives them (by value, inside a
// __grid_constant__ parameter, so that the copy instruction may read them in place).
struct alignas(64) TensorMap {
    unsigned long long words[16];
};

__device__ __forceinline__ void tensor_map_prefetch(const TensorMap& map) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(reinterpret_cast<unsigned long long>(&map))
                 : "memory");
}

// Copy the box at (column, row, head, batch) into shared `destination` (1024-byte aligned);
// its bytes complete on `barrier`, whose expected byte count the caller announced.
__device__ __forceinline__ void tma_load_4d(unsigned destination, const TensorMap& map,
                                            unsigned barrier, int column, int row, int head,
                                            int batch) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
        :: "r"(destination), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(column),
           "r"(row), "r"(head), "r"(batch), "r"(barrier)
        : "memory");
}

// Bulk (non-tensor) reduction shared -> global: `bytes` (a multiple of 16, both addresses
// 16-byte aligned) of float32 added element-wise into global memory by the TMA unit, tracked by
// the issuing thread's bulk async-group. The source must have been made visible to the async
// proxy (fence.proxy.async.shared::cta) by the threads that wrote it.
__device__ __forceinline__ void bulk_reduce_add_f32(float* destination, unsigned source,
                                                    unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 :: "l"(destination), "r"(source), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bulk_commit_group() {
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Until at most PENDING of this thread's bulk groups still read their shared-memory source.
template <int PENDING>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(PENDING) : "memory");
}

// Until at most PENDING of this thread's bulk groups are incomplete (their writes performed).
template <int PENDING>
__device__ __forceinline__ void bulk_wait_group() {
    asm volatile("cp.async.bulk.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

}  // namespace psa
