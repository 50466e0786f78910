//! Memory: memfds, memory this process owns and shares read-only (a simulated guest's
//! RAM), and per-worker arenas on the hugepage ladder (reserved 2 MiB pages, THP, normal
//! pages), locked in memory when asked. Files others write (a VMM's guest memory) are never
//! mapped: they are read with `pread`, so a file that shrinks is an error, not a SIGBUS,
//! and no Rust reference ever covers bytes another process changes.

use std::fs::File;
use std::io;

use memmap2::{Advice, MmapMut, MmapOptions};

/// A new memfd of `len` bytes (close-on-exec): guest memory, a dirty bitmap, or a
/// migration's destination. `hugetlb` asks for 2 MiB pages (`MFD_HUGETLB`); `len` must
/// then be a multiple of 2 MiB.
pub fn memfd(name: &str, len: u64, hugetlb: bool) -> io::Result<File> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let mut flags = MFdFlags::MFD_CLOEXEC;
    if hugetlb {
        flags |= MFdFlags::MFD_HUGETLB;
    }
    let fd = memfd_create(name, flags).map_err(io::Error::from)?;
    let f = File::from(fd);
    f.set_len(len)?;
    Ok(f)
}

/// [`memfd`], sealed against shrinking and growing: memory another process may map
/// without fearing that pages vanish under it (a migration's destination memory).
pub fn sealed_memfd(name: &str, len: u64) -> io::Result<File> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(io::Error::from)?;
    let f = File::from(fd);
    f.set_len(len)?;
    fcntl(&f, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW)).map_err(io::Error::from)?;
    Ok(f)
}

/// A new open file description of `file`, read-only, with a file offset of its own (so
/// `lseek` on it moves nobody else's): through `/proc/self/fd`.
pub fn reopen_read_only(file: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file)))
}

/// The words of `map`, each accessed atomically: memory another process may write at any
/// moment, seen without a data race.
///
/// # Safety
///
/// `map` must be page-aligned and a whole number of pages long, and its file must be
/// unable to shrink (sealed) while the returned slice is borrowed, so every word stays
/// mapped and accessible.
pub(crate) unsafe fn atomic_words(map: &memmap2::MmapRaw) -> &[std::sync::atomic::AtomicU64] {
    // SAFETY: the caller keeps the mapping page-aligned, whole pages long and backed, so
    // it holds `len / 8` aligned u64s for as long as `map` is borrowed. AtomicU64 has
    // u64's size and alignment, and every access through the slice is atomic.
    unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<std::sync::atomic::AtomicU64>(), map.len() / 8) }
}

/// Memory this process owns and writes, shared with others for reading (a simulated
/// guest's RAM): a memfd sealed against shrinking and growing, mapped shared and writable.
/// Its only writable descriptor stays inside; others get read-only ones
/// ([`OwnedMemory::reader`]), which can neither write nor truncate it. So the slices it
/// hands out are sound: nothing else writes the bytes while they are borrowed, and no page
/// of the mapping can vanish (no SIGBUS).
pub struct OwnedMemory {
    map: Option<MmapMut>,
    file: File,
}

impl std::fmt::Debug for OwnedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedMemory").field("len", &self.as_slice().len()).finish()
    }
}

impl OwnedMemory {
    /// `len` zeroed bytes in a new memfd called `name`.
    pub fn new(name: &str, len: u64) -> io::Result<OwnedMemory> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        let file = sealed_memfd(name, len)?;
        // And no seal may be taken away or added (a write seal would fail our writes).
        fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SEAL)).map_err(io::Error::from)?;
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the memfd is new and its only writable descriptor is `file`, private
            // to this value (readers get read-only descriptors, which cannot write, truncate
            // or punch it); the seals keep its size for its lifetime. So no page of the
            // mapping disappears, and only this value's `&mut self` writes it.
            Some(unsafe { MmapOptions::new().len(len as usize).map_mut(&file)? })
        };
        Ok(OwnedMemory { map, file })
    }

    /// A read-only descriptor of the memory, to hand to another process (or read with
    /// `pread`).
    pub fn reader(&self) -> io::Result<File> {
        reopen_read_only(&self.file)
    }

    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

/// Memory this process shares read-write with others (a simulated guest's RAM whose VMM
/// hands over its own descriptor, as VMMs do): a preallocated memfd sealed against
/// shrinking and growing, mapped shared. Since others may write it at any moment, this
/// process sees it only as 64-bit words accessed atomically ([`SharedMemory::words`]),
/// never as bytes; `pread`/`pwrite` on [`SharedMemory::file`] do the rest.
pub struct SharedMemory {
    map: Option<memmap2::MmapRaw>,
    file: File,
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory").field("len", &self.len()).finish()
    }
}

impl SharedMemory {
    /// `len` zeroed bytes (a whole number of pages), every page allocated, in a new memfd
    /// called `name`.
    pub fn new(name: &str, len: u64) -> io::Result<SharedMemory> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        if len % 4096 != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{len} bytes is not a whole number of pages")));
        }
        let file = sealed_memfd(name, len)?;
        fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SEAL)).map_err(io::Error::from)?;
        if len > 0 {
            nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len as i64).map_err(io::Error::from)?;
        }
        let map = if len == 0 { None } else { Some(MmapOptions::new().len(len as usize).map_raw(&file)?) };
        Ok(SharedMemory { map, file })
    }

    pub fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The read-write descriptor, for `pread`/`pwrite` and to hand to another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The memory as 64-bit words.
    pub fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        let Some(map) = &self.map else { return &[] };
        // SAFETY: the mapping is page-aligned and whole pages long (checked in `new`) and
        // stays mapped while `self` is borrowed; the file cannot shrink (sealed, and the
        // seals sealed).
        unsafe { atomic_words(map) }
    }
}

/// Whether `file` is memory: a memfd or tmpfs file (shmem) or a hugetlbfs file. A
/// migration source must be one: a disk file's pages are not guest RAM.
pub fn is_memory_file(file: &File) -> io::Result<bool> {
    use nix::sys::statfs::{HUGETLBFS_MAGIC, TMPFS_MAGIC, fstatfs};
    let fs = fstatfs(file).map_err(io::Error::from)?.filesystem_type();
    Ok(file.metadata()?.is_file() && (fs == TMPFS_MAGIC || fs == HUGETLBFS_MAGIC))
}

/// What kind of file `file` is, in words for an error message: "a pipe", "a socket",
/// "a directory", "a regular file on ext4", "a memfd or tmpfs file"...
pub fn describe(file: &File) -> String {
    use nix::sys::statfs::fstatfs;
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = file.metadata() else { return "a descriptor that cannot be examined".into() };
    let t = meta.file_type();
    if t.is_fifo() {
        return "a pipe".into();
    }
    if t.is_socket() {
        return "a socket".into();
    }
    if t.is_dir() {
        return "a directory".into();
    }
    if t.is_char_device() {
        return "a character device".into();
    }
    if t.is_block_device() {
        return "a block device".into();
    }
    // statfs(2)'s f_type values (include/uapi/linux/magic.h).
    let fs = fstatfs(file).map(|s| s.filesystem_type().0).unwrap_or(0);
    let name = match fs {
        0x0102_1994 => return "a memfd or tmpfs file".into(),
        0x9584_58f6 => return "a hugetlbfs file".into(),
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x0102_1997 => "9p",
        _ => return format!("a regular file on a file system with magic {fs:#x}"),
    };
    format!("a regular file on {name}")
}

/// What backs an arena, after the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaKind {
    Hugetlb2m,
    Thp,
    Normal,
}

/// A worker's buffer memory: anonymous, owned by one thread, optionally locked.
#[derive(Debug)]
pub struct Arena {
    map: MmapMut,
    kind: ArenaKind,
    locked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("mapping a {bytes}-byte arena failed: {source}")]
    Map { bytes: usize, source: io::Error },
    #[error("mlock of a {bytes}-byte arena failed ({source}): RLIMIT_MEMLOCK is too low; run `ferryctl doctor` for the fix")]
    MemlockTooLow { bytes: usize, source: io::Error },
}

impl Arena {
    /// Maps `bytes` on the first rung of the ladder that works, starting at `want`; each
    /// rung that fails is reported in the returned notes (for one log line per fallback).
    ///
    /// With `node`, the arena's pages are allocated on that NUMA node (`mbind`
    /// MPOL_PREFERRED, set before any page is touched): a node without free memory lends
    /// pages from another rather than failing, and a refused `mbind` is a note.
    pub fn new(bytes: usize, want: ArenaKind, lock: bool, node: Option<u32>) -> Result<(Arena, Vec<String>), ArenaError> {
        let mut notes = Vec::new();
        let mut kind = want;
        let map = loop {
            let attempt = match kind {
                ArenaKind::Hugetlb2m => MmapOptions::new().len(bytes).huge(Some(21)).map_anon(),
                ArenaKind::Thp | ArenaKind::Normal => MmapOptions::new().len(bytes).map_anon(),
            };
            match (attempt, kind) {
                (Ok(m), ArenaKind::Thp) => {
                    if let Err(e) = m.advise(Advice::HugePage) {
                        notes.push(format!("madvise(MADV_HUGEPAGE) failed ({e}): normal pages"));
                        kind = ArenaKind::Normal;
                    }
                    break m;
                }
                (Ok(m), _) => break m,
                (Err(e), ArenaKind::Hugetlb2m) => {
                    notes.push(format!("no free 2 MiB hugepages for a {} MiB arena ({e}): transparent hugepages instead", bytes >> 20));
                    kind = ArenaKind::Thp;
                }
                (Err(source), _) => return Err(ArenaError::Map { bytes, source }),
            }
        };
        if let Some(n) = node
            && let Err(e) = prefer_node(&map, n)
        {
            notes.push(format!("mbind to NUMA node {n} failed ({e}): pages come from whichever node the worker touches them on"));
        }
        let mut arena = Arena { map, kind, locked: false };
        if lock {
            arena.map.lock().map_err(|source| ArenaError::MemlockTooLow { bytes, source })?;
            arena.locked = true;
        }
        Ok((arena, notes))
    }

    pub fn kind(&self) -> ArenaKind {
        self.kind
    }

    pub fn locked(&self) -> bool {
        self.locked
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }
}

impl Arena {
    /// Cuts the arena into owned slots of `size` bytes each, as many as fit: each slot
    /// can move between threads and into a send ring or a work request and back, while the
    /// mapping stays alive as long as any slot of it does.
    pub fn into_slots(mut self, size: usize) -> Vec<Slot> {
        let size = size.max(1);
        let n = self.map.len() / size;
        let base = self.map.as_mut_ptr();
        let owner = std::sync::Arc::new(self.map);
        (0..n)
            // SAFETY: `i * size + size <= len`, so the pointer stays inside the mapping.
            .map(|i| Slot { _owner: owner.clone(), ptr: unsafe { base.add(i * size) }, len: size })
            .collect()
    }
}

/// An owned piece of an [`Arena`]: no other slot overlaps it, and it keeps the mapping
/// alive. Memory the kernel or a NIC reads while a buffer is in flight is a slot moved
/// into the ring or work request, so no Rust reference to it exists meanwhile.
pub struct Slot {
    _owner: std::sync::Arc<MmapMut>,
    ptr: *mut u8,
    len: usize,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("len", &self.len).finish_non_exhaustive()
    }
}

// SAFETY: a slot is the only handle to its bytes (slots are disjoint, and the arena that
// was cut into them is gone), so moving it to another thread moves that exclusive access;
// the mapping it keeps alive is plain memory.
unsafe impl Send for Slot {}
// SAFETY: through `&Slot` only reads happen (Deref), and no `&mut` to the same bytes can
// exist at the same time (DerefMut needs `&mut Slot`).
unsafe impl Sync for Slot {}

impl Slot {
    /// The mapping the slot belongs to (for a registration that must outlive it).
    pub(crate) fn owner(&self) -> std::sync::Arc<MmapMut> {
        self._owner.clone()
    }
}

impl std::ops::Deref for Slot {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` lies inside the mapping `_owner` keeps alive, no other
        // slot overlaps it, and writers need `&mut self`, which `&self` excludes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for Deref; `&mut self` makes this the only access to these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl AsRef<[u8]> for Arena {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// Asks the kernel to allocate the pages of `map` on `node` (MPOL_PREFERRED).
fn prefer_node(map: &MmapMut, node: u32) -> io::Result<()> {
    const MPOL_PREFERRED: libc::c_long = 1;
    let node = node as usize;
    let mut mask = vec![0 as libc::c_ulong; node / 64 + 1];
    mask[node / 64] |= 1 << (node % 64);
    // The kernel reads `maxnode - 1` bits of the mask (as libnuma passes it).
    let maxnode = mask.len() * 64 + 1;
    // SAFETY: the range is our own live mapping; `mask` outlives the call and holds
    // `maxnode - 1` bits; mbind only sets the range's allocation policy.
    let r = unsafe { libc::syscall(libc::SYS_mbind, map.as_ptr(), map.len(), MPOL_PREFERRED, mask.as_ptr(), maxnode, 0 as libc::c_uint) };
    if r != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl AsMut<[u8]> for Arena {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shared memory: preallocated, its words and its descriptor see the same bytes, and
    /// its size is sealed.
    #[test]
    fn shared_memory_words_and_descriptor_agree() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        use std::sync::atomic::Ordering;
        assert!(SharedMemory::new("ferry-test-odd", 4097).is_err(), "not whole pages");
        let m = SharedMemory::new("ferry-test-shared", 4 * 4096).unwrap();
        assert!(m.file().metadata().unwrap().blocks() * 512 >= 4 * 4096, "every page allocated");
        m.words()[513].store(u64::from_le_bytes(*b"ferry!!!"), Ordering::Relaxed);
        let mut b = [0u8; 8];
        m.file().read_exact_at(&mut b, 513 * 8).unwrap();
        assert_eq!(&b, b"ferry!!!");
        m.file().write_all_at(b"written.", 8).unwrap();
        assert_eq!(m.words()[1].load(Ordering::Relaxed).to_le_bytes(), *b"written.");
        assert!(m.file().set_len(4096).is_err(), "sealed against shrinking");
    }

    /// Owned memory: written through its map, read through a read-only descriptor that
    /// can neither write nor shrink it.
    #[test]
    fn owned_memory_is_sealed_and_shared_read_only() {
        use std::os::unix::fs::FileExt;
        let mut m = OwnedMemory::new("ferry-owned", 3 * 4096).unwrap();
        m.as_mut_slice()[5000] = 7;
        let r = m.reader().unwrap();
        assert!(is_memory_file(&r).unwrap());
        let mut b = [0u8; 1];
        r.read_exact_at(&mut b, 5000).unwrap();
        assert_eq!(b[0], 7);
        assert!(r.write_at(&[1], 0).is_err(), "the reader cannot write");
        assert!(r.set_len(4096).is_err(), "nor shrink it");
        assert!(m.file.set_len(4096).is_err(), "the seal keeps the size even for the owner");
        assert_eq!(m.as_slice()[5000], 7);
    }

    #[test]
    fn memfd_is_memory_and_shared() {
        let f = memfd("ferry-test", 3 * 4096, false).unwrap();
        assert!(is_memory_file(&f).unwrap());
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[9], 4096).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(b[0], 9);
        let disk = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(!is_memory_file(disk.as_file()).unwrap(), "a file on disk is not guest memory");
        assert!(describe(disk.as_file()).starts_with("a regular file on"), "{}", describe(disk.as_file()));
        assert_eq!(describe(&f), "a memfd or tmpfs file");
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(describe(&File::from(std::os::fd::OwnedFd::from(r))), "a pipe");
    }

    #[test]
    fn arena_ladder_ends_somewhere_usable() {
        let (mut a, notes) = Arena::new(4 << 20, ArenaKind::Hugetlb2m, false, None).unwrap();
        assert_eq!(a.len(), 4 << 20);
        a.as_mut_slice()[4096] = 7;
        assert_eq!(a.as_slice()[4096], 7);
        if a.kind() != ArenaKind::Hugetlb2m {
            assert!(!notes.is_empty(), "a fallback is always explained");
        }
    }

    #[test]
    fn slots_are_disjoint_and_outlive_the_arena() {
        let (a, _) = Arena::new(2 << 20, ArenaKind::Normal, false, None).unwrap();
        let mut slots = a.into_slots(600 << 10);
        assert_eq!(slots.len(), 3);
        for (i, s) in slots.iter_mut().enumerate() {
            s.fill(i as u8 + 1);
        }
        let last = slots.pop().unwrap();
        drop(slots);
        let t = std::thread::spawn(move || last.iter().all(|&b| b == 3));
        assert!(t.join().unwrap(), "the slot kept its bytes and its mapping");
    }

    #[test]
    fn arena_lock_obeys_memlock() {
        match Arena::new(2 << 20, ArenaKind::Normal, true, None) {
            Ok((a, _)) => assert!(a.locked()),
            Err(e) => {
                assert!(matches!(e, ArenaError::MemlockTooLow { .. }), "{e}");
                crate::report_skip(&format!("cannot mlock 2 MiB here: {e}"));
            }
        }
    }

    /// An arena for node 0 carries that policy, as /proc/self/numa_maps shows it; a node
    /// that does not exist is a note, not a failure.
    #[test]
    fn arena_on_a_numa_node() {
        let (a, notes) = Arena::new(2 << 20, ArenaKind::Normal, false, Some(0)).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let start = format!("{:x} ", a.as_slice().as_ptr() as usize);
        let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
        let line = maps.lines().find(|l| l.starts_with(&start)).expect("the arena is in numa_maps");
        assert!(line.contains("prefer:0"), "{line}");
        let (_, notes) = Arena::new(2 << 20, ArenaKind::Normal, false, Some(1000)).unwrap();
        assert!(notes.iter().any(|n| n.contains("NUMA node 1000")), "{notes:?}");
    }
}
