//! The embedded Xenstore server's request handling: a sequence of requests
//! from an unprivileged or privileged domain, mostly well framed (correct
//! header lengths, NUL-terminated paths under the domain's home), rarely
//! anything. The server must answer or drop the connection, never panic.
#![no_main]

use blkbackd_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use xenstore::{DomId, Server};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let server = Server::default();
    server.introduce(DomId(1));
    let domid = if inp.byte() & 1 == 0 {
        DomId(0)
    } else {
        DomId(1)
    };
    let mut bytes = Vec::new();
    for _ in 0..8 {
        let op = u32::from(inp.byte() % 26);
        let req_id = inp.u32();
        let tx = if inp.rarely() { inp.u32() } else { 0 };
        let n = usize::from(inp.byte() % 64);
        let mut payload = Vec::new();
        if !inp.rarely() {
            payload.extend_from_slice(b"/local/domain/1/");
        }
        payload.extend_from_slice(inp.take(n));
        if !inp.rarely() {
            payload.push(0);
        }
        let len = if inp.rarely() {
            inp.u32()
        } else {
            payload.len() as u32
        };
        for v in [op, req_id, tx, len] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&payload);
    }
    bytes.extend_from_slice(inp.rest());
    let _ = server.handle_bytes(domid, &bytes);
});
