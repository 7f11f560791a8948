//! The PROXY protocol header parser: see `oracles::proxy_header`.
#![no_main]

#[path = "../oracles.rs"]
mod oracles;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oracles::proxy_header(data));
