//! The fuzz targets' properties on the stable toolchain: every seed in `tests/fuzz_corpus/`,
//! every input a fuzzer found a failure with (named tests below, one per finding), and a
//! bounded run of deterministic mutations of the seeds.
//!
//! The properties live in `fuzz/oracles.rs`, shared with the libFuzzer targets in
//! `fuzz/fuzz_targets/`, so both check exactly the same things. `PORTCULLIS_FUZZ_CASES` sets
//! the mutated inputs per target (default 2000); `PORTCULLIS_FUZZ_SEED` the generator's seed;
//! `PORTCULLIS_FUZZ_DUMP` a directory to write failing inputs to.
//! No sockets: nothing here needs the network namespace the other integration tests use.

#[path = "../fuzz/oracles.rs"]
mod oracles;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

type Oracle = fn(&[u8]);

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no seeds", dir.display());
    files
}

/// Runs `oracle` on each input, collecting failures instead of stopping at the first.
fn run_all(oracle: Oracle, inputs: impl IntoIterator<Item = (String, Vec<u8>)>) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, input) in inputs {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| oracle(&input))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let message: String = message.chars().take(400).collect();
            failures.push(format!("{name} ({} bytes): {message}", input.len()));
            if let Some(dir) = std::env::var_os("PORTCULLIS_FUZZ_DUMP").filter(|d| !d.is_empty()) {
                let path = PathBuf::from(dir).join(name.replace(' ', "-"));
                std::fs::write(&path, &input).unwrap();
                eprintln!("failing input written to {}", path.display());
            }
        }
    }
    failures
}

fn assert_none(target: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{target}: {} input(s) fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Seeds

#[test]
fn host_seeds() {
    assert_none("host", run_all(oracles::host, corpus("host")));
}

#[test]
fn client_hello_seeds() {
    assert_none(
        "client_hello",
        run_all(oracles::client_hello, corpus("client_hello")),
    );
}

#[test]
fn request_head_seeds() {
    assert_none(
        "request_head",
        run_all(oracles::request_head, corpus("request_head")),
    );
}

#[test]
fn proxy_header_seeds() {
    assert_none(
        "proxy_header",
        run_all(oracles::proxy_header, corpus("proxy_header")),
    );
}

/// The captured ClientHellos are what real clients send: each must yield its server name.
#[test]
fn real_client_hellos_name_their_server() {
    use portcullis::sni::{Hello, inspect};
    for (file, name) in [
        (
            "chromium-appstream2-auth",
            "appstream2.us-east-1.aws.amazon.com",
        ),
        ("curl-openssl-tls13-gateway", "gw1.amazonappstream.com"),
        (
            "curl-openssl-tls12-cloudfront",
            "d111abcdef8.cloudfront.net",
        ),
        (
            "python-ssl-vpce",
            "vpce-0abc-1234.streaming.appstream.eu-west-1.vpce.amazonaws.com",
        ),
        ("curl-split-7-byte-records", "gw1.amazonappstream.com"),
        ("curl-split-1-byte-records", "gw1.amazonappstream.com"),
    ] {
        let bytes = corpus("client_hello")
            .into_iter()
            .find(|(n, _)| n == file)
            .unwrap_or_else(|| panic!("{file}: missing"))
            .1;
        assert_eq!(
            inspect(&bytes),
            Some(Hello::Tls(Some(name.into()))),
            "{file}"
        );
        assert_eq!(
            oracles::rustls_server_name(&bytes),
            Some(Some(name.into())),
            "{file}: rustls"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations: a small, deterministic stand-in for a coverage-guided fuzzer, so the properties
// get fresh inputs on every `cargo test` without nightly.

/// xorshift64*: deterministic, dependency-free, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens worth splicing in, per target (the same spirit as `fuzz/dicts/`).
fn tokens(target: &str) -> &'static [&'static [u8]] {
    match target {
        "host" => &[
            b".",
            b"*.",
            b"*",
            b"-",
            b"_",
            b"0x",
            b"xn--",
            b"amazonappstream.com",
            b"\n",
            b":",
            b"[",
            b"]",
            b"@",
            b"%2e",
            b"443",
            b"cloudfront.net",
            b"aws.amazon.com",
        ],
        "proxy_header" => &[
            b"PROXY ",
            b"TCP4 ",
            b"TCP6 ",
            b"UNKNOWN",
            b"\r\n",
            b"\r\n\r\n\0\r\nQUIT\n",
            b"\x21\x11",
            b"\x20\x00",
            b"\xea\x00\x05\x01vpce",
            b"\xff\xff",
            b" ",
            b"0",
        ],
        "client_hello" => &[
            b"\x16\x03\x01",
            b"\x00\x00",
            b"\x01\x00",
            b"\xff\xff",
            b"\x00",
            b"gw1.amazonappstream.com",
            b"EVIL.example.",
        ],
        _ => &[
            b"\r\n",
            b"\n",
            b"\r",
            b"\r\n\r\n",
            b"CONNECT ",
            b"GET ",
            b" HTTP/1.1",
            b" HTTP/1.0",
            b"Content-Length: 0\r\n",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"http://",
            b"@",
            b"#",
            b"\0",
            b" ",
            b"\t",
        ],
    }
}

fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)], target: &str) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 => {
                let list = tokens(target);
                let token = list[rng.below(list.len())];
                data.splice(at..at, token.iter().copied());
            }
            3 => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            4 => {
                let end = (at + rng.below(32)).min(data.len());
                let copy = data[at..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, copy);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len() + 1);
                let tail = other[from..].to_vec();
                data.truncate(at);
                data.extend(tail);
            }
            _ => data.truncate(at),
        }
    }
    data
}

fn mutated(target: &str, oracle: Oracle) {
    let cases: usize = std::env::var("PORTCULLIS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("PORTCULLIS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f022);
    let seeds = corpus(target);
    let mut rng = Rng(seed | 1);
    let inputs = (0..cases).map(|i| (format!("case {i}"), mutate(&mut rng, &seeds, target)));
    let mut failures = run_all(oracle, inputs);
    let total = failures.len();
    failures.truncate(10);
    if total > 10 {
        failures.push(format!("... and {} more", total - 10));
    }
    assert_none(&format!("{target} (seed {seed})"), failures);
}

#[test]
fn host_mutated() {
    mutated("host", oracles::host);
}

#[test]
fn client_hello_mutated() {
    mutated("client_hello", oracles::client_hello);
}

#[test]
fn request_head_mutated() {
    mutated("request_head", oracles::request_head);
}

#[test]
fn proxy_header_mutated() {
    mutated("proxy_header", oracles::proxy_header);
}

// ---------------------------------------------------------------------------------------------
// Findings: one test per distinct failure a fuzzer found, with the smallest input that shows it.
// They fail until the code is fixed; see fuzz/README.md.

/// Finding 1 (libFuzzer, `request_head`, within seconds; minimized by `cargo fuzz tmin`):
/// `check_head` passes a head with a `Transfer-Encoding` that hyper's server refuses, so the
/// client gets hyper's bare `400 Bad Request` (no `Proxy-Status`, no body, not logged or
/// counted by portcullis) instead of the proxy's 405/400. `check_framing` only looks at
/// `Transfer-Encoding` on CONNECT; hyper refuses it on any request where `chunked` is not the
/// last coding, and on any HTTP/1.0 request.
#[test]
fn finding_1_transfer_encoding_not_chunked_on_other_methods() {
    oracles::request_head(b"O h HTTP/1.1\nTransfer-Encoding:\n\n");
}

#[test]
fn finding_1_transfer_encoding_gzip_on_get() {
    oracles::request_head(
        b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip\r\n\r\n",
    );
}

#[test]
fn finding_1_transfer_encoding_on_http_1_0() {
    oracles::request_head(
        b"POST http://a.example/ HTTP/1.0\r\nHost: a.example\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
}

/// Finding 1, the same gap on `Content-Length` (found reading hyper's parser after finding 1,
/// confirmed by `tests/hostile.rs`): `check_framing` takes any run of digits on a method other
/// than CONNECT, hyper refuses a length that does not fit its u64.
#[test]
fn finding_1_content_length_over_u64_on_other_methods() {
    oracles::request_head(
        b"POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\
          Content-Length: 99999999999999999999\r\n\r\n",
    );
}

/// Finding 2 (the `request_head` oracle on the boundary of the fix for finding 1, at
/// 03fb0d0): a `Content-Length` of 2^64 - 1 or 2^64 - 2 fits in a u64, so `check_framing`
/// passes it on a method other than CONNECT, but hyper takes lengths up to 2^64 - 3 only
/// (`DecodedLength::MAX_LEN`) and answers its bare 400 without `Proxy-Status`.
#[test]
fn finding_2_content_length_u64_max_on_other_methods() {
    oracles::request_head(
        b"POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\
          Content-Length: 18446744073709551615\r\n\r\n",
    );
}

#[test]
fn finding_2_content_length_u64_max_minus_1_on_other_methods() {
    oracles::request_head(
        b"POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\
          Content-Length: 18446744073709551614\r\n\r\n",
    );
}

/// The largest length hyper takes: accepted by both.
#[test]
fn content_length_u64_max_minus_2_is_fine() {
    oracles::request_head(
        b"POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\
          Content-Length: 18446744073709551613\r\n\r\n",
    );
}
