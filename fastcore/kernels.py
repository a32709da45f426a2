"""numba kernels of the assembler: place module rows onto images, raw or converted.

A module's placement is a row plan (``geometry.row_plan``): one line per module row and
destination row, holding the row's pieces (one per chip when chip gaps are inserted).
Lines run in parallel (numba threads).

Both kernels place a batch of frames of one module at once. Frames and images are reached
as rows of 2-D arrays (``FrameBuffer.pixel_rows`` / ``ImageBuffer.pixel_rows``, or a single
frame and image reshaped to one row each), described by a ``Rows`` triple
``(rows, offset, width)``: frame ``k`` of the batch is row ``rows[k]``, its pixels start at
column ``offset`` and hold ``width`` pixels per module (image) row. Batching matters for
the conversion: a line's calibration is read from memory once per batch, not per frame.

Pieces are handled through 1-D contiguous views indexed from 0, which keeps numba free of
negative-index checks and lets the loops compile to vector code.
"""

from __future__ import annotations

import os
import platform

# numba's OpenMP workers otherwise spin between parallel regions: measured with
# bench_end_to_end, the assembler's CPU per image at 250 Hz fell from 3.7 to 0.8 ms
# (docs/benchmarks.md). Set before OpenMP loads; an operator's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # after the OpenMP setting
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# x86-64: a run that place_rows does not stream whole is copied with ``rep movsb``. glibc's
# memcpy copies a 2 KiB module row with vector stores here (its rep movsb threshold is above
# that); placing a Jungfrau module row by row took 0.21-0.23 ms per MiB through memcpy and
# 0.11-0.12 with rep movsb (the same with GLIBC_TUNABLES lowering the threshold), one
# contiguous 1 MiB copy 0.07-0.09.
_X86_64 = platform.machine() in ("x86_64", "AMD64")
if _X86_64:
    llvm.initialize_native_asmparser()  # numba leaves it out; inline asm needs it


@intrinsic
def _copy_run(typingctx, dst, d0, src, s0, n):  # pragma: no cover - compiled
    """``dst[d0:d0 + n] = src[s0:s0 + n]`` for 1-D contiguous arrays of one dtype that do
    not overlap, bounds already checked by the caller (numba's slice assignment copies
    element by element)."""
    if dst.dtype != src.dtype:
        return None

    def codegen(context, builder, sig, args):
        dst_type, _, src_type, _, _ = sig.args
        dst_data = context.make_array(dst_type)(context, builder, args[0]).data
        src_data = context.make_array(src_type)(context, builder, args[2]).data
        itemsize = context.get_abi_sizeof(context.get_data_type(dst_type.dtype))
        to = builder.gep(dst_data, [args[1]])
        start = builder.gep(src_data, [args[3]])
        if not _X86_64:
            cgutils.raw_memcpy(builder, to, start, args[4], itemsize)
            return context.get_dummy_value()
        byte_ptr = ir.IntType(8).as_pointer()
        nbytes = builder.mul(args[4], ir.Constant(args[4].type, itemsize))
        out = ir.LiteralStructType([byte_ptr, byte_ptr, nbytes.type])
        rep_movsb = ir.InlineAsm(
            ir.FunctionType(out, [byte_ptr, byte_ptr, nbytes.type]), "rep movsb",
            "={di},={si},={cx},0,1,2,~{memory},~{dirflag},~{fpsr},~{flags}",
            side_effect=True)
        builder.call(rep_movsb, [builder.bitcast(to, byte_ptr),
                                 builder.bitcast(start, byte_ptr), nbytes])
        return context.get_dummy_value()

    return types.void(dst, d0, src, s0, n), codegen


LINE_BYTES = 64
"""Cache line: a streamed run writes whole aligned lines of this size."""

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_LINE = ir.VectorType(_I8, LINE_BYTES)
_LANES = ir.Constant(_LINE, list(range(LINE_BYTES)))


def _lanes_below(builder: ir.IRBuilder, limit: ir.Value) -> ir.Value:
    """Mask of the line's byte lanes below ``limit`` (an i64 clamped to 0..LINE_BYTES)."""
    limit = builder.select(builder.icmp_signed("<", limit, _I64(0)), _I64(0), limit)
    limit = builder.select(builder.icmp_signed(">", limit, _I64(LINE_BYTES)),
                           _I64(LINE_BYTES), limit)
    splat = builder.insert_element(ir.Constant(_LINE, ir.Undefined),
                                   builder.trunc(limit, _I8), _I32(0))
    splat = builder.shuffle_vector(splat, ir.Constant(_LINE, ir.Undefined),
                                   ir.Constant(ir.VectorType(_I32, LINE_BYTES), [0] * LINE_BYTES))
    return builder.icmp_unsigned("<", _LANES, splat)


@intrinsic
def _stream_line(typingctx, dst, d0, src, s0, n, pieces, pitch):  # pragma: no cover
    """Copy ``pieces`` source pieces of ``n`` items from ``src[s0:]`` (one after another)
    to ``dst[d0 + i * pitch:]`` and zero the gaps between them, writing every whole cache
    line of the destination with a non-temporal store (no read of the line first, as a
    large memcpy does); the partial lines at both ends are copied with memcpy. Only for
    lines :func:`streams_whole` accepts; bounds already checked by the caller. A
    :func:`_store_fence` must follow before another process reads the image."""
    if dst.dtype != src.dtype:
        return None

    def codegen(context, builder, sig, args):
        dst_type, src_type = sig.args[0], sig.args[2]
        _, d_first, _, s_first, n_items, n_pieces, pitch_items = args
        itemsize = _I64(context.get_abi_sizeof(context.get_data_type(dst_type.dtype)))
        byte_ptr = _I8.as_pointer()
        to = builder.bitcast(builder.gep(
            context.make_array(dst_type)(context, builder, args[0]).data, [d_first]), byte_ptr)
        start = builder.bitcast(builder.gep(
            context.make_array(src_type)(context, builder, args[2]).data, [s_first]),
            byte_ptr)
        n_bytes = builder.mul(n_items, itemsize)
        pitch_bytes = builder.select(builder.icmp_signed(">", n_pieces, _I64(1)),
                                     builder.mul(pitch_items, itemsize), n_bytes)
        total = builder.add(builder.mul(builder.sub(n_pieces, _I64(1)), pitch_bytes), n_bytes)
        head = builder.and_(builder.sub(_I64(0), builder.ptrtoint(to, _I64)),
                            _I64(LINE_BYTES - 1))
        n_lines = builder.udiv(builder.sub(total, head), _I64(LINE_BYTES))
        tail = builder.sub(builder.sub(total, head), builder.mul(n_lines, _I64(LINE_BYTES)))
        # ends: inside the first and the last piece (streams_whole)
        cgutils.raw_memcpy(builder, to, start, head, 1)
        last_end = builder.add(builder.mul(builder.sub(n_pieces, _I64(1)), n_bytes), n_bytes)
        cgutils.raw_memcpy(builder, builder.gep(to, [builder.sub(total, tail)]),
                           builder.gep(start, [builder.sub(last_end, tail)]), tail, 1)
        nontemporal = builder.module.add_metadata([_I32(1)])
        line_ptr = _LINE.as_pointer()
        with cgutils.for_range(builder, n_lines) as loop:
            offset = builder.add(head, builder.mul(loop.index, _I64(LINE_BYTES)))
            piece = builder.udiv(offset, pitch_bytes)
            within = builder.sub(offset, builder.mul(piece, pitch_bytes))
            first = builder.load(builder.bitcast(builder.gep(start, [builder.add(
                builder.mul(piece, n_bytes), within)]), line_ptr), align=1)
            crosses = builder.icmp_signed(">", builder.add(within, _I64(LINE_BYTES)), n_bytes)
            with builder.if_else(crosses) as (gap, inside):
                with gap:  # the line holds a piece's end, a gap and the next piece's start
                    after = builder.load(builder.bitcast(builder.gep(start, [builder.sub(
                        builder.add(builder.mul(builder.add(piece, _I64(1)), n_bytes), within),
                        pitch_bytes)]), line_ptr), align=1)
                    zero = ir.Constant(_LINE, [0] * LINE_BYTES)
                    tail_part = builder.select(
                        _lanes_below(builder, builder.sub(pitch_bytes, within)), zero, after)
                    joined = builder.select(_lanes_below(builder, builder.sub(n_bytes, within)),
                                            first, tail_part)
                    block_gap = builder.block
                with inside:
                    block_inside = builder.block
            value = builder.phi(_LINE)
            value.add_incoming(joined, block_gap)
            value.add_incoming(first, block_inside)
            store = builder.store(value, builder.bitcast(builder.gep(to, [offset]), line_ptr),
                                  align=LINE_BYTES)
            store.set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return types.void(dst, d0, src, s0, n, pieces, pitch), codegen


@intrinsic
def _store_fence(typingctx):  # pragma: no cover - compiled
    """Make this thread's non-temporal stores visible to every reader (sfence on x86)."""
    def codegen(context, builder, sig, args):
        if _X86_64:
            sfence = builder.module.declare_intrinsic(
                "llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(inline="always")
def _plan_line(plan, k):  # pragma: no cover - compiled
    """Line ``k`` of a row plan as a tuple of geometry.ROW_PLAN_FIELDS."""
    return (plan[k, 0], plan[k, 1], plan[k, 2], plan[k, 3], plan[k, 4], plan[k, 5],
            plan[k, 6], plan[k, 7])


@numba.njit(inline="always")
def streams_whole(n, pieces, pitch, itemsize):  # pragma: no cover - compiled
    """Whether :func:`_stream_line` may copy a plan line (``n``, ``pieces``, ``pitch`` in
    items of ``itemsize`` bytes): its line-wide loads then stay inside the line's source
    pieces, and its partial end lines inside the first and the last piece."""
    n_bytes = n * itemsize
    gap = (pitch - n) * itemsize if pieces > 1 else 0
    total = ((pieces - 1) * pitch + n) * itemsize if pieces > 1 else n_bytes
    return total >= 2 * LINE_BYTES and (gap == 0 or (
        n_bytes >= 2 * LINE_BYTES and 0 < gap <= LINE_BYTES))


PLACE_CHUNKS = 32
"""place_rows shares a plan among its threads in this many chunks, each ended by a store
fence (a constant: numba.get_num_threads inside the kernel would stop numba caching it)."""


@numba.njit(parallel=True, nogil=True, cache=True)
def place_rows(src, src_rows, src_offset, src_width, dst, dst_rows, dst_offset, dst_width,
               plan):  # pragma: no cover - compiled
    """Copy every plan line of each frame of the batch onto its image. A line's pieces
    are addressed from the start of its frame and image row, so a line of a coalesced
    plan (``geometry.coalesce_plan``) may run over several module rows. Lines whose
    pieces are close together are streamed whole (gap pixels written as zero, as the
    ImageBuffer holds them); the others go piece by piece. The lines are shared among
    the threads in chunks, each ended by a store fence."""
    n_lines = plan.shape[0]
    n_chunks = min(n_lines, PLACE_CHUNKS)
    itemsize = dst.itemsize
    for c in numba.prange(n_chunks):
        for k in range(c * n_lines // n_chunks, (c + 1) * n_lines // n_chunks):
            sr, sc, dr, dc, n, step, pieces, pitch = _plan_line(plan, k)
            s_first = src_offset + sr * src_width + sc
            d_first = dst_offset + dr * dst_width + dc
            streams = step == 1 and streams_whole(n, pieces, pitch, itemsize)
            for f in range(src_rows.shape[0]):
                line = src[src_rows[f]]
                out = dst[dst_rows[f]]
                if streams:
                    _stream_line(out, d_first, line, s_first, n, pieces, pitch)
                    continue
                for i in range(pieces):
                    s0, d0 = s_first + i * n, d_first + i * pitch
                    if step == 1:
                        _copy_run(out, d0, line, s0, n)
                    else:
                        out[d0 - n + 1:d0 + 1] = line[s0:s0 + n][::-1]
        _store_fence()


@numba.njit(inline="always")
def _convert_piece(pixels, p0, i0, p1, i1, p2, i2, out):  # pragma: no cover - compiled
    """Convert one piece: a vector pass as gain stage 0, then, only if a pixel of the piece
    is in stage 1 or 2, a branch-free vector pass selecting stage 1 or 2 (``p``: pedestals,
    ``i``: 1/gain of stages 0, 1, 2)."""
    bits = 0
    for j in range(pixels.shape[0]):
        value = pixels[j]
        bits |= value
        out[j] = (np.float32(value & 0x3FFF) - p0[j]) * i0[j]
    if bits < 0x4000:
        return
    for j in range(pixels.shape[0]):
        value = pixels[j]
        code = value >> 14
        a1, a2, b1, b2 = p1[j], p2[j], i1[j], i2[j]  # unconditional loads: vectorisable
        pedestal = a1 if code == 1 else a2
        factor = b1 if code == 1 else b2
        converted = (np.float32(value & 0x3FFF) - pedestal) * factor
        out[j] = out[j] if code == 0 else converted


@numba.njit(inline="always")
def _calibration_piece(calibration, row, s0, n):  # pragma: no cover - compiled
    """Pedestal and 1/gain of gain stages 0, 1, 2 (in _convert_piece's order) of ``n``
    pixels of module row ``row`` from column ``s0``."""
    return (calibration[0, 0, row, s0:s0 + n], calibration[1, 0, row, s0:s0 + n],
            calibration[0, 1, row, s0:s0 + n], calibration[1, 1, row, s0:s0 + n],
            calibration[0, 2, row, s0:s0 + n], calibration[1, 2, row, s0:s0 + n])


@numba.njit(parallel=True, nogil=True, cache=True)
def convert_rows(src, src_rows, src_offset, src_width, calibration, dst, dst_rows, dst_offset,
                 dst_width, plan):  # pragma: no cover - compiled
    """Jungfrau conversion while placing: ``(adc - pedestal[stage]) * (1/gain[stage])``.

    ``calibration`` is (2, 3, rows, cols) float32: pedestal and 1/gain of gain stages 0, 1,
    2 (gain bits 00, 01, 11; the invalid 10 counts as 2) in module coordinates. A line
    that place_rows would stream whole is converted into a row of its pieces and streamed
    the same way (gaps zero, the image lines not read first); the others are converted in
    place piece by piece.
    """
    n_lines = plan.shape[0]
    n_chunks = min(n_lines, PLACE_CHUNKS)
    itemsize = dst.itemsize
    widest = 0  # pixels of the longest line streamed whole
    for k in range(n_lines):
        if plan[k, 5] == 1 and streams_whole(plan[k, 4], plan[k, 6], plan[k, 7], itemsize):
            widest = max(widest, plan[k, 4] * plan[k, 6])
    for c in numba.prange(n_chunks):
        row = np.empty(widest, dst.dtype)  # a line's pieces, converted, before streaming
        for k in range(c * n_lines // n_chunks, (c + 1) * n_lines // n_chunks):
            sr, sc, dr, dc, n, step, pieces, pitch = _plan_line(plan, k)
            s_row = src_offset + sr * src_width
            d_row = dst_offset + dr * dst_width
            if step == 1 and streams_whole(n, pieces, pitch, itemsize):
                for f in range(src_rows.shape[0]):
                    for i in range(pieces):
                        s0 = sc + i * n
                        p0, i0, p1, i1, p2, i2 = _calibration_piece(calibration, sr, s0, n)
                        _convert_piece(src[src_rows[f], s_row + s0:s_row + s0 + n],
                                       p0, i0, p1, i1, p2, i2, row[i * n:(i + 1) * n])
                    _stream_line(dst[dst_rows[f]], d_row + dc, row, 0, n, pieces, pitch)
                continue
            for i in range(pieces):
                s0, d0 = sc + i * n, dc + i * pitch
                p0, i0, p1, i1, p2, i2 = _calibration_piece(calibration, sr, s0, n)
                for f in range(src_rows.shape[0]):
                    pixels = src[src_rows[f], s_row + s0:s_row + s0 + n]
                    out = dst[dst_rows[f], d_row:d_row + dst_width]
                    if step == 1:
                        _convert_piece(pixels, p0, i0, p1, i1, p2, i2, out[d0:d0 + n])
                    else:
                        _convert_piece(pixels, p0, i0, p1, i1, p2, i2,
                                       out[d0 - n + 1:d0 + 1][::-1])
        _store_fence()
