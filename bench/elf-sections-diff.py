#!/usr/bin/env python3
"""Prints the names of the sections whose bytes differ between two ELF objects.

usage: bench/elf-sections-diff.py A.o B.o

compare-projects.sh uses it to say where an object dcache produced differs from plain
gcc's (code, data, or only debug information). Sections are matched by name; one present
in only one file counts as differing. Only the ELF64 little-endian objects gcc writes on
x86-64 are read; anything else prints "not ELF64".
"""
import struct
import sys


def sections(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, kind, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, kind, offset, size))
    _, _, stroff, strsize = headers[shstrndx]
    strtab = data[stroff:stroff + strsize]
    out = {}
    for name, kind, offset, size in headers[1:]:
        label = strtab[name:strtab.index(b"\0", name)].decode(errors="replace")
        # SHT_NOBITS (.bss) has a size but no bytes in the file.
        body = b"" if kind == 8 else data[offset:offset + size]
        out[label] = out.get(label, b"") + body + size.to_bytes(8, "little")
    return out


def main():
    a, b = sections(sys.argv[1]), sections(sys.argv[2])
    if a is None or b is None:
        print("not ELF64")
        return
    print(" ".join(sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))))


main()
