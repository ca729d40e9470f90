//! `ngx_stream_gpugate_module`: routes each stream connection by its local port, or by its
//! TLS server name, through the gpugate route table, with no nginx reload when routes change.
//!
//! This file holds the module wiring only (context, command table, `ngx_module_t`). The
//! decision per connection is plain Rust in [`route_source`]; the nginx glue (`conf`,
//! `handler`, `balancer`, and the FFI floor `ffi` under them) is left out of test builds because a test binary cannot link
//! nginx's symbols — it is tested through a real nginx in `tests/`.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod hello_scan;
mod names;
pub mod route_source;
mod sink;
pub mod sni;

#[cfg(not(test))]
mod balancer;
#[cfg(not(test))]
mod conf;
#[cfg(not(test))]
mod ffi;
#[cfg(not(test))]
mod handler;
#[cfg(not(test))]
mod live;
#[cfg(not(test))]
mod notices;
#[cfg(not(test))]
mod session;

#[cfg(not(test))]
pub use wiring::ngx_stream_gpugate_module;

#[cfg(not(test))]
mod wiring {
    use std::ffi::c_void;

    use ngx::ffi::{
        ngx_command_t, ngx_conf_set_flag_slot, ngx_module_t, ngx_stream_module_t, ngx_uint_t,
        NGX_CONF_FLAG, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_STREAM_MAIN_CONF,
        NGX_STREAM_MAIN_CONF_OFFSET, NGX_STREAM_MODULE, NGX_STREAM_SRV_CONF,
        NGX_STREAM_SRV_CONF_OFFSET, NGX_STREAM_UPS_CONF,
    };
    use ngx::ngx_string;

    use crate::{balancer, conf, ffi, handler};

    /// The first callback of each `stream {}` configuration: records this module's context
    /// slot for the code below the wiring ([`ffi::ctx_index`]), then makes the main
    /// configuration.
    unsafe extern "C" fn create_main_conf(cf: *mut ngx::ffi::ngx_conf_t) -> *mut c_void {
        // SAFETY: nginx writes ctx_index while loading modules, before any configuration
        // callback of this module runs; afterwards it is only read.
        ffi::record_ctx_index(unsafe { (*std::ptr::addr_of!(ngx_stream_gpugate_module)).ctx_index });
        // SAFETY: called by nginx with its configuration, as conf::create_main_conf expects.
        unsafe { conf::create_main_conf(cf) }
    }

    static MODULE_CTX: ngx_stream_module_t = ngx_stream_module_t {
        preconfiguration: Some(handler::preconfiguration),
        postconfiguration: Some(handler::postconfiguration),
        create_main_conf: Some(create_main_conf),
        init_main_conf: Some(conf::init_main_conf),
        create_srv_conf: Some(conf::create_srv_conf),
        merge_srv_conf: Some(conf::merge_srv_conf),
    };

    // nginx takes `*mut` command and context pointers but never writes through them.
    static mut COMMANDS: [ngx_command_t; 7] = [
        ngx_command_t {
            name: ngx_string!("gpugate_route_table"),
            type_: (NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
            set: Some(conf::cmd_set_route_table),
            conf: NGX_STREAM_MAIN_CONF_OFFSET,
            offset: 0,
            post: std::ptr::null_mut(),
        },
        ngx_command_t {
            name: ngx_string!("gpugate_route"),
            type_: (NGX_STREAM_SRV_CONF | NGX_CONF_FLAG) as ngx_uint_t,
            set: Some(ngx_conf_set_flag_slot),
            conf: NGX_STREAM_SRV_CONF_OFFSET,
            offset: std::mem::offset_of!(conf::SrvConf, route),
            post: std::ptr::null_mut(),
        },
        ngx_command_t {
            name: ngx_string!("gpugate_flush_interval"),
            type_: (NGX_STREAM_MAIN_CONF | NGX_STREAM_SRV_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
            set: Some(conf::cmd_set_flush_interval),
            conf: NGX_STREAM_SRV_CONF_OFFSET,
            offset: 0,
            post: std::ptr::null_mut(),
        },
        ngx_command_t {
            name: ngx_string!("gpugate_name_route"),
            type_: (NGX_STREAM_SRV_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
            set: Some(conf::cmd_set_name_route),
            conf: NGX_STREAM_SRV_CONF_OFFSET,
            offset: 0,
            post: std::ptr::null_mut(),
        },
        ngx_command_t {
            name: ngx_string!("gpugate_name_domain"),
            type_: (NGX_STREAM_MAIN_CONF | NGX_STREAM_SRV_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
            set: Some(conf::cmd_set_name_domain),
            conf: NGX_STREAM_SRV_CONF_OFFSET,
            offset: 0,
            post: std::ptr::null_mut(),
        },
        ngx_command_t {
            name: ngx_string!("gpugate_balancer"),
            type_: (NGX_STREAM_UPS_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
            set: Some(balancer::cmd_set_balancer),
            conf: NGX_STREAM_SRV_CONF_OFFSET,
            offset: 0,
            post: std::ptr::null_mut(),
        },
        ngx_command_t::empty(),
    ];

    /// The module record nginx loads (`load_module modules/ngx_stream_gpugate_module.so`).
    #[no_mangle]
    #[allow(non_upper_case_globals)]
    pub static mut ngx_stream_gpugate_module: ngx_module_t = ngx_module_t {
        ctx: std::ptr::addr_of!(MODULE_CTX) as *mut c_void,
        commands: std::ptr::addr_of_mut!(COMMANDS) as *mut ngx_command_t,
        type_: NGX_STREAM_MODULE as ngx_uint_t,
        init_process: Some(handler::init_process),
        exit_process: Some(handler::exit_process),
        ..ngx_module_t::default()
    };

    ngx::ngx_modules!(ngx_stream_gpugate_module);
}
