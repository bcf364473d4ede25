//! Large allocations (activations of 32 MiB and more) mapped directly and kept for reuse
//! when freed.
//!
//! glibc serves every allocation above its largest mmap threshold (32 MiB) with a fresh
//! `mmap` and unmaps it on free, so each op whose output is that large paid the kernel for
//! zeroed pages: at 1024x1536 the VQGAN's outputs are 150-600 MB each, and page faults and
//! page clearing were ~15% of its time. So a freed block is kept, and the next large
//! allocation takes its pages: a block of its length (the sampling loop and the VQGAN's blocks
//! allocate the same sizes over and over), else part of a longer one or a shorter one extended
//! (a single image meets most sizes only once). A bounded store (see [`KEEP_BYTES`]): beyond it
//! the oldest blocks are unmapped.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Allocations of at least this many bytes are blocks (glibc's maximum mmap threshold: the
/// smaller ones stay in its heap, which reuses memory itself).
pub const LARGE: usize = 32 << 20;

/// Block lengths are rounded up to this, so that sizes a few elements apart share blocks.
const GRANULE: usize = 2 << 20;

/// The most freed bytes kept for reuse: this, or twice the most bytes of blocks in use at
/// once so far (weights converted at load count too), whichever is more. An allocation takes
/// kept pages first, so the store grows only by what it cannot serve; the cap decides how
/// much of a peak's memory stays held after it. With a cap of twice the largest block, the VQGAN at 1024x1536
/// unmapped 12.8 GiB of blocks in two decodes and faulted them in again; at the peak in use
/// (~2.6 GB) still 1.7 GiB, because splitting and extending leaves the kept bytes in pieces;
/// at twice the peak none, with the same peak RSS (3.8 GiB).
const KEEP_BYTES: usize = 512 << 20;

/// The most freed blocks kept for reuse.
const KEEP_BLOCKS: usize = 32;

/// A freed block: its address and length (0 for an empty slot), and when it was freed.
#[derive(Clone, Copy)]
struct Free {
    addr: usize,
    len: usize,
    freed: u64,
}

const EMPTY: Free = Free {
    addr: 0,
    len: 0,
    freed: 0,
};

impl Free {
    /// What is left of the block once its first `len` bytes are taken.
    fn after(self, len: usize) -> Free {
        match self.len - len {
            0 => EMPTY,
            rest => Free {
                addr: self.addr + len,
                len: rest,
                ..self
            },
        }
    }
}

struct Kept {
    blocks: [Free; KEEP_BLOCKS],
    bytes: usize,
    /// Bytes of blocks in use, and the most so far.
    live: usize,
    peak_live: usize,
    /// Counts frees, to find the oldest block.
    clock: u64,
}

/// A fixed array: the allocator must not allocate.
static KEPT: Mutex<Kept> = Mutex::new(Kept::new());

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The allocator for blocks; alignments above a page go to the system allocator.
pub struct Blocks;

fn block_len(size: usize) -> usize {
    size.next_multiple_of(GRANULE)
}

fn served(layout: &Layout) -> bool {
    layout.align() <= 4096
}

impl Kept {
    const fn new() -> Self {
        Kept {
            blocks: [EMPTY; KEEP_BLOCKS],
            bytes: 0,
            live: 0,
            peak_live: 0,
            clock: 0,
        }
    }

    /// Counts `len` more bytes in use, and returns a kept block for them, taken out of the
    /// store: one of exactly that length; else the front of the shortest longer one, whose
    /// rest stays kept; else the longest one, extended with `mremap`. Any kept block's pages
    /// are already faulted in, which a fresh mapping's are not, and a single image meets most
    /// of its sizes only once. (Moving further blocks' pages into the extension would save
    /// more faults, but leaves a block spanning several kernel mappings, which `mremap` then
    /// refuses to extend.)
    fn take(&mut self, len: usize) -> Option<*mut u8> {
        self.live += len;
        self.peak_live = self.peak_live.max(self.live);
        let slot = self
            .blocks
            .iter_mut()
            .filter(|b| b.len != 0)
            .min_by_key(|b| match b.len.cmp(&len) {
                std::cmp::Ordering::Equal => (0, 0),
                std::cmp::Ordering::Greater => (1, b.len),
                std::cmp::Ordering::Less => (2, usize::MAX - b.len),
            })?;
        let first = *slot;
        if first.len >= len {
            *slot = first.after(len);
            self.bytes -= len;
            return Some(first.addr as *mut u8);
        }
        // SAFETY: the block is a mapping that nothing refers to; `mremap` extends it (moving it
        // and its pages if need be) with pages not yet faulted in, or fails and leaves it as it was.
        let grown = unsafe { libc::mremap(first.addr as *mut libc::c_void, first.len, len, libc::MREMAP_MAYMOVE) };
        if grown == libc::MAP_FAILED {
            return None;
        }
        *slot = EMPTY;
        self.bytes -= first.len;
        Some(grown.cast())
    }

    /// Counts `len` bytes in use that `take` counted but could not serve (a fresh mapping
    /// failed).
    fn not_mapped(&mut self, len: usize) {
        self.live -= len;
    }

    /// Keeps the block for reuse; returns the oldest ones beyond the limits, for the caller
    /// to unmap once the lock is released.
    fn keep(&mut self, addr: usize, len: usize) -> Evicted {
        let mut evicted = Evicted::default();
        self.clock += 1;
        let block = Free {
            addr,
            len,
            freed: self.clock,
        };
        // an empty slot, else the oldest block's
        let slot = self
            .blocks
            .iter_mut()
            .min_by_key(|b| (b.len != 0, b.freed))
            .expect("KEEP_BLOCKS > 0");
        let old = std::mem::replace(slot, block);
        self.bytes = self.bytes + len - old.len;
        evicted.push(old);
        self.live = self.live.saturating_sub(len);
        let cap = self.cap();
        while self.bytes > cap {
            let oldest = self.evict_oldest();
            evicted.push(oldest);
        }
        evicted
    }

    /// The most bytes kept (see [`KEEP_BYTES`]).
    fn cap(&self) -> usize {
        KEEP_BYTES.max(2 * self.peak_live)
    }

    /// Empties the slot of the oldest kept block and returns the block (EMPTY if none).
    fn evict_oldest(&mut self) -> Free {
        let oldest = self.blocks.iter_mut().filter(|b| b.len != 0).min_by_key(|b| b.freed);
        let old = oldest.map_or(EMPTY, |b| std::mem::replace(b, EMPTY));
        self.bytes -= old.len;
        old
    }
}

/// Blocks taken out of the store, unmapped after its lock is released.
struct Evicted {
    blocks: [Free; KEEP_BLOCKS + 1],
    n: usize,
}

impl Default for Evicted {
    fn default() -> Self {
        Evicted {
            blocks: [EMPTY; KEEP_BLOCKS + 1],
            n: 0,
        }
    }
}

impl Evicted {
    fn push(&mut self, block: Free) {
        if block.len != 0 {
            self.blocks[self.n] = block;
            self.n += 1;
        }
    }

    fn unmap(self) {
        for b in &self.blocks[..self.n] {
            unmap(b.addr, b.len);
        }
    }
}

/// A new block of `len` bytes and whether it was kept before: from the store, else a fresh
/// mapping.
fn block(len: usize) -> (*mut u8, bool) {
    let taken = kept().take(len);
    match taken {
        Some(ptr) => (ptr, true),
        None => {
            let ptr = map(len);
            if ptr.is_null() {
                kept().not_mapped(len);
            }
            (ptr, false)
        }
    }
}

fn map(len: usize) -> *mut u8 {
    // SAFETY: a private anonymous mapping; no file, no fixed address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        ptr.cast()
    }
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: `addr..addr + len` was mapped by `map` and nothing refers to it any more.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

// SAFETY: a block is a page-aligned mapping of `block_len(size)` bytes, owned by one
// allocation from `alloc` until `dealloc`, then by the store until taken or unmapped.
unsafe impl GlobalAlloc for Blocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !served(&layout) {
            return System.alloc(layout);
        }
        block(block_len(layout.size())).0
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !served(&layout) {
            return System.alloc_zeroed(layout);
        }
        let (ptr, reused) = block(block_len(layout.size()));
        if reused {
            std::ptr::write_bytes(ptr, 0, layout.size()); // fresh pages are zero already
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !served(&layout) {
            return System.dealloc(ptr, layout);
        }
        let evicted = kept().keep(ptr as usize, block_len(layout.size()));
        evicted.unmap();
    }

    /// Only between two large sizes: [`crate::mapping::MappingAware`] moves an allocation
    /// across allocators itself.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !served(&layout) {
            return System.realloc(ptr, layout, new_size);
        }
        if block_len(new_size) == block_len(layout.size()) {
            return ptr;
        }
        let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: usize = GRANULE;

    /// A fresh block of `len` bytes, filled with `byte`.
    fn filled(len: usize, byte: u8) -> usize {
        let addr = map(len);
        assert!(!addr.is_null());
        unsafe { addr.write_bytes(byte, len) };
        addr as usize
    }

    fn bytes_at(addr: *mut u8, len: usize) -> &'static [u8] {
        unsafe { std::slice::from_raw_parts(addr, len) }
    }

    /// A freed block comes back for the next allocation of its length, zeroed where asked.
    #[test]
    fn freed_blocks_are_reused() {
        let layout = Layout::from_size_align(LARGE + 7 * G + 12345, 64).unwrap();
        unsafe {
            let a = Blocks.alloc(layout);
            assert!(!a.is_null());
            a.write_bytes(7, layout.size());
            Blocks.dealloc(a, layout);
            // (another test's allocation may take the freed block first: the zeroing holds either way)
            let b = Blocks.alloc_zeroed(layout);
            assert!(bytes_at(b, layout.size()).iter().all(|&x| x == 0));
            Blocks.dealloc(b, layout);
        }
        let mut store = Kept::new();
        let a = filled(20 * G, 1);
        assert!(store.keep(a, 20 * G).n == 0);
        assert_eq!(
            store.take(20 * G),
            Some(a as *mut u8),
            "the same length: the same block"
        );
        assert_eq!(store.bytes, 0);
        unmap(a, 20 * G);
    }

    /// Without a block of its length, an allocation takes the front of the shortest longer
    /// block (the rest stays kept), else extends the longest shorter one: the pages already
    /// faulted in serve it.
    #[test]
    fn other_lengths_take_kept_pages() {
        let mut store = Kept::new();
        let (short, long, longer) = (filled(16 * G, 1), filled(40 * G, 2), filled(64 * G, 3));
        for (addr, len) in [(short, 16 * G), (longer, 64 * G), (long, 40 * G)] {
            store.keep(addr, len);
        }
        let front = store.take(24 * G).unwrap();
        assert_eq!(front as usize, long, "the shortest longer block");
        assert!(bytes_at(front, 24 * G).iter().all(|&x| x == 2));
        assert!(store.blocks.iter().any(|b| b.addr == long + 24 * G && b.len == 16 * G));
        assert_eq!(store.bytes, (16 + 16 + 64) * G);

        // longer than every kept block: the longest one, extended, keeps its contents
        let grown = store.take(80 * G).unwrap();
        let grown_bytes = bytes_at(grown, 80 * G);
        assert!(grown_bytes[..64 * G].iter().all(|&x| x == 3));
        assert!(grown_bytes[64 * G..].iter().all(|&x| x == 0), "the extension is fresh");
        assert_eq!(store.bytes, 32 * G);
        assert!(store.blocks.iter().all(|b| b.len == 0 || b.len == 16 * G));

        unmap(grown as usize, 80 * G);
        unmap(front as usize, 24 * G);
        for b in store.blocks.iter().filter(|b| b.len != 0) {
            unmap(b.addr, b.len);
        }
    }

    /// What a peak in use frees is kept whole, even beyond `KEEP_BYTES`.
    #[test]
    fn a_peak_is_kept_whole() {
        let mut store = Kept::new();
        let len = 50 * G;
        let blocks: Vec<usize> = (0..8)
            .map(|_| {
                assert_eq!(store.take(len), None, "nothing kept yet");
                map(len) as usize // never touched: no memory used
            })
            .collect();
        assert!(8 * len > KEEP_BYTES);
        for &b in &blocks {
            assert_eq!(store.keep(b, len).n, 0, "nothing unmapped");
        }
        assert_eq!(store.bytes, 8 * len);
        for b in store.blocks.iter().filter(|b| b.len != 0) {
            unmap(b.addr, b.len);
        }
    }

    /// Freeing more blocks than the store holds unmaps the oldest: it stays within its limits.
    #[test]
    fn the_store_stays_bounded() {
        let mut store = Kept::new();
        let lens: Vec<usize> = (0..KEEP_BLOCKS + 4).map(|i| LARGE + (9 + i) * G).collect();
        for &len in &lens {
            store.keep(map(len) as usize, len).unmap();
        }
        let held = store.blocks.iter().filter(|b| b.len != 0).map(|b| b.len).sum::<usize>();
        assert_eq!(held, store.bytes);
        assert!(store.bytes <= store.cap(), "{} bytes kept", store.bytes);
        let newest = *lens.last().unwrap();
        assert!(store.blocks.iter().any(|b| b.len == newest), "the newest block is kept");
        for b in store.blocks.iter().filter(|b| b.len != 0) {
            unmap(b.addr, b.len);
        }
    }
}
