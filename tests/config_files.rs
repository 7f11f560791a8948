//! Every shipped config parses; every file in `tests/config_invalid/` fails with the message and
//! line its first comment promises; the command line's `--check` and `--print-default-config`.

use std::path::Path;
use std::process::Command;

use portcullis::Config;

#[test]
fn every_shipped_config_is_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
    }
    assert!(seen >= 1);
}

#[test]
fn every_invalid_config_fails_with_its_line_and_reason() {
    let mut seen = 0;
    for entry in std::fs::read_dir("tests/config_invalid").unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks a '# expect: ' first line", path.display()));
        let error = Config::load(&path).expect_err(&path.display().to_string());
        let message = error.to_string();
        let wanted = match expect.split_once(": ") {
            Some((line, text)) if line.parse::<usize>().is_ok() => {
                format!("{}:{line}: {text}", path.display())
            }
            _ => expect.to_string(),
        };
        assert!(
            message.contains(&wanted),
            "{}:\n  wanted: {wanted}\n  got:    {message}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 10);
}

fn portcullis(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_exits_zero_or_one_with_line_numbers() {
    let (code, out) = portcullis(&["--config", "config/portcullis.toml", "--check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");
    let bad = Path::new("tests/config_invalid/bad_pattern.toml");
    let (code, out) = portcullis(&["--config", bad.to_str().unwrap(), "--check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad_pattern.toml:6: "), "{out}");
}

#[test]
fn print_default_config_is_the_shipped_file() {
    let (code, out) = portcullis(&["--print-default-config"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        std::fs::read_to_string("config/portcullis.toml").unwrap()
    );
}
