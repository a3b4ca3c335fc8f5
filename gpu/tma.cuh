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

}  // namespace psa
