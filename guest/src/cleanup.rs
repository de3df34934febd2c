//! Giving PCI devices back when the process dies abnormally: a panic, or a
//! SIGINT/SIGTERM/SIGHUP the application does not handle itself.
//!
//! Each taken-over device registers what it takes to release it — the
//! address of its status register and the sysfs writes that hand it back to
//! its kernel driver — as pre-built C strings, so the release can run in a
//! signal handler with nothing but volatile stores and open/write/close.
//! Releasing twice is harmless: each entry is claimed once with an atomic swap.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Once;

/// What releasing one device takes.
pub struct Release {
    /// The device_status byte of the common configuration (reset = write 0).
    pub status: *mut u8,
    /// (file, contents) writes in order: clear driver_override, bind.
    pub writes: Vec<(CString, Vec<u8>)>,
}

const SLOTS: usize = 8;
static ENTRIES: [AtomicPtr<Release>; SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
static HOOKS: Once = Once::new();
static IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// A registered release; dropping it unregisters without releasing.
pub struct Registration(usize);

impl Registration {
    /// Unregisters without releasing; false if the release ran already (a
    /// panic hook claimed it first): then the device is given back, and
    /// its owner must leave it alone.
    pub fn unregister(self) -> bool {
        let registered = self.claim();
        // Claimed once: the slot may be reused by the next registration,
        // which a second claim in drop would take away.
        std::mem::forget(self);
        registered
    }

    /// Takes the entry out; whether it was still there.
    fn claim(&self) -> bool {
        let p = ENTRIES[self.0].swap(std::ptr::null_mut(), Ordering::AcqRel);
        if p.is_null() {
            return false;
        }
        // SAFETY: the pointer came from Box::into_raw in register and was
        // claimed exactly once by this swap.
        drop(unsafe { Box::from_raw(p) });
        true
    }
}

/// Registers `r`; installs the panic hook and the default-signal handlers
/// the first time.
pub fn register(r: Release) -> Option<Registration> {
    HOOKS.call_once(install_hooks);
    let p = Box::into_raw(Box::new(r));
    for (i, e) in ENTRIES.iter().enumerate() {
        if e.compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Some(Registration(i));
        }
    }
    // SAFETY: p came from Box::into_raw above and was not published.
    drop(unsafe { Box::from_raw(p) });
    None
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.claim();
    }
}

/// Releases every registered device (async-signal-safe). Entries are
/// claimed and leaked, not freed: freeing is not signal-safe.
pub fn release_all() {
    for e in &ENTRIES {
        let p = e.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if p.is_null() {
            continue;
        }
        // SAFETY: a registered entry lives until claimed; we claimed it.
        let r = unsafe { &*p };
        // SAFETY: status points into a BAR mapping that is never unmapped
        // while its entry is registered (the owner unregisters first, see
        // PciDevice's drop).
        unsafe { std::ptr::write_volatile(r.status, 0) };
        for (path, data) in &r.writes {
            // SAFETY: open/write/close with valid C strings and buffers; all
            // async-signal-safe.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, data.as_ptr().cast(), data.len());
                    libc::close(fd);
                }
            }
        }
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    if !IN_HANDLER.swap(true, Ordering::AcqRel) {
        release_all();
    }
    // SAFETY: restore the default action and re-raise: the process dies of
    // the signal as it would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_hooks() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        release_all();
        prev(info);
    }));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: query the current action, then install ours only where the
        // application left the default (it handles the others itself and
        // drops the device on its way out).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Tests that call [`release_all`] take this: it releases every test's
/// registrations, not just their own.
#[cfg(test)]
pub static RELEASING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_resets_and_writes_once() {
        let _one = RELEASING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bind");
        std::fs::write(&f, "").unwrap();
        let mut status = 0x0fu8;
        let reg = register(Release {
            status: &mut status,
            writes: vec![(
                CString::new(f.to_str().unwrap()).unwrap(),
                b"0000:00:04.0".to_vec(),
            )],
        })
        .unwrap();
        release_all();
        // SAFETY: status is a local the entry pointed at; read it back.
        assert_eq!(unsafe { std::ptr::read_volatile(&status) }, 0);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "0000:00:04.0");
        std::fs::write(&f, "").unwrap();
        release_all();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "", "released once");
        drop(reg);
    }
}
