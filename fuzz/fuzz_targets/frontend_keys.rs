//! Guest-written xenbus keys: the frontend directory holds whatever the
//! guest wrote (mostly plausible numbers, rarely anything), and reading it
//! must give a configuration within what we offered, or an error.
#![no_main]

use std::sync::OnceLock;

use blkbackd::vbd::frontend;
use blkbackd_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use xenstore::{Client, Server, Xs};

struct World {
    rt: tokio::runtime::Runtime,
    xs: Client,
    _server: Server,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let server = Server::default();
        let xs = rt.block_on(async {
            Client::from_stream(server.connect_as(xenstore::DomId(0)).expect("connect"))
        });
        World {
            rt,
            xs,
            _server: server,
        }
    })
}

const KEYS: [&str; 8] = [
    "ring-ref",
    "ring-ref0",
    "ring-page-order",
    "event-channel",
    "multi-queue-num-queues",
    "queue-0/ring-ref",
    "queue-0/event-channel",
    "protocol",
];

fn value(inp: &mut Input) -> Vec<u8> {
    if inp.rarely() {
        let n = usize::from(inp.byte() % 24);
        return inp.take(n).to_vec();
    }
    match inp.byte() % 4 {
        0 => u64::from(inp.byte() % 8).to_string().into_bytes(),
        1 => inp.u32().to_string().into_bytes(),
        2 => b"x86_64-abi".to_vec(),
        _ => (u64::from(inp.u32()) * 7).to_string().into_bytes(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let w = world();
    let fe = "/local/domain/1/device/vbd/51712";
    let max_order = u32::from(inp.byte() % 5);
    let max_queues = u32::from(inp.byte() % 4) + 1;
    w.rt.block_on(async {
        let _ = w.xs.rm(fe).await;
        for k in KEYS {
            if !inp.rarely() || k == "ring-ref" {
                let v = value(&mut inp);
                let _ = w.xs.write(&format!("{fe}/{k}"), v).await;
            }
        }
        if let Ok(cfg) = frontend::read(&w.xs, fe, max_order, max_queues).await {
            assert!(cfg.order <= max_order, "ring order beyond the offer");
            assert!(!cfg.queues.is_empty() && cfg.queues.len() as u32 <= max_queues);
            for q in &cfg.queues {
                assert_eq!(q.refs.len(), 1 << cfg.order);
            }
        }
    });
});
