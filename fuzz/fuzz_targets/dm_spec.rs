//! The device-mapper table-spec parser and the name checks: a spec that
//! parses is contiguous from sector 0; a name that passes can never leave
//! /dev/mapper.
#![no_main]

use blkbackd::disk::dm::{validate_name, Table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Table::parse(s) {
        let mut at = 0;
        for l in &t.0 {
            assert_eq!(l.start, at);
            assert!(l.len > 0);
            at += l.len;
        }
    }
    if validate_name(s).is_ok() {
        assert!(!s.contains('/') && s != "." && s != ".." && s != "control" && s.len() < 128);
    }
});
