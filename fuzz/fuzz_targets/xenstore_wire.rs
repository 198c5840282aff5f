//! The Xenstore wire decoder over arbitrary bytes: every frame it accepts
//! lies inside the buffer; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenstore::wire::Message;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match Message::decode(&data[at..]) {
            Ok(Some((_m, used))) => {
                assert!(used > 0 && at + used <= data.len());
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
