//! A small, safe, async client over librados: the only place with `unsafe` in the RADOS spool.
//!
//! Invariants (why the `unsafe` blocks are sound):
//! - `Cluster` owns the `rados_t` and the `rados_ioctx_t`; it is dropped only when the last
//!   `Arc<Cluster>` goes, and every in-flight operation holds one, so an ioctx is never used
//!   after `rados_ioctx_destroy` and the ioctx is destroyed before `rados_shutdown` (the
//!   use-after-free of ceph-rust 3.2.5).
//! - librados' C API is thread-safe for a connected cluster handle and an ioctx used without
//!   changing its namespace after creation, hence `Send + Sync`.
//! - Input buffers (keys, values, object data, class-method input) are copied into
//!   bufferlists by the `rados_*_op_*` calls before they return, so they only need to live
//!   across the call. Output locations (return codes, omap iterators, read buffers) are
//!   written when the operation completes: they live in a heap `OpState` shared (by `Arc`)
//!   between the awaiting future and the completion callback, so they outlive the
//!   operation even when the future is dropped early. `OpState::drop` releases the op, the
//!   completion and any iterators; it runs after completion on whichever side drops last.
//! - The completion callback only wakes a oneshot; it runs on a librados finisher thread
//!   without librados locks held, so releasing the completion from it is allowed.

use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use libc::{c_char, c_int, c_void};
use tokio::sync::oneshot;

use super::ffi;

/// A librados call failed with `-errno`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rados {op} on {object}: {message} (errno {errno})")]
pub struct RadosError {
    pub op: &'static str,
    pub object: String,
    pub errno: i32,
    pub message: String,
}

impl RadosError {
    fn new(op: &'static str, object: &str, ret: i32) -> Self {
        let errno = -ret;
        RadosError { op, object: object.to_string(), errno, message: std::io::Error::from_raw_os_error(errno).to_string() }
    }
    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }
    pub fn is_busy(&self) -> bool {
        self.errno == libc::EBUSY
    }
    /// Whether the cluster is unreachable, unhealthy or full: the caller should answer 4xx/503
    /// and try again later rather than treat the data as broken.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.errno,
            libc::ETIMEDOUT | libc::ENOSPC | libc::EDQUOT | libc::ENOTCONN | libc::ESHUTDOWN | libc::ECONNREFUSED | libc::EAGAIN
        )
    }
}

struct Cluster {
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
}

// SAFETY: see the module invariants; librados handles are usable from any thread.
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

thread_local! {
    /// Set while a completion callback runs on a librados finisher thread.
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Shutdown threads started from completion callbacks. A process must not exit while one
/// runs: exit tears down librados' static state under it, and the C++ exception that follows
/// aborts the process (seen once as SIGABRT right after a clean stop).
static SHUTDOWNS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits for every cluster shutdown handed to a thread of its own. Call before the process
/// exits, after the last spool handle is gone.
pub fn join_shutdowns() {
    let threads = std::mem::take(&mut *SHUTDOWNS.lock().unwrap_or_else(|e| e.into_inner()));
    for t in threads {
        let _ = t.join();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        struct Handles(ffi::rados_t, ffi::rados_ioctx_t);
        // SAFETY: handles are only moved to the thread that destroys them.
        unsafe impl Send for Handles {}
        let h = Handles(self.cluster, self.ioctx);
        let shutdown = move || {
            let h = h;
            // SAFETY: no operation is in flight (each holds an Arc<Cluster>); ioctx first.
            unsafe {
                ffi::rados_ioctx_destroy(h.1);
                ffi::rados_shutdown(h.0);
            }
        };
        // `rados_shutdown` joins librados' finisher threads, so it cannot run on one (the last
        // reference can go in a completion callback): hand it to a thread of its own then.
        // Everywhere else shut down right here, so nothing is left running at process exit.
        if IN_CALLBACK.with(|c| c.get()) {
            match std::thread::Builder::new().name("rados-shutdown".into()).spawn(shutdown) {
                Ok(t) => SHUTDOWNS.lock().unwrap_or_else(|e| e.into_inner()).push(t),
                Err(_) => tracing::error!("rados: could not start the shutdown thread; leaking the cluster handle"),
            }
        } else {
            shutdown();
        }
    }
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub conf: std::path::PathBuf,
    /// The cephx user without `client.` (e.g. `admin`).
    pub user: String,
    pub pool: String,
    pub namespace: Option<String>,
    /// `rados_osd_op_timeout` and `rados_mon_op_timeout`: a full or unhealthy cluster makes
    /// operations fail after this long instead of hanging.
    pub op_timeout: Duration,
}

/// A connection to one pool (and namespace). Cheap to clone.
#[derive(Clone)]
pub struct Rados {
    cluster: Arc<Cluster>,
}

fn cstring(s: &str, what: &'static str) -> Result<CString, RadosError> {
    CString::new(s).map_err(|_| RadosError { op: what, object: s.into(), errno: libc::EINVAL, message: "contains NUL".into() })
}

impl Rados {
    /// Connects (blocking: call from a blocking context).
    pub fn connect(opts: &ConnectOptions) -> Result<Rados, RadosError> {
        let conf = opts.conf.to_string_lossy().to_string();
        let user = cstring(&format!("client.{}", opts.user), "connect")?;
        let cluster_name = cstring("ceph", "connect")?;
        let mut cluster: ffi::rados_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; strings live across the call.
        let r = unsafe { ffi::rados_create2(&mut cluster, cluster_name.as_ptr(), user.as_ptr(), 0) };
        if r < 0 {
            return Err(RadosError::new("create", &conf, r));
        }
        // From here on, `guard` shuts the handle down on every error path.
        struct Guard(ffi::rados_t);
        impl Drop for Guard {
            fn drop(&mut self) {
                if !self.0.is_null() {
                    // SAFETY: created above and not yet shared.
                    unsafe { ffi::rados_shutdown(self.0) }
                }
            }
        }
        let mut guard = Guard(cluster);
        let conf_c = cstring(&conf, "conf_read_file")?;
        // SAFETY: valid handle and C strings.
        let r = unsafe { ffi::rados_conf_read_file(cluster, conf_c.as_ptr()) };
        if r < 0 {
            return Err(RadosError::new("conf_read_file", &conf, r));
        }
        let secs = opts.op_timeout.as_secs().max(1).to_string();
        for key in ["rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"] {
            let (k, v) = (cstring(key, "conf_set")?, cstring(&secs, "conf_set")?);
            // SAFETY: valid handle and C strings.
            let r = unsafe { ffi::rados_conf_set(cluster, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(RadosError::new("conf_set", key, r));
            }
        }
        // SAFETY: configured handle.
        let r = unsafe { ffi::rados_connect(cluster) };
        if r < 0 {
            return Err(RadosError::new("connect", &conf, r));
        }
        let pool = cstring(&opts.pool, "ioctx_create")?;
        let mut ioctx: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, out-pointer to a local.
        let r = unsafe { ffi::rados_ioctx_create(cluster, pool.as_ptr(), &mut ioctx) };
        if r < 0 {
            return Err(RadosError::new("ioctx_create", &opts.pool, r));
        }
        if let Some(ns) = &opts.namespace {
            let ns = cstring(ns, "set_namespace")?;
            // SAFETY: the ioctx is not shared yet; librados copies the namespace.
            unsafe { ffi::rados_ioctx_set_namespace(ioctx, ns.as_ptr()) };
        }
        guard.0 = ptr::null_mut();
        Ok(Rados { cluster: Arc::new(Cluster { cluster, ioctx }) })
    }

    /// Runs a compound write atomically on one object.
    pub async fn write(&self, oid: &str, op: WriteOp) -> Result<(), RadosError> {
        let (state, rx) = self.submit_write(oid, &op)?;
        let _ = rx.await;
        state.check_write(oid)
    }

    fn submit_write(&self, oid: &str, op: &WriteOp) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "write")?;
        // SAFETY: creates a fresh op handle owned by OpState from here on.
        let handle = unsafe { ffi::rados_create_write_op() };
        let state = OpState::new(self.cluster.clone(), OpHandle::Write(handle), op.steps.len());
        for (i, step) in op.steps.iter().enumerate() {
            let prval = state.prval_ptr(i);
            // SAFETY: `handle` is live; inputs live across each call (librados copies them);
            // `prval` points into OpState, which outlives the operation.
            unsafe {
                match step {
                    WriteStep::Create { exclusive } => ffi::rados_write_op_create(handle, *exclusive as c_int, ptr::null()),
                    WriteStep::WriteFull(data) => {
                        ffi::rados_write_op_write_full(handle, data.as_ptr() as *const c_char, data.len())
                    }
                    WriteStep::OmapSet(kvs) => {
                        let keys: Vec<*const c_char> = kvs.iter().map(|(k, _)| k.as_ptr() as *const c_char).collect();
                        let vals: Vec<*const c_char> = kvs.iter().map(|(_, v)| v.as_ptr() as *const c_char).collect();
                        let klens: Vec<usize> = kvs.iter().map(|(k, _)| k.len()).collect();
                        let vlens: Vec<usize> = kvs.iter().map(|(_, v)| v.len()).collect();
                        ffi::rados_write_op_omap_set2(handle, keys.as_ptr(), vals.as_ptr(), klens.as_ptr(), vlens.as_ptr(), kvs.len())
                    }
                    WriteStep::OmapRm(keys) => {
                        let ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr() as *const c_char).collect();
                        let lens: Vec<usize> = keys.iter().map(|k| k.len()).collect();
                        ffi::rados_write_op_omap_rm_keys2(handle, ptrs.as_ptr(), lens.as_ptr(), keys.len())
                    }
                    WriteStep::OmapCmpEq(k, v) => ffi::rados_write_op_omap_cmp2(
                        handle,
                        k.as_ptr() as *const c_char,
                        ffi::CMP_OP_EQ,
                        v.as_ptr() as *const c_char,
                        k.len(),
                        v.len(),
                        prval,
                    ),
                    WriteStep::Exec { class, method, input } => ffi::rados_write_op_exec(
                        handle,
                        class.as_ptr(),
                        method.as_ptr(),
                        input.as_ptr() as *const c_char,
                        input.len(),
                        prval,
                    ),
                }
            }
        }
        let rx = state.start(oid, |c, io| {
            // SAFETY: live op, ioctx and completion; NULL mtime means "now".
            unsafe { ffi::rados_aio_write_op_operate(handle, io, c, oid_c.as_ptr(), ptr::null_mut(), 0) }
        })?;
        Ok((state, rx))
    }

    /// Reads pages of omap entries: one `(start_after, prefix, max)` query per element, all in
    /// one compound read. Returns, per query, the entries and whether more remain.
    pub async fn omap_get(&self, oid: &str, queries: &[OmapQuery]) -> Result<Vec<OmapPage>, RadosError> {
        let (state, rx) = self.submit_omap_get(oid, queries)?;
        let _ = rx.await;
        state.check_read("omap_get", oid)?;
        (0..queries.len()).map(|i| state.take_omap(i)).collect::<Result<_, _>>().map_err(|r| RadosError::new("omap_get", oid, r))
    }

    fn submit_omap_get(&self, oid: &str, queries: &[OmapQuery]) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "omap_get")?;
        let cstrs: Vec<(CString, CString)> = queries
            .iter()
            .map(|q| Ok((cstring(&q.start_after, "omap_get")?, cstring(&q.prefix, "omap_get")?)))
            .collect::<Result<_, RadosError>>()?;
        // SAFETY: fresh handle owned by OpState.
        let handle = unsafe { ffi::rados_create_read_op() };
        let state = OpState::new(self.cluster.clone(), OpHandle::Read(handle), queries.len());
        for (i, (q, (after, prefix))) in queries.iter().zip(&cstrs).enumerate() {
            let (iter, more, prval) = state.omap_out_ptrs(i);
            // SAFETY: live op; strings are copied by librados; outputs point into OpState.
            unsafe { ffi::rados_read_op_omap_get_vals2(handle, after.as_ptr(), prefix.as_ptr(), q.max, iter, more, prval) };
        }
        let rx = state.start(oid, |c, io| {
            // SAFETY: live op, ioctx and completion.
            unsafe { ffi::rados_aio_read_op_operate(handle, io, c, oid_c.as_ptr(), 0) }
        })?;
        Ok((state, rx))
    }

    /// Reads up to `max` omap keys (no values) after `start_after`, and whether more remain.
    pub async fn omap_keys(&self, oid: &str, start_after: &str, max: u64) -> Result<OmapPage, RadosError> {
        let (state, rx) = self.submit_omap_keys(oid, start_after, max)?;
        let _ = rx.await;
        state.check_read("omap_keys", oid)?;
        state.take_omap(0).map_err(|r| RadosError::new("omap_keys", oid, r))
    }

    fn submit_omap_keys(&self, oid: &str, start_after: &str, max: u64) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "omap_keys")?;
        let after = cstring(start_after, "omap_keys")?;
        // SAFETY: fresh handle owned by OpState.
        let handle = unsafe { ffi::rados_create_read_op() };
        let state = OpState::new(self.cluster.clone(), OpHandle::Read(handle), 1);
        let (iter, more, prval) = state.omap_out_ptrs(0);
        // SAFETY: live op; `after` is copied by librados; outputs point into OpState.
        unsafe { ffi::rados_read_op_omap_get_keys2(handle, after.as_ptr(), max, iter, more, prval) };
        let rx = state.start(oid, |c, io| {
            // SAFETY: live op, ioctx and completion.
            unsafe { ffi::rados_aio_read_op_operate(handle, io, c, oid_c.as_ptr(), 0) }
        })?;
        Ok((state, rx))
    }

    /// Reads the values of the given omap keys (missing keys are simply absent).
    pub async fn omap_get_by_keys(&self, oid: &str, keys: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, RadosError> {
        let (state, rx) = self.submit_omap_get_by_keys(oid, keys)?;
        let _ = rx.await;
        state.check_read("omap_get_by_keys", oid)?;
        state.take_omap(0).map(|p| p.entries).map_err(|r| RadosError::new("omap_get_by_keys", oid, r))
    }

    fn submit_omap_get_by_keys(&self, oid: &str, keys: &[Vec<u8>]) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "omap_get_by_keys")?;
        // SAFETY: fresh handle owned by OpState.
        let handle = unsafe { ffi::rados_create_read_op() };
        let state = OpState::new(self.cluster.clone(), OpHandle::Read(handle), 1);
        let ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr() as *const c_char).collect();
        let lens: Vec<usize> = keys.iter().map(|k| k.len()).collect();
        let (iter, _, prval) = state.omap_out_ptrs(0);
        // SAFETY: inputs copied by librados during the call; outputs point into OpState.
        unsafe { ffi::rados_read_op_omap_get_vals_by_keys2(handle, ptrs.as_ptr(), keys.len(), lens.as_ptr(), iter, prval) };
        let rx = state.start(oid, |c, io| {
            // SAFETY: live op, ioctx and completion.
            unsafe { ffi::rados_aio_read_op_operate(handle, io, c, oid_c.as_ptr(), 0) }
        })?;
        Ok((state, rx))
    }

    /// Whether an object exists (one read op asserting existence; run many at once to
    /// check many objects without a round trip each).
    pub async fn exists(&self, oid: &str) -> Result<bool, RadosError> {
        let (state, rx) = self.submit_exists(oid)?;
        let _ = rx.await;
        match state.return_value() {
            r if r >= 0 => Ok(true),
            r if r == -libc::ENOENT => Ok(false),
            r => Err(RadosError::new("exists", oid, r)),
        }
    }

    fn submit_exists(&self, oid: &str) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "exists")?;
        // SAFETY: fresh handle owned by OpState.
        let handle = unsafe { ffi::rados_create_read_op() };
        let state = OpState::new(self.cluster.clone(), OpHandle::Read(handle), 0);
        // SAFETY: live op; the step has no inputs or outputs.
        unsafe { ffi::rados_read_op_assert_exists(handle) };
        let rx = state.start(oid, |c, io| {
            // SAFETY: live op, ioctx and completion.
            unsafe { ffi::rados_aio_read_op_operate(handle, io, c, oid_c.as_ptr(), 0) }
        })?;
        Ok((state, rx))
    }

    /// Reads `len` bytes of an object's data from offset 0.
    pub async fn read(&self, oid: &str, len: usize) -> Result<Bytes, RadosError> {
        let (state, rx) = self.submit_read(oid, len)?;
        let _ = rx.await;
        let n = state.return_value();
        if n < 0 {
            return Err(RadosError::new("read", oid, n));
        }
        let mut data = state.take_read_buffer();
        data.truncate(n as usize);
        Ok(Bytes::from(data))
    }

    fn submit_read(&self, oid: &str, len: usize) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "read")?;
        let state = OpState::new(self.cluster.clone(), OpHandle::None, 0);
        let buf = state.read_buffer(len);
        let rx = state.start(oid, |c, io| {
            // SAFETY: `buf` is owned by OpState and outlives the operation.
            unsafe { ffi::rados_aio_read(io, oid_c.as_ptr(), c, buf as *mut c_char, len, 0) }
        })?;
        Ok((state, rx))
    }

    /// Removes an object.
    pub async fn remove(&self, oid: &str) -> Result<(), RadosError> {
        let (state, rx) = self.submit_remove(oid)?;
        let _ = rx.await;
        let r = state.return_value();
        if r < 0 {
            return Err(RadosError::new("remove", oid, r));
        }
        Ok(())
    }

    fn submit_remove(&self, oid: &str) -> Result<(Arc<OpState>, oneshot::Receiver<()>), RadosError> {
        let oid_c = cstring(oid, "remove")?;
        let state = OpState::new(self.cluster.clone(), OpHandle::None, 0);
        let rx = state.start(oid, |c, io| {
            // SAFETY: live ioctx and completion.
            unsafe { ffi::rados_aio_remove(io, oid_c.as_ptr(), c) }
        })?;
        Ok((state, rx))
    }

    /// Takes or renews an exclusive cls_lock (blocking; call from a blocking context).
    pub fn lock_exclusive(&self, oid: &str, name: &str, cookie: &str, desc: &str, duration: Duration) -> Result<(), RadosError> {
        let (o, n, c, d) = (cstring(oid, "lock")?, cstring(name, "lock")?, cstring(cookie, "lock")?, cstring(desc, "lock")?);
        let mut tv = libc::timeval { tv_sec: duration.as_secs() as libc::time_t, tv_usec: duration.subsec_micros() as libc::suseconds_t };
        // SAFETY: live ioctx; strings and timeval live across the call.
        let r = unsafe {
            ffi::rados_lock_exclusive(
                self.cluster.ioctx,
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                &mut tv as *mut libc::timeval as *mut _,
                ffi::LOCK_FLAG_MAY_RENEW,
            )
        };
        if r < 0 {
            return Err(RadosError::new("lock_exclusive", oid, r));
        }
        Ok(())
    }

    /// Releases a cls_lock held by `cookie` (blocking).
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), RadosError> {
        let (o, n, c) = (cstring(oid, "unlock")?, cstring(name, "unlock")?, cstring(cookie, "unlock")?);
        // SAFETY: live ioctx; strings live across the call.
        let r = unsafe { ffi::rados_unlock(self.cluster.ioctx, o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        if r < 0 {
            return Err(RadosError::new("unlock", oid, r));
        }
        Ok(())
    }

    /// Names of all objects in the pool/namespace starting with `prefix` (blocking).
    pub fn list_objects(&self, prefix: &str) -> Result<Vec<String>, RadosError> {
        let mut ctx: ffi::rados_list_ctx_t = ptr::null_mut();
        // SAFETY: live ioctx; out-pointer to a local.
        let r = unsafe { ffi::rados_nobjects_list_open(self.cluster.ioctx, &mut ctx) };
        if r < 0 {
            return Err(RadosError::new("list_open", prefix, r));
        }
        let mut out = Vec::new();
        let result = loop {
            let mut entry: *const c_char = ptr::null();
            // SAFETY: open list context; librados owns the returned string until the next call.
            let r = unsafe { ffi::rados_nobjects_list_next(ctx, &mut entry, ptr::null_mut(), ptr::null_mut()) };
            if r == -libc::ENOENT {
                break Ok(out);
            }
            if r < 0 {
                break Err(RadosError::new("list_next", prefix, r));
            }
            // SAFETY: a NUL-terminated string valid until the next list call.
            let name = unsafe { CStr::from_ptr(entry) }.to_string_lossy();
            if name.starts_with(prefix) {
                out.push(name.into_owned());
            }
        };
        // SAFETY: opened above, closed once.
        unsafe { ffi::rados_nobjects_list_close(ctx) };
        result
    }
}

/// One step of a compound write.
enum WriteStep {
    Create { exclusive: bool },
    WriteFull(Bytes),
    OmapSet(Vec<(Vec<u8>, Vec<u8>)>),
    OmapRm(Vec<Vec<u8>>),
    /// Aborts the whole op unless the key's current value equals this value.
    OmapCmpEq(Vec<u8>, Vec<u8>),
    Exec { class: CString, method: CString, input: Vec<u8> },
}

/// A compound write applied atomically to one object.
#[derive(Default)]
pub struct WriteOp {
    steps: Vec<WriteStep>,
}

impl WriteOp {
    pub fn new() -> Self {
        WriteOp::default()
    }
    pub fn create(mut self, exclusive: bool) -> Self {
        self.steps.push(WriteStep::Create { exclusive });
        self
    }
    pub fn write_full(mut self, data: Bytes) -> Self {
        self.steps.push(WriteStep::WriteFull(data));
        self
    }
    pub fn omap_set(mut self, kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        if !kvs.is_empty() {
            self.steps.push(WriteStep::OmapSet(kvs));
        }
        self
    }
    pub fn omap_rm(mut self, keys: Vec<Vec<u8>>) -> Self {
        if !keys.is_empty() {
            self.steps.push(WriteStep::OmapRm(keys));
        }
        self
    }
    pub fn omap_cmp_eq(mut self, key: Vec<u8>, value: Vec<u8>) -> Self {
        self.steps.push(WriteStep::OmapCmpEq(key, value));
        self
    }
    /// Fails the whole op (with EBUSY/ENOENT) unless `cookie` holds the exclusive cls_lock
    /// `name` on the object: the fencing that stops a worker which lost a shard.
    pub fn assert_locked(mut self, name: &str, cookie: &str) -> Self {
        self.steps.push(WriteStep::Exec {
            class: CString::new("lock").expect("literal"),
            method: CString::new("assert_locked").expect("literal"),
            input: encode_cls_lock_assert(name, cookie),
        });
        self
    }
    /// Appends the steps of `other`.
    pub fn then(mut self, other: WriteOp) -> Self {
        self.steps.extend(other.steps);
        self
    }
}

/// Encodes `cls_lock_assert_op { name, type: exclusive, cookie, tag: "" }` in Ceph's
/// versioned encoding (ENCODE_START(1, 1): version, compat, u32 length, then the fields;
/// strings are a u32 length and the bytes, all little-endian). No crate speaks this.
fn encode_cls_lock_assert(name: &str, cookie: &str) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(1); // ClsLockType::EXCLUSIVE
    string(&mut body, cookie);
    string(&mut body, ""); // tag: rados_lock_exclusive uses an empty tag
    let mut out = vec![1u8, 1u8];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// One `omap_get_vals2` query.
#[derive(Clone, Debug)]
pub struct OmapQuery {
    pub start_after: String,
    pub prefix: String,
    pub max: u64,
}

#[derive(Clone, Debug, Default)]
pub struct OmapPage {
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
    pub more: bool,
}

enum OpHandle {
    None,
    Write(ffi::rados_write_op_t),
    Read(ffi::rados_read_op_t),
}

/// Everything an in-flight operation writes into, plus the handles to release after it.
struct OpState {
    cluster: Arc<Cluster>,
    handle: OpHandle,
    completion: Mutex<ffi::rados_completion_t>,
    done: Mutex<Option<oneshot::Sender<()>>>,
    /// Per-step return codes (boxed slice: stable addresses).
    prvals: Box<[c_int]>,
    iters: Box<[ffi::rados_omap_iter_t]>,
    mores: Box<[u8]>,
    read_buf: Mutex<Vec<u8>>,
}

// SAFETY: raw handles are only touched under the rules in the module docs.
unsafe impl Send for OpState {}
unsafe impl Sync for OpState {}

extern "C" fn on_complete(_c: ffi::rados_completion_t, arg: *mut c_void) {
    IN_CALLBACK.with(|c| c.set(true));
    // SAFETY: `arg` came from Arc::into_raw in `start` and is consumed exactly once here.
    let state = unsafe { Arc::from_raw(arg as *const OpState) };
    let tx = state.done.lock().expect("op state").take();
    if let Some(tx) = tx {
        let _ = tx.send(());
    }
    drop(state);
    IN_CALLBACK.with(|c| c.set(false));
}

impl OpState {
    fn new(cluster: Arc<Cluster>, handle: OpHandle, steps: usize) -> Arc<OpState> {
        Arc::new(OpState {
            cluster,
            handle,
            completion: Mutex::new(ptr::null_mut()),
            done: Mutex::new(None),
            prvals: vec![0; steps].into_boxed_slice(),
            iters: vec![ptr::null_mut(); steps].into_boxed_slice(),
            mores: vec![0; steps].into_boxed_slice(),
            read_buf: Mutex::new(Vec::new()),
        })
    }

    fn prval_ptr(&self, i: usize) -> *mut c_int {
        self.prvals.as_ptr().wrapping_add(i) as *mut c_int
    }

    fn omap_out_ptrs(&self, i: usize) -> (*mut ffi::rados_omap_iter_t, *mut u8, *mut c_int) {
        (self.iters.as_ptr().wrapping_add(i) as *mut _, self.mores.as_ptr().wrapping_add(i) as *mut u8, self.prval_ptr(i))
    }

    fn read_buffer(&self, len: usize) -> *mut u8 {
        let mut b = self.read_buf.lock().expect("op state");
        *b = vec![0u8; len];
        b.as_mut_ptr()
    }

    /// Creates the completion, hands one reference to the callback and submits with `submit`.
    fn start(
        self: &Arc<Self>,
        oid: &str,
        submit: impl FnOnce(ffi::rados_completion_t, ffi::rados_ioctx_t) -> c_int,
    ) -> Result<oneshot::Receiver<()>, RadosError> {
        let (tx, rx) = oneshot::channel();
        *self.done.lock().expect("op state") = Some(tx);
        let arg = Arc::into_raw(self.clone()) as *mut c_void;
        let mut c: ffi::rados_completion_t = ptr::null_mut();
        // SAFETY: callback and argument stay valid until the callback runs.
        let r = unsafe { ffi::rados_aio_create_completion2(arg, Some(on_complete), &mut c) };
        if r < 0 {
            // SAFETY: the callback will never run; take back its reference.
            unsafe { drop(Arc::from_raw(arg as *const OpState)) };
            return Err(RadosError::new("aio_create_completion", oid, r));
        }
        *self.completion.lock().expect("op state") = c;
        let r = submit(c, self.cluster.ioctx);
        if r < 0 {
            // SAFETY: submission failed, so the callback will never run.
            unsafe { drop(Arc::from_raw(arg as *const OpState)) };
            return Err(RadosError::new("aio_submit", oid, r));
        }
        Ok(rx)
    }

    fn return_value(&self) -> c_int {
        let c = *self.completion.lock().expect("op state");
        // SAFETY: called after completion; the completion is released only in drop.
        unsafe { ffi::rados_aio_get_return_value(c) }
    }

    fn check_write(&self, oid: &str) -> Result<(), RadosError> {
        let r = self.return_value();
        if r < 0 {
            return Err(RadosError::new("write", oid, r));
        }
        Ok(())
    }

    fn check_read(&self, op: &'static str, oid: &str) -> Result<(), RadosError> {
        let r = self.return_value();
        if r < 0 {
            return Err(RadosError::new(op, oid, r));
        }
        Ok(())
    }

    /// Drains the omap iterator of query `i` (after completion).
    fn take_omap(&self, i: usize) -> Result<OmapPage, c_int> {
        if self.prvals[i] < 0 {
            return Err(self.prvals[i]);
        }
        let iter = self.iters[i];
        let mut entries = Vec::new();
        if !iter.is_null() {
            loop {
                let (mut k, mut v): (*mut c_char, *mut c_char) = (ptr::null_mut(), ptr::null_mut());
                let (mut kl, mut vl) = (0usize, 0usize);
                // SAFETY: a completed iterator; returned buffers are valid until the next call.
                let r = unsafe { ffi::rados_omap_get_next2(iter, &mut k, &mut v, &mut kl, &mut vl) };
                if r < 0 {
                    return Err(r);
                }
                if k.is_null() {
                    break;
                }
                // SAFETY: librados returned (pointer, length) pairs valid until the next call.
                let key = unsafe { std::slice::from_raw_parts(k as *const u8, kl) }.to_vec();
                let val = if v.is_null() { Vec::new() } else { unsafe { std::slice::from_raw_parts(v as *const u8, vl) }.to_vec() };
                entries.push((key, val));
            }
        }
        Ok(OmapPage { entries, more: self.mores[i] != 0 })
    }

    fn take_read_buffer(&self) -> Vec<u8> {
        std::mem::take(&mut *self.read_buf.lock().expect("op state"))
    }
}

impl Drop for OpState {
    fn drop(&mut self) {
        // SAFETY: the last reference goes only after the callback ran (it holds one), so the
        // operation is complete; each handle is released exactly once.
        unsafe {
            for it in self.iters.iter() {
                if !it.is_null() {
                    ffi::rados_omap_get_end(*it);
                }
            }
            match self.handle {
                OpHandle::Write(h) => ffi::rados_release_write_op(h),
                OpHandle::Read(h) => ffi::rados_release_read_op(h),
                OpHandle::None => {}
            }
            let c = *self.completion.get_mut().expect("op state");
            if !c.is_null() {
                ffi::rados_aio_release(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cls_lock_assert_encoding() {
        let e = encode_cls_lock_assert("owner", "c1");
        // version 1, compat 1, length, "owner", type 1, "c1", ""
        let mut expect = vec![1, 1];
        let body: Vec<u8> = [&5u32.to_le_bytes()[..], b"owner", &[1], &2u32.to_le_bytes(), b"c1", &0u32.to_le_bytes()].concat();
        expect.extend_from_slice(&(body.len() as u32).to_le_bytes());
        expect.extend_from_slice(&body);
        assert_eq!(e, expect);
    }
}
