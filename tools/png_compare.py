#!/usr/bin/env python3
"""Compares two 8-bit PNG images pixel by pixel with only the standard library.

Usage: png_compare.py A.png B.png MIN_DB
Prints "identical" or the PSNR and the largest difference; exits 1 when the images
differ in size or their PSNR is below MIN_DB.

Why: a capped run decodes in bands whose Winograd convolution tiles fall differently
than the whole decode's, so its image equals the uncapped one to f32 rounding, which
can flip the last bit of a few pixels; CI checks it is that close without Pillow.
"""
import math
import struct
import sys
import zlib


def read_png(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        sys.exit(f"{path}: only 8-bit, non-interlaced grey/RGB(A) PNGs")
    raw, stride, bpp = zlib.decompress(idat), w * channels, channels
    out, prev = bytearray(), bytearray(stride)
    for y in range(h):
        f, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                row[i] = (row[i] + a) & 255
            elif f == 2:
                row[i] = (row[i] + b) & 255
            elif f == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += row
        prev = row
    return (w, h, channels), out


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    (sa, a), (sb, b) = read_png(sys.argv[1]), read_png(sys.argv[2])
    if sa != sb:
        print(f"sizes differ: {sa} and {sb}")
        sys.exit(1)
    if a == b:
        print("identical")
        return
    se = sum((x - y) ** 2 for x, y in zip(a, b))
    db = 10 * math.log10(255 * 255 * len(a) / se)
    worst = max(abs(x - y) for x, y in zip(a, b))
    print(f"{db:.1f} dB, largest difference {worst}")
    sys.exit(0 if db >= float(sys.argv[3]) else 1)


main()
