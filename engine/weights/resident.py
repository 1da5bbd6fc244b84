"""Quantized weights read from the file into anonymous memory backed by huge pages.

Decode streams every weight byte once per token, so how the bytes are mapped matters. Viewed
in the file's mapping they sit in 4 KiB page-cache pages: one TLB miss per 4 KiB, and the
hardware prefetchers stop at every page boundary. Read once into 2 MiB transparent huge pages
the same kernels stream them faster (BENCHMARKS.md, "Where the weights live", has the figures
and the CPU they were measured on). The bytes are read with pread, never through a mapping, so the file's page cache
does not count in the process's resident set: the weights are resident once, in the arena.
Where the kernel has no transparent huge pages the arena is plain anonymous memory.
"""
from __future__ import annotations

import ctypes
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64                 # every tensor starts on a cache line
CHUNK = 64 << 20           # arena grows by this much (or by one tensor, if larger)


class TruncatedRead(OSError):
    """The file ended before the bytes asked for."""


class ResidentArena:
    """Bump allocator over anonymous huge-page chunks; `read` copies file bytes into it."""

    def __init__(self) -> None:
        self._chunk: mmap.mmap | None = None
        self._start = self._used = self._size = 0
        self.nbytes = 0          # bytes handed out

    def _grow(self, nbytes: int) -> None:
        size = max(CHUNK, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
        # One extra huge page so that the usable range can start on a 2 MiB boundary.
        chunk = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(chunk)
        self._start = -ctypes.addressof(anchor) % HUGE_PAGE
        del anchor               # an exported buffer would pin the mapping
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                chunk.madvise(advice, self._start, size)
            except OSError:
                pass             # no transparent huge pages here: 4 KiB pages still work
        self._chunk, self._used, self._size = chunk, 0, size

    def take(self, nbytes: int) -> tuple[mmap.mmap, int]:
        """(chunk, offset) of `nbytes` fresh bytes, 64-byte aligned."""
        if self._chunk is None or self._used + nbytes > self._size:
            self._grow(nbytes)
        offset = self._start + self._used
        self._used += -(-nbytes // ALIGN) * ALIGN
        self.nbytes += nbytes
        return self._chunk, offset

    def read(self, fd: int, file_offset: int, nbytes: int) -> torch.Tensor:
        """The file's bytes [file_offset, file_offset + nbytes) as a uint8 tensor in the arena."""
        chunk, offset = self.take(nbytes)
        with memoryview(chunk) as whole:       # released even when a read fails
            view = whole[offset:offset + nbytes]
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], file_offset + done)
                if got == 0:
                    raise TruncatedRead(f"file ends {nbytes - done} bytes short of a tensor at offset {file_offset}")
                done += got
            view.release()
        return torch.frombuffer(chunk, dtype=torch.uint8, count=nbytes, offset=offset)
