//! The librados C declarations the RADOS spool uses.
//!
//! The `ceph` crate (ceph-rust) declares the handle types and the v1 calls; it lacks the
//! binary-safe v2 omap calls and `rados_aio_create_completion2`, which pacific's
//! `librados.h` has, so those are declared here against the same library.

#![allow(non_camel_case_types)]

pub use ceph::rados::{
    rados_aio_get_return_value, rados_aio_read, rados_aio_release, rados_aio_remove, rados_aio_write_op_operate,
    rados_aio_read_op_operate, rados_callback_t, rados_completion_t, rados_conf_read_file, rados_conf_set, rados_connect,
    rados_create2, rados_create_read_op, rados_create_write_op, rados_ioctx_create, rados_ioctx_destroy,
    rados_ioctx_set_namespace, rados_ioctx_t, rados_lock_exclusive, rados_nobjects_list_close,
    rados_nobjects_list_open, rados_list_ctx_t, rados_omap_get_end, rados_omap_iter_t,
    rados_read_op_assert_exists, rados_read_op_t, rados_release_read_op, rados_release_write_op, rados_shutdown, rados_t, rados_unlock,
    rados_write_op_create, rados_write_op_exec, rados_write_op_t, rados_write_op_write_full,
};

use libc::{c_char, c_int, c_uchar, c_void, size_t};

/// `LIBRADOS_LOCK_FLAG_MAY_RENEW`: renew the lock if this cookie already holds it.
pub const LOCK_FLAG_MAY_RENEW: u8 = 1;
/// `LIBRADOS_CMPXATTR_OP_EQ`, also used by omap_cmp.
pub const CMP_OP_EQ: u8 = 1;

#[link(name = "rados")]
extern "C" {
    pub fn rados_aio_create_completion2(
        cb_arg: *mut c_void,
        cb_complete: rados_callback_t,
        pc: *mut rados_completion_t,
    ) -> c_int;

    pub fn rados_write_op_omap_set2(
        write_op: rados_write_op_t,
        keys: *const *const c_char,
        vals: *const *const c_char,
        key_lens: *const size_t,
        val_lens: *const size_t,
        num: size_t,
    );

    pub fn rados_write_op_omap_rm_keys2(
        write_op: rados_write_op_t,
        keys: *const *const c_char,
        key_lens: *const size_t,
        keys_len: size_t,
    );

    pub fn rados_write_op_omap_cmp2(
        write_op: rados_write_op_t,
        key: *const c_char,
        comparison_operator: u8,
        val: *const c_char,
        key_len: size_t,
        val_len: size_t,
        prval: *mut c_int,
    );

    pub fn rados_read_op_omap_get_vals2(
        read_op: rados_read_op_t,
        start_after: *const c_char,
        filter_prefix: *const c_char,
        max_return: u64,
        iter: *mut rados_omap_iter_t,
        pmore: *mut c_uchar,
        prval: *mut c_int,
    );

    pub fn rados_read_op_omap_get_keys2(
        read_op: rados_read_op_t,
        start_after: *const c_char,
        max_return: u64,
        iter: *mut rados_omap_iter_t,
        pmore: *mut c_uchar,
        prval: *mut c_int,
    );

    pub fn rados_read_op_omap_get_vals_by_keys2(
        read_op: rados_read_op_t,
        keys: *const *const c_char,
        num_keys: size_t,
        key_lens: *const size_t,
        iter: *mut rados_omap_iter_t,
        prval: *mut c_int,
    );

    // ceph 3.2.5 declares this with one pointer level too many.
    pub fn rados_nobjects_list_next(
        ctx: rados_list_ctx_t,
        entry: *mut *const c_char,
        key: *mut *const c_char,
        nspace: *mut *const c_char,
    ) -> c_int;

    pub fn rados_omap_get_next2(
        iter: rados_omap_iter_t,
        key: *mut *mut c_char,
        val: *mut *mut c_char,
        key_len: *mut size_t,
        val_len: *mut size_t,
    ) -> c_int;
}
