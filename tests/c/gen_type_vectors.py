#!/usr/bin/env python3
"""Generate tests/c/type_vectors.h from real ggml (llama.cpp b11739).

The expected bytes come from ggml's own code, called through ctypes:
  * the x86 CPU backend's from_float   (ggml_get_type_traits_cpu(t)->from_float),
  * the reference quantizer            (ggml_get_type_traits(t)->from_float_ref),
  * dequantization                     (ggml_get_type_traits(t)->to_float),
  * f16 / bf16 rows                    (ggml_cpu_fp32_to_fp16 / ggml_cpu_fp32_to_bf16).

Usage:
  gen_type_vectors.py LIBDIR [--preload SHIM.so] > tests/c/type_vectors.h

LIBDIR holds libggml-base.so.0 and libggml-cpu.so.0 (e.g. the llama_cpp_py_sync 0.11739
package folder; that wheel's CPU backend reports AVX AVX2 F16C FMA BMI2).  On glibc < 2.38
use a copy patched as shared/ORACLE.md describes and pass its __isoc23_* shim with --preload.
The inputs are fixed below and written into the header, so the C test does not depend on
this script's random generator.
"""
import argparse
import ctypes
import struct
import sys

import numpy as np

TYPES = [("q4_0", 2, 18), ("q4_1", 3, 20), ("q5_0", 6, 22), ("q5_1", 7, 24),
         ("q8_0", 8, 34), ("iq4_nl", 20, 18)]


class TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


class TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


ROWFN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def f32(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def quant_inputs():
    """Blocks of 32 floats that reach the interesting branches of the quantizers."""
    rng = np.random.default_rng(20240611)
    blocks = []
    blocks.append(rng.standard_normal(32))                       # plain data
    b = np.array([(k % 8) + 0.5 for k in range(32)], dtype=np.float64)
    b[0] = 127.0                                                 # q8_0: id == 1, x.5 ties
    b[1::3] *= -1
    blocks.append(b)
    b = rng.standard_normal(32) * 0.01
    b[5] = -3.0                                                  # negative extreme, unique
    b[9] = 2.9
    b[12] = 0.0
    blocks.append(b)
    blocks.append(np.zeros(32))                                  # all zero (iq4_nl keeps L)
    blocks.append(np.full(32, 0.75))                             # max == min
    b = rng.standard_normal(32) * 1e5
    b[3] = -3e5                                                  # f16 scale / min overflow
    blocks.append(b)
    blocks.append(rng.standard_normal(32) * 1e-30)               # 1/d overflows to inf
    b = rng.standard_normal(32)
    b[0] = -7.0
    b[1] = 7.0                                                   # |max| tie: first one wins
    blocks.append(b)
    b = rng.standard_normal(32) * 1e-6                           # d is an f16 subnormal
    blocks.append(b)
    x = np.concatenate(blocks).astype(np.float32)
    return x


def conv_inputs():
    bits = [0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x7f800000, 0xff800000,
            0x7fc00000, 0xffc00000, 0x7f800001, 0x7fa00000, 0xffbfffff, 0x7f802000,
            0x477fe000, 0x477fefff, 0x477ff000, 0x477fffff, 0x47800000, 0x38800000,
            0x387fffff, 0x33800000, 0x33000000, 0x33000001, 0x337fffff, 0x00000001,
            0x007fffff, 0x00800000, 0x3f801000, 0x3f803000, 0x3f800fff, 0x3f801001,
            0x3f808000, 0x3f818000, 0x3f817fff, 0x3f808001, 0x7f7fffff, 0xff7fffff,
            0x38000000, 0x37ffffff, 0x3aaaaaab, 0x3dcccccd, 0x40490fdb, 0xc0490fdb,
            0x7f7f8000, 0x7f7f7fff, 0x3f7fffff, 0x3f7f8000, 0x3f7f7fff, 0x3f7fc000]
    rng = np.random.default_rng(7)
    while len(bits) < 64:
        bits.append(int(rng.integers(0, 2**32)))
    return np.array(bits, dtype=np.uint32)


def c_bytes(name, data):
    body = ",".join("0x%02x" % v for v in data)
    lines = [body[i:i + 100] for i in range(0, len(body), 100)]
    return "static const uint8_t %s[%d] = {\n    %s};\n" % (name, len(data), "\n    ".join(lines))


def c_words(name, ctype, fmt, data):
    items = [fmt % int(v) for v in data]
    lines = [", ".join(items[i:i + 8]) for i in range(0, len(items), 8)]
    return "static const %s %s[%d] = {\n    %s};\n" % (ctype, name, len(items),
                                                       ",\n    ".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("libdir")
    ap.add_argument("--preload", default=None)
    args = ap.parse_args()
    if args.preload:
        ctypes.CDLL(args.preload, mode=ctypes.RTLD_GLOBAL)
    base = ctypes.CDLL(args.libdir + "/libggml-base.so.0", mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(args.libdir + "/libggml-cpu.so.0", mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_cpu_init()
    base.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
    feats = [f for f in ("avx", "avx2", "f16c", "fma", "avx512")
             if getattr(cpu, "ggml_cpu_has_" + f)()]

    x = quant_inputs()
    n = x.size
    out = []
    out.append("/* type_vectors.h - generated by gen_type_vectors.py from ggml (llama.cpp b11739,\n"
               " * CPU backend features: %s).  Do not edit. */\n" % " ".join(feats))
    out.append("#define TV_N %d\n" % n)
    out.append(c_words("tv_input", "uint32_t", "0x%08xu", x.view(np.uint32)))
    entries = []
    for name, tid, bsize in TYPES:
        tt = base.ggml_get_type_traits(tid).contents
        tc = cpu.ggml_get_type_traits_cpu(tid).contents
        nbytes = n // 32 * bsize
        q_cpu = np.zeros(nbytes, np.uint8)
        q_ref = np.zeros(nbytes, np.uint8)
        ROWFN(tc.from_float)(x.ctypes.data, q_cpu.ctypes.data, n)
        ROWFN(tt.from_float_ref)(x.ctypes.data, q_ref.ctypes.data, n)
        deq = np.zeros(n, np.float32)
        ROWFN(tt.to_float)(q_cpu.ctypes.data, deq.ctypes.data, n)
        out.append(c_bytes("tv_%s_cpu" % name, q_cpu))
        out.append(c_bytes("tv_%s_ref" % name, q_ref))
        out.append(c_words("tv_%s_deq" % name, "uint32_t", "0x%08xu", deq.view(np.uint32)))
        entries.append("    {%d, \"%s\", %d, tv_%s_cpu, tv_%s_ref, tv_%s_deq},"
                       % (tid, name, nbytes, name, name, name))
    out.append("typedef struct tv_quant {\n    int32_t type;\n    const char *name;\n"
               "    uint32_t nbytes;\n    const uint8_t *cpu;\n    const uint8_t *ref;\n"
               "    const uint32_t *deq;\n} tv_quant;\n")
    out.append("static const tv_quant tv_quants[] = {\n%s\n};\n" % "\n".join(entries))

    c = conv_inputs()
    cf = c.view(np.float32)
    h = np.zeros(c.size, np.uint16)
    bf = np.zeros(c.size, np.uint16)
    cpu.ggml_cpu_fp32_to_fp16(ctypes.c_void_p(cf.ctypes.data), ctypes.c_void_p(h.ctypes.data),
                              ctypes.c_int64(c.size))
    cpu.ggml_cpu_fp32_to_bf16(ctypes.c_void_p(cf.ctypes.data), ctypes.c_void_p(bf.ctypes.data),
                              ctypes.c_int64(c.size))
    out.append("#define TV_NCONV %d\n" % c.size)
    out.append(c_words("tv_conv_input", "uint32_t", "0x%08xu", c))
    out.append(c_words("tv_conv_f16", "uint16_t", "0x%04x", h))
    out.append(c_words("tv_conv_bf16", "uint16_t", "0x%04x", bf))
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
