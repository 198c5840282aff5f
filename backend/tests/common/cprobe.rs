//! Values a C program prints, compiled with gcc against the system's
//! headers: the ABI tests compare ours with them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;

/// Compiles `tests/c/<name>.c` (with `args`), runs it and reads its
/// `key value` lines; `needs` says which packages the headers come from.
pub fn c_values(name: &str, args: &[&str], needs: &str) -> BTreeMap<String, i64> {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(name);
    let src = format!("{}/tests/c/{name}.c", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("gcc")
        .args(["-Wall", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(args)
        .output()
        .expect("gcc is needed (the README test command installs it)");
    assert!(
        out.status.success(),
        "compiling {src} failed (needs {needs}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}
