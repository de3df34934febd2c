//! Pinning threads to cores (`-g`), for zc-hostd's poll threads and the
//! tools' busy loops. A core is checked against the cores this process may
//! run on before anything starts: libc's CPU set holds CPU_SETSIZE cores
//! and `CPU_SET` past it panics, in whatever thread does the pinning.

use std::fmt::Write as _;
use std::io;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    #[error(
        "core {core} is not available: this process may run on cores {allowed}; pick one of those"
    )]
    NotAllowed { core: usize, allowed: String },
    #[error("cannot read the cores this process may run on: {0}")]
    Affinity(io::Error),
    #[error("cannot pin to core {core}: {source}")]
    Pin { core: usize, source: io::Error },
}

/// The cores this process may run on (its affinity mask: the machine's
/// cores less whatever taskset or a cpuset took away), ascending.
pub fn allowed_cores() -> Result<Vec<usize>, CoreError> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the set we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, with the set's exact size.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return Err(CoreError::Affinity(io::Error::last_os_error()));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: every index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// "0-3,6": cores as a user reads them.
fn ranges(cores: &[usize]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        if !s.is_empty() {
            s.push(',');
        }
        let _ = if j > i {
            write!(s, "{}-{}", cores[i], cores[j])
        } else {
            write!(s, "{}", cores[i])
        };
        i = j + 1;
    }
    s
}

/// Checks that every core of `cores` is one this process may run on.
pub fn check_cores(cores: &[usize]) -> Result<(), CoreError> {
    if cores.is_empty() {
        return Ok(());
    }
    let allowed = allowed_cores()?;
    match cores.iter().find(|c| allowed.binary_search(c).is_err()) {
        Some(&core) => Err(CoreError::NotAllowed {
            core,
            allowed: ranges(&allowed),
        }),
        None => Ok(()),
    }
}

/// Pins the calling thread to `core`, one of [`allowed_cores`].
pub fn pin_to(core: usize) -> Result<(), CoreError> {
    check_cores(&[core])?;
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (the core
    // is an allowed one, so below CPU_SETSIZE).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: sched_setaffinity reads the set we own, for this thread (0).
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(CoreError::Pin {
            core,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_like_taskset_lists() {
        assert_eq!(ranges(&[0, 1]), "0-1");
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(ranges(&[3]), "3");
    }

    #[test]
    fn cores_outside_the_allowed_set_are_refused_without_panicking() {
        let allowed = allowed_cores().unwrap();
        assert!(!allowed.is_empty());
        let past = allowed.last().unwrap() + 1;
        for core in [past, 1024, 100_000] {
            let e = check_cores(&[allowed[0], core]).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "core {core} is not available: this process may run on cores {}; pick one of those",
                    ranges(&allowed)
                )
            );
        }
        assert!(matches!(
            pin_to(1024),
            Err(CoreError::NotAllowed { core: 1024, .. })
        ));
        check_cores(&allowed).unwrap();
    }
}
