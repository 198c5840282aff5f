//! Names the git commit the binary is built from (`blkbackd --version`, the
//! log's first line, the metrics' `blkbackd_build_info`): `BLKBACKD_COMMIT`
//! from the environment when set (a build from a source package), else
//! `git describe` of the checkout, else "unknown".
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BLKBACKD_COMMIT");
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Where git keeps them: `.git/` in a clone, elsewhere in a worktree
    // (whose `.git` is a file), so a new commit re-runs this script in both.
    for f in ["HEAD", "index"] {
        let p = Command::new("git")
            .args(["rev-parse", "--path-format=absolute", "--git-path", f])
            .current_dir(&top)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| std::path::PathBuf::from(s.trim()));
        if let Some(p) = p.filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let commit = std::env::var("BLKBACKD_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args([
                "describe",
                "--always",
                "--dirty",
                "--abbrev=12",
                "--exclude=*",
            ])
            .current_dir(&top)
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !s.is_empty()).then_some(s)
    });
    println!(
        "cargo:rustc-env=BLKBACKD_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".to_owned())
    );
}
