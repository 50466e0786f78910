//! The checks that bound what one session may cost, made before anything is allocated:
//! region size against what the host can back, lanes, and the receive buffers the lanes
//! take. The bounds themselves are [`crate::plan::Limits`].

use std::path::Path;

use crate::plan::Limits;

/// A session asked for more than this host allows. Each says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "{what} of {bytes} bytes exceeds this host's limit of {max} bytes ({why}); a larger one needs [limits] max_region_gib in ferry.toml and the memory or space to back it"
    )]
    Region { what: &'static str, bytes: u64, max: u64, why: String },
    #[error("{lanes} lanes exceed the limit of {max} per session ([limits] max_lanes in ferry.toml)")]
    Lanes { lanes: u64, max: u32 },
    #[error(
        "{lanes} lanes with chunks of {chunk} bytes need {need} bytes of receive buffers; the limit is {max} per session ([limits] session_buffer_mib in ferry.toml)"
    )]
    Buffers { lanes: u64, chunk: u64, need: u64, max: u64 },
    #[error("cannot tell what this host can back ({0}): set [limits] max_region_gib in ferry.toml")]
    Unknown(String),
    #[error("cannot allocate {bytes} bytes of {what}: this host is out of memory")]
    Alloc { what: &'static str, bytes: u64 },
}

/// What backs a region on this host.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'p> {
    /// Guest memory this host reads and sends: bounded by its RAM and swap.
    Source,
    /// A new memfd for incoming guest memory: bounded by the memory free now.
    Memory,
    /// A file written on the file system that holds `path`: bounded by its free space.
    File(&'p Path),
}

/// Checks a session's regions (`bytes` in all) against the plan's limit, or with none
/// configured, against what the host can back now.
pub fn check_region(bytes: u64, limits: &Limits, backing: Backing<'_>) -> Result<(), LimitError> {
    let what = match backing {
        Backing::Source => "guest memory",
        Backing::Memory => "incoming guest memory",
        Backing::File(_) => "a region",
    };
    if let Some(max) = limits.max_region_bytes {
        if bytes > max {
            return Err(LimitError::Region { what, bytes, max, why: "[limits] max_region_gib".into() });
        }
        return Ok(());
    }
    let (max, why) = match backing {
        Backing::Source => {
            let m = hw::host_memory().map_err(|e| LimitError::Unknown(e.to_string()))?;
            (m.total, "the host's RAM and swap".to_string())
        }
        Backing::Memory => {
            let m = hw::host_memory().map_err(|e| LimitError::Unknown(e.to_string()))?;
            (m.available, "the memory available on this host now".to_string())
        }
        Backing::File(path) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let st = nix::sys::statvfs::statvfs(dir).map_err(|e| LimitError::Unknown(format!("statvfs {}: {e}", dir.display())))?;
            let free = st.blocks_available().saturating_mul(st.fragment_size());
            (free, format!("the free space on the file system of {}", dir.display()))
        }
    };
    if bytes > max {
        return Err(LimitError::Region { what, bytes, max, why });
    }
    Ok(())
}

/// Checks a session's lanes, and the receive buffers they take for frames of up to
/// `lane_buffer` bytes each.
pub fn check_lanes(lanes: u64, lane_buffer: u64, chunk: u64, limits: &Limits) -> Result<(), LimitError> {
    if lanes > u64::from(limits.max_lanes) {
        return Err(LimitError::Lanes { lanes, max: limits.max_lanes });
    }
    let need = lanes.saturating_mul(lane_buffer);
    if need > limits.session_buffer_bytes {
        return Err(LimitError::Buffers { lanes, chunk, need, max: limits.session_buffer_bytes });
    }
    Ok(())
}

/// A table of `n` values, allocated without aborting the process when memory runs out.
pub fn table<T: Clone>(n: u64, fill: T, what: &'static str) -> Result<Vec<T>, LimitError> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>() as u64);
    let n = usize::try_from(n).map_err(|_| LimitError::Alloc { what, bytes })?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| LimitError::Alloc { what, bytes })?;
    v.resize(n, fill);
    Ok(v)
}

/// [`table`] of values made by `f` (for types that are not `Clone`, such as atomics).
pub fn table_with<T>(n: u64, f: impl FnMut() -> T, what: &'static str) -> Result<Vec<T>, LimitError> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>() as u64);
    let n = usize::try_from(n).map_err(|_| LimitError::Alloc { what, bytes })?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| LimitError::Alloc { what, bytes })?;
    v.resize_with(n, f);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_against_limits_and_the_host() {
        let mut l = Limits { max_region_bytes: Some(1 << 30), ..Limits::default() };
        assert!(check_region(1 << 30, &l, Backing::Memory).is_ok());
        assert!(matches!(check_region((1 << 30) + 1, &l, Backing::Memory), Err(LimitError::Region { .. })));
        l.max_region_bytes = None;
        // A petabyte is more than any test machine holds, in memory or on disk.
        for b in [Backing::Source, Backing::Memory, Backing::File(Path::new("/tmp/x"))] {
            let e = check_region(1 << 50, &l, b).unwrap_err();
            assert!(e.to_string().contains("exceeds this host's limit"), "{e}");
        }
        assert!(check_region(4096, &l, Backing::File(Path::new("relative"))).is_ok());
    }

    #[test]
    fn lanes_and_buffers() {
        let l = Limits::default();
        assert!(check_lanes(8, 4 << 20, 1 << 20, &l).is_ok());
        assert!(matches!(check_lanes(65, 1, 1, &l), Err(LimitError::Lanes { .. })));
        assert!(matches!(check_lanes(8, 260 << 20, 64 << 20, &l), Err(LimitError::Buffers { .. })));
    }

    #[test]
    fn tables_fail_instead_of_aborting() {
        assert_eq!(table(3, 0u8, "t").unwrap(), vec![0, 0, 0]);
        assert!(matches!(table(1 << 60, 0u64, "a page table"), Err(LimitError::Alloc { .. })));
    }
}
