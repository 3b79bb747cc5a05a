"""Build-time only: turn the marked block of csrc/include/pymem.h into the cffi C source.

Usage: python tools/cffi_gen.py csrc/include/pymem.h out/_cffi.c
The block between "/* cffi:begin */" and "/* cffi:end */" is passed to ffi.cdef() unchanged,
so the header is the one source of truth for the C API.
"""
import sys

import cffi

BEGIN = "/* cffi:begin */"
END = "/* cffi:end */"


def cdef_block(text: str) -> str:
    begin = text.index(BEGIN) + len(BEGIN)
    return text[begin:text.index(END, begin)]


def main(header: str, out: str) -> None:
    with open(header, encoding="utf-8") as f:
        block = cdef_block(f.read())
    ffi = cffi.FFI()
    ffi.cdef(block)
    ffi.set_source("pymem._cffi", '#include "pymem.h"')
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
