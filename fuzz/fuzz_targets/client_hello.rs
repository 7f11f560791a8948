//! The ClientHello parser behind the SNI check: see `oracles::client_hello`.
#![no_main]

#[path = "../oracles.rs"]
mod oracles;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oracles::client_hello(data));
