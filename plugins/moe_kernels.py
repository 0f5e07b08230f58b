"""The four Triton kernels of the routed experts (align, gate_up, down, combine); see plugins/moe_launch.py.

Each kernel takes its tensor inputs, then int32 scalars, then its tensor outputs (TensorRT's AOT argument order),
then constexprs. Tensors are contiguous, so strides follow from the constexpr sizes. Every kernel stays inside its
buffers whatever values its inputs hold (TensorRT's autotuner times each stage on arbitrary data): align drops ids
outside [0, E); the GEMMs clamp num_padded, skip blocks whose expert is outside [0, E) and take a slot as real only
if 0 <= slot < T*k (`expert_block`, `tile_rows`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def moe_align_kernel(
    topk_ids_ptr,  # [num_slots] int32
    num_slots,  # T * k
    max_blocks,  # blocks of BLOCK_M rows the outputs have room for
    sorted_slots_ptr,  # [max_blocks * BLOCK_M] int32: slot of each row, num_slots on padding rows
    block_experts_ptr,  # [max_blocks] int32: expert of each block, -1 past the blocks in use
    num_padded_ptr,  # [1] int32: rows in use
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCKS_CHUNK: tl.constexpr,
):
    # One program sorts every slot by expert, stably, into BLOCK_M-padded segments (vLLM's moe_align_block_size
    # as a single kernel). No atomics on the output: the order is deterministic. Ids must lie in [0, E): others
    # are left out here, so their expert_out rows would never be written.
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([EXPERTS_POW2], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        slots = start + lanes
        ids = tl.load(topk_ids_ptr + slots, mask=slots < num_slots, other=-1)
        counts += tl.histogram(ids, EXPERTS_POW2, mask=(slots < num_slots) & (ids >= 0) & (ids < NUM_EXPERTS))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)

    # Padding rows inside each expert's segment, then past the last segment: every row is written once.
    within = tl.arange(0, BLOCK_M)
    tl.store(
        sorted_slots_ptr + (starts + counts)[:, None] + within[None, :],
        tl.zeros([EXPERTS_POW2, BLOCK_M], dtype=tl.int32) + num_slots,
        mask=within[None, :] < (padded - counts)[:, None],
    )
    capacity = max_blocks * BLOCK_M
    for start in range(total, capacity, CHUNK):
        rows = start + lanes
        tl.store(sorted_slots_ptr + rows, tl.zeros([CHUNK], dtype=tl.int32) + num_slots, mask=rows < capacity)

    # A block's expert is the number of segments that end at or before its first row.
    blocks_lanes = tl.arange(0, BLOCKS_CHUNK)
    for start in range(0, max_blocks, BLOCKS_CHUNK):
        blocks = start + blocks_lanes
        first_row = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        tl.store(block_experts_ptr + blocks, tl.where(first_row < total, expert, -1), mask=blocks < max_blocks)

    # Stable scatter: a slot's row is its expert's cursor plus the earlier slots of this chunk with the same
    # expert ([CHUNK, CHUNK] compares: the cost does not grow with E).
    cursor = starts
    upcoming = tl.load(topk_ids_ptr + lanes, mask=lanes < num_slots, other=-1)
    for start in range(0, num_slots, CHUNK):
        slots = start + lanes
        ids = upcoming
        # Load the next chunk now so its latency overlaps this chunk's work.
        upcoming = tl.load(topk_ids_ptr + slots + CHUNK, mask=slots + CHUNK < num_slots, other=-1)
        keep = (slots < num_slots) & (ids >= 0) & (ids < NUM_EXPERTS)
        earlier_same = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
        rank = tl.sum(earlier_same.to(tl.int32), axis=1)
        expert = tl.where(keep, ids, 0)
        tl.store(sorted_slots_ptr + tl.gather(cursor, expert, 0) + rank, slots, mask=keep)
        cursor += tl.histogram(expert, EXPERTS_POW2, mask=keep)


@triton.jit
def grouped_tile(n_tiles: tl.constexpr, GROUP_M: tl.constexpr):
    """(block, N tile) of this program. GROUP_M neighbouring blocks (mostly one expert's) run next to each other,
    so each weight tile is fetched from HBM about once and then hit in L2."""
    pid = tl.program_id(0)
    group = GROUP_M * n_tiles
    first_m = pid // group * GROUP_M
    group_rows = tl.minimum(tl.num_programs(0) // n_tiles - first_m, GROUP_M)
    return first_m + (pid % group) % group_rows, (pid % group) // group_rows


@triton.jit
def expert_block(block_experts_ptr, num_padded_ptr, n_tiles: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                 ALIGN_M: tl.constexpr, GROUP_M: tl.constexpr):
    """(block, N tile, expert, whether to skip) of this GEMM program: one block of align's layout, ALIGN_M rows of
    one expert.

    Safe for ANY values in the alignment buffers (TensorRT's autotuner runs each stage on its own, on arbitrary
    inputs): num_padded is clamped to the rows the grid covers, and a block whose expert lies outside [0, E) is
    skipped; only blocks inside the grid (and so inside the buffers) are read.
    """
    block, pid_n = grouped_tile(n_tiles, GROUP_M)
    covered = tl.num_programs(0) // n_tiles * ALIGN_M
    num_padded = tl.minimum(tl.load(num_padded_ptr), covered)
    expert = tl.load(block_experts_ptr + block)
    skip = (block * ALIGN_M >= num_padded) | (expert < 0) | (expert >= NUM_EXPERTS)
    return block, pid_n, expert.to(tl.int64), skip


@triton.jit
def tile_rows(sorted_slots_ptr, block, sub, num_slots, ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr):
    """(rows, slots, real) of the sub-th tile of BLOCK_M rows in `block`: a slot is real only if 0 <= slot <
    num_slots (padding holds num_slots; anything else is garbage), and non-real slots read as 0."""
    rows = block * ALIGN_M + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    real = (slots >= 0) & (slots < num_slots)
    return rows, tl.where(real, slots, 0), real


@triton.jit
def gate_up_tile(hidden_ptr, w_gate_up_ptr, act_ptr, expert, rows, slots, real, pid_n,
                 HIDDEN: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST_DOT: tl.constexpr):
    tokens = (slots // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Columns past INTER wrap onto valid rows so the weight loads need no mask; the store drops them.
    x_ptrs = hidden_ptr + tokens[:, None] * HIDDEN + ks[None, :]
    gate_ptrs = w_gate_up_ptr + expert * (2 * INTER * HIDDEN) + (cols % INTER)[None, :] * HIDDEN + ks[:, None]
    up_ptrs = gate_ptrs + INTER * HIDDEN
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        if HIDDEN % BLOCK_K == 0:
            x = tl.load(x_ptrs, mask=real[:, None], other=0.0)
            w_gate = tl.load(gate_ptrs)
            w_up = tl.load(up_ptrs)
        else:
            inside = ks < HIDDEN - k0
            x = tl.load(x_ptrs, mask=real[:, None] & inside[None, :], other=0.0)
            w_gate = tl.load(gate_ptrs, mask=inside[:, None], other=0.0)
            w_up = tl.load(up_ptrs, mask=inside[:, None], other=0.0)
        x = x.to(act_ptr.dtype.element_ty)
        w_gate = w_gate.to(act_ptr.dtype.element_ty)
        w_up = w_up.to(act_ptr.dtype.element_ty)
        if UPCAST_DOT:
            gate = tl.dot(x.to(tl.float32), w_gate.to(tl.float32), gate, input_precision="ieee")
            up = tl.dot(x.to(tl.float32), w_up.to(tl.float32), up, input_precision="ieee")
        else:
            gate = tl.dot(x, w_gate, gate, input_precision=DOT_PRECISION)
            up = tl.dot(x, w_up, up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    act = gate * tl.sigmoid(gate) * up
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * INTER + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=(cols < INTER)[None, :])


@triton.jit
def moe_gate_up_kernel(
    hidden_ptr,  # [T, HIDDEN]
    w_gate_up_ptr,  # [E, 2 * INTER, HIDDEN]: gate rows then up rows
    sorted_slots_ptr,
    block_experts_ptr,
    num_padded_ptr,
    num_slots,
    act_ptr,  # [max_blocks * ALIGN_M, INTER] in the compute dtype
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    ALIGN_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # act[row, n] = silu(x W_gate^T)[n] * (x W_up^T)[n] for the token behind each row of an expert block, in tiles
    # of BLOCK_M rows; when a block holds several tiles, one of padding rows only is skipped (its act rows are
    # never used).
    block, pid_n, expert, skip = expert_block(
        block_experts_ptr, num_padded_ptr, (INTER + BLOCK_N - 1) // BLOCK_N, NUM_EXPERTS, ALIGN_M, GROUP_M
    )
    if skip:
        return
    if ALIGN_M == BLOCK_M:  # one tile: a block in use always has real rows
        rows, slots, real = tile_rows(sorted_slots_ptr, block, 0, num_slots, ALIGN_M, BLOCK_M)
        gate_up_tile(hidden_ptr, w_gate_up_ptr, act_ptr, expert, rows, slots, real, pid_n, HIDDEN, INTER, TOP_K,
                     BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    else:
        for sub in range(ALIGN_M // BLOCK_M):
            rows, slots, real = tile_rows(sorted_slots_ptr, block, sub, num_slots, ALIGN_M, BLOCK_M)
            if tl.sum(real.to(tl.int32), axis=0) > 0:
                gate_up_tile(hidden_ptr, w_gate_up_ptr, act_ptr, expert, rows, slots, real, pid_n, HIDDEN, INTER,
                             TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def down_tile(act_ptr, w_down_ptr, topk_weights_ptr, expert_out_ptr, expert, rows, slots, real, pid_n,
              HIDDEN: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # No row mask on act: its padding rows may hold anything (gate_up skips tiles of padding only), a row of the
    # product depends on its own row of act alone, and padding rows are never stored.
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * INTER + ks[None, :]
    w_ptrs = w_down_ptr + expert * (HIDDEN * INTER) + (cols % HIDDEN)[None, :] * INTER + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        if INTER % BLOCK_K == 0:
            a = tl.load(act_ptrs)
            w = tl.load(w_ptrs)
        else:
            inside = ks < INTER - k0
            a = tl.load(act_ptrs, mask=inside[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=inside[:, None], other=0.0)
        w = w.to(act_ptr.dtype.element_ty)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        act_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(topk_weights_ptr + slots, mask=real, other=0.0)[:, None]
    out_ptrs = expert_out_ptr + slots.to(tl.int64)[:, None] * HIDDEN + cols[None, :]
    tl.store(out_ptrs, acc.to(expert_out_ptr.dtype.element_ty), mask=real[:, None] & (cols < HIDDEN)[None, :])


@triton.jit
def moe_down_kernel(
    act_ptr,  # [max_blocks * ALIGN_M, INTER]
    w_down_ptr,  # [E, HIDDEN, INTER]
    topk_weights_ptr,  # [num_slots] fp32: the routing weight of each slot
    sorted_slots_ptr,
    block_experts_ptr,
    num_padded_ptr,
    num_slots,
    expert_out_ptr,  # [num_slots, HIDDEN] in the compute dtype, row = slot, weighted
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    ALIGN_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # expert_out[slot] = w[slot] * act[row] W_down^T, weighted in fp32. Rows go back to their slot, so the combine
    # needs no atomics.
    block, pid_n, expert, skip = expert_block(
        block_experts_ptr, num_padded_ptr, (HIDDEN + BLOCK_N - 1) // BLOCK_N, NUM_EXPERTS, ALIGN_M, GROUP_M
    )
    if skip:
        return
    if ALIGN_M == BLOCK_M:
        rows, slots, real = tile_rows(sorted_slots_ptr, block, 0, num_slots, ALIGN_M, BLOCK_M)
        down_tile(act_ptr, w_down_ptr, topk_weights_ptr, expert_out_ptr, expert, rows, slots, real, pid_n,
                  HIDDEN, INTER, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    else:
        for sub in range(ALIGN_M // BLOCK_M):
            rows, slots, real = tile_rows(sorted_slots_ptr, block, sub, num_slots, ALIGN_M, BLOCK_M)
            if tl.sum(real.to(tl.int32), axis=0) > 0:
                down_tile(act_ptr, w_down_ptr, topk_weights_ptr, expert_out_ptr, expert, rows, slots, real, pid_n,
                          HIDDEN, INTER, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def moe_combine_kernel(
    expert_out_ptr,  # [T * TOP_K, HIDDEN], already weighted
    output_ptr,  # [T, HIDDEN]
    HIDDEN: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # output[t] = sum_j expert_out[t*k + j], in fp32 and a fixed order: repeatable, no atomics.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    inside = cols < HIDDEN
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(expert_out_ptr + (token * TOP_K + j) * HIDDEN + cols, mask=inside, other=0.0)
        total += row.to(tl.float32)
    tl.store(output_ptr + token * HIDDEN + cols, total.to(output_ptr.dtype.element_ty), mask=inside)


KERNELS = {
    kernel.__name__: kernel for kernel in (moe_align_kernel, moe_gate_up_kernel, moe_down_kernel, moe_combine_kernel)
}
