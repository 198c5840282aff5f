//! Crypt keys: read from a key file, handed to the kernel as hex in a
//! `crypt` table line, never printed.

use std::fmt;
use std::path::Path;

/// A crypt key: hex, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(String);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// Reads a raw key from `path` (16 to 64 bytes).
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
        if !(16..=64).contains(&raw.len()) {
            return Err(format!(
                "key file {} holds {} bytes, not 16 to 64",
                path.display(),
                raw.len()
            ));
        }
        Ok(Key(raw.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The key in hex, as a `crypt` table line carries it: never log it.
    pub(super) fn hex(&self) -> &str {
        &self.0
    }
}
