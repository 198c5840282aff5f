//! The C APIs of librados and librbd (Debian's `librados2` and `librbd1`),
//! loaded with `dlopen` the first time an `rbd:` disk is used: a dom0 without
//! Ceph needs neither library to run blkbackd, nor `librbd-dev` to build it.
//!
//! Every declaration here was checked against `rados/librados.h` and
//! `rbd/librbd.h` of Ceph 16.2 (Debian 12); `tests/rbd.rs` compiles a C
//! program against those headers and checks the two constants used here.
//! The handles are opaque pointers; librbd's functions are thread-safe on one
//! image (its own docs: "images may be used concurrently by multiple threads").
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `rados_t`.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`.
pub type IoCtx = *mut c_void;
/// `rbd_image_t`.
pub type Image = *mut c_void;
/// `rbd_completion_t`.
pub type Completion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = unsafe extern "C" fn(c: Completion, arg: *mut c_void);

/// `RBD_LOCK_MODE_EXCLUSIVE` (`rbd_lock_mode_t`).
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (`rbd/features.h`).
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// The functions used, resolved once.
#[allow(missing_docs)]
pub struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut Rados, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_get_instance_id: unsafe extern "C" fn(Rados) -> u64,
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoCtx),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtx, *const c_char),
    pub rbd_open: unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_get_id: unsafe extern "C" fn(Image, *mut c_char, usize) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_lock_acquire: unsafe extern "C" fn(Image, c_int) -> c_int,
    pub rbd_is_exclusive_lock_owner: unsafe extern "C" fn(Image, *mut c_int) -> c_int,
    pub rbd_lock_get_owners:
        unsafe extern "C" fn(Image, *mut c_int, *mut *mut c_char, *mut usize) -> c_int,
    pub rbd_lock_get_owners_cleanup: unsafe extern "C" fn(*mut *mut c_char, usize),
    pub rbd_lock_break: unsafe extern "C" fn(Image, c_int, *const c_char) -> c_int,
    pub rbd_read: unsafe extern "C" fn(Image, u64, usize, *mut c_char) -> isize,
    pub rbd_write: unsafe extern "C" fn(Image, u64, usize, *const c_char) -> isize,
    pub rbd_flush: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_discard: unsafe extern "C" fn(Image, u64, u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_aio_read: unsafe extern "C" fn(Image, u64, usize, *mut c_char, Completion) -> c_int,
    pub rbd_aio_write: unsafe extern "C" fn(Image, u64, usize, *const c_char, Completion) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
}

/// Opens `name` (a soname) for good: the library is never unloaded, so the
/// function pointers taken from it stay valid for the life of the process.
fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: dlopen with a NUL-terminated name; the libraries' constructors
    // are Ceph's, run once.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!(
            "{} cannot be loaded ({}): install Debian's librbd1 to serve rbd: disks",
            name.to_string_lossy(),
            dlerror()
        ));
    }
    Ok(h)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the
    // next dl call on this thread; it is copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "no reason given".into()
    } else {
        // SAFETY: see above.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Resolves `name` in `h` as a function of type `F`.
///
/// # Safety
///
/// `F` must be an `unsafe extern "C" fn` type matching the symbol's C
/// declaration exactly.
unsafe fn sym<F: Copy>(h: *mut c_void, name: &CStr) -> Result<F, String> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    // SAFETY: h is a live handle from dlopen (never closed).
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "the Ceph library lacks {}: it is older than Ceph 16 (pacific)",
            name.to_string_lossy()
        ));
    }
    // SAFETY: a non-null function address, of the type the caller vouches for.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

impl Lib {
    fn load() -> Result<Lib, String> {
        let rados = open(c"librados.so.2")?;
        let rbd = open(c"librbd.so.1")?;
        // SAFETY: each type below is the symbol's C prototype, as declared
        // in librados.h and librbd.h (see the module's comment).
        unsafe {
            Ok(Lib {
                rados_create: sym(rados, c"rados_create")?,
                rados_conf_read_file: sym(rados, c"rados_conf_read_file")?,
                rados_conf_set: sym(rados, c"rados_conf_set")?,
                rados_connect: sym(rados, c"rados_connect")?,
                rados_shutdown: sym(rados, c"rados_shutdown")?,
                rados_get_instance_id: sym(rados, c"rados_get_instance_id")?,
                rados_ioctx_create: sym(rados, c"rados_ioctx_create")?,
                rados_ioctx_destroy: sym(rados, c"rados_ioctx_destroy")?,
                rados_ioctx_set_namespace: sym(rados, c"rados_ioctx_set_namespace")?,
                rbd_open: sym(rbd, c"rbd_open")?,
                rbd_open_read_only: sym(rbd, c"rbd_open_read_only")?,
                rbd_close: sym(rbd, c"rbd_close")?,
                rbd_get_size: sym(rbd, c"rbd_get_size")?,
                rbd_get_id: sym(rbd, c"rbd_get_id")?,
                rbd_get_features: sym(rbd, c"rbd_get_features")?,
                rbd_lock_acquire: sym(rbd, c"rbd_lock_acquire")?,
                rbd_is_exclusive_lock_owner: sym(rbd, c"rbd_is_exclusive_lock_owner")?,
                rbd_lock_get_owners: sym(rbd, c"rbd_lock_get_owners")?,
                rbd_lock_get_owners_cleanup: sym(rbd, c"rbd_lock_get_owners_cleanup")?,
                rbd_lock_break: sym(rbd, c"rbd_lock_break")?,
                rbd_read: sym(rbd, c"rbd_read")?,
                rbd_write: sym(rbd, c"rbd_write")?,
                rbd_flush: sym(rbd, c"rbd_flush")?,
                rbd_discard: sym(rbd, c"rbd_discard")?,
                rbd_aio_create_completion: sym(rbd, c"rbd_aio_create_completion")?,
                rbd_aio_get_return_value: sym(rbd, c"rbd_aio_get_return_value")?,
                rbd_aio_release: sym(rbd, c"rbd_aio_release")?,
                rbd_aio_read: sym(rbd, c"rbd_aio_read")?,
                rbd_aio_write: sym(rbd, c"rbd_aio_write")?,
                rbd_aio_flush: sym(rbd, c"rbd_aio_flush")?,
                rbd_aio_discard: sym(rbd, c"rbd_aio_discard")?,
            })
        }
    }
}

impl std::fmt::Debug for Lib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("librbd")
    }
}

/// The libraries, loaded on first use (the error, if they cannot be, is
/// kept and repeated).
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}
