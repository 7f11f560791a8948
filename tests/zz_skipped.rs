//! The last test binary of `cargo test` (binaries run in name order): one visible summary of
//! every test that skipped for a missing tool in this run, and how to install what it needed.
//! Without it a fresh clone reports those tests as `ok` and nobody learns they never ran.

mod support;

use std::io::Write;

#[test]
fn summary_of_skipped_tests() {
    let list = support::skips_file();
    let Ok(text) = std::fs::read_to_string(&list) else {
        return;
    };
    let _ = std::fs::remove_file(&list);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        return;
    }
    let mut out = format!(
        "\n==== {} test(s) did not run: a tool they drive is missing ====\n",
        lines.len()
    );
    for line in &lines {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str(
        "Install them with .ci/client-tools (Chromium, curl, Python clients, HAProxy) and\n\
         .ci/observability-checks (Prometheus, promtool, pacparser); with\n\
         PORTCULLIS_REQUIRE_TOOLS=1 (as CI runs) a missing tool fails its test instead.\n",
    );
    // Straight to stderr: a passing test's `eprintln!` is captured and never shown.
    let _ = std::io::stderr().write_all(out.as_bytes());
}
