"""The sockmap redirect's pure encoding: eBPF instructions and bpf(2) attributes as bytes."""

from __future__ import annotations

import struct

from nopf_web.tunnel import sockmap as sm


def decode(prog: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per 8-byte instruction."""
    out = []
    for i in range(0, len(prog), 8):
        code, regs, off, imm = struct.unpack_from("<BBhi", prog, i)
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


def test_insn_layout_is_little_endian_with_register_nibbles() -> None:
    assert sm.insn(sm.MOV64_X, sm.R6, sm.R1) == bytes([0xBF, 0x16, 0, 0, 0, 0, 0, 0])
    # Negative offset and immediate: two's complement, little-endian.
    assert sm.insn(sm.STX_DW, sm.R10, sm.R0, -8) == bytes([0x7B, 0x0A, 0xF8, 0xFF, 0, 0, 0, 0])
    assert sm.insn(sm.ADD64_K, sm.R3, imm=-8) == bytes([0x07, 0x03, 0, 0, 0xF8, 0xFF, 0xFF, 0xFF])
    assert sm.insn(sm.CALL, imm=72) == bytes([0x85, 0, 0, 0, 72, 0, 0, 0])
    assert sm.insn(sm.EXIT) == bytes([0x95, 0, 0, 0, 0, 0, 0, 0])


def test_ld_map_fd_is_two_slots_marked_as_map_fd() -> None:
    raw = sm.ld_map_fd(sm.R2, 0x1234)
    assert len(raw) == 16
    assert raw[:8] == bytes([0x18, 0x12, 0, 0, 0x34, 0x12, 0, 0])  # src nibble 1: BPF_PSEUDO_MAP_FD
    assert raw[8:] == bytes(8)


def test_verdict_program_shape() -> None:
    prog = sm.verdict_program(targets_fd=11, counts_fd=12, modes_fd=13)
    assert len(prog) % 8 == 0
    insns = decode(prog)
    # Every map reference is an ld_imm64 with the right fd, into the register the helper reads.
    maps = [(dst, imm) for code, dst, src, _, imm in insns if code == sm.LD_IMM64 and src == 1]
    assert maps == [(sm.R1, 13), (sm.R1, 12), (sm.R2, 11)]
    calls = [imm for code, _, _, _, imm in insns if code == sm.CALL]
    assert calls == [sm.FN_GET_SOCKET_COOKIE, sm.FN_MAP_LOOKUP_ELEM, sm.FN_MAP_LOOKUP_ELEM,
                     sm.FN_SK_REDIRECT_HASH]
    assert insns[-1][0] == sm.EXIT
    # Redirect to egress: flags (r4) are 0 right before the redirect call.
    last_call = max(i for i, x in enumerate(insns) if x[0] == sm.CALL)
    assert insns[last_call - 1][:2] == (sm.MOV64_K, sm.R4) and insns[last_call - 1][4] == 0
    # The first thing checked is ctx->len: an empty skb (bare FIN) is dropped, not redirected.
    assert insns[1][:4] == (sm.LDX_W, sm.R2, sm.R6, sm.SKB_LEN)
    assert insns[3] == (sm.MOV64_K, sm.R0, 0, 0, sm.SK_DROP) and insns[4][0] == sm.EXIT


def test_verdict_program_jumps_land_on_instructions() -> None:
    insns = decode(sm.verdict_program(3, 4, 5))
    # Second halves of ld_imm64 are not instructions one may jump to.
    halves = {i + 1 for i, x in enumerate(insns) if x[0] == sm.LD_IMM64}
    for i, (code, _, _, off, _) in enumerate(insns):
        if code in (sm.JEQ_K, sm.JNE_K):
            target = i + 1 + off
            assert 0 <= target < len(insns) and target not in halves, (i, off)


def test_attributes_match_the_kernel_union_layout() -> None:
    assert sm.map_create_attr(sm.BPF_MAP_TYPE_SOCKHASH, 8, 4, 2) == struct.pack(
        "<5I", 18, 8, 4, 2, 0)
    load = sm.prog_load_attr(0x1000, 25, 0x2000, 0x3000, 4096)
    # prog_type @0, insn_cnt @4, insns @8, license @16, log_level @24, log_size @28,
    # log_buf @32 (union bpf_attr, BPF_PROG_LOAD).
    assert struct.unpack_from("<II", load, 0) == (sm.BPF_PROG_TYPE_SK_SKB, 25)
    assert struct.unpack_from("<QQ", load, 8) == (0x1000, 0x2000)
    assert struct.unpack_from("<IIQ", load, 24) == (1, 4096, 0x3000)
    assert struct.unpack_from("<II", sm.prog_load_attr(1, 2, 3), 24) == (0, 0)  # no log
    assert sm.prog_attach_attr(7, 9, sm.BPF_SK_SKB_STREAM_VERDICT) == struct.pack(
        "<4I", 7, 9, 5, 0)
    elem = sm.map_elem_attr(7, 0xAAAA, 0xBBBB, 0)
    assert len(elem) == 32
    assert struct.unpack("<IIQQQ", elem) == (7, 0, 0xAAAA, 0xBBBB, 0)


def test_tcp_bytes_reads_acked_and_received() -> None:
    info = bytearray(232)
    struct.pack_into("<QQ", info, 120, 1001, 5_000_000_001)
    assert sm.tcp_bytes(bytes(info)) == (1001, 5_000_000_001)
