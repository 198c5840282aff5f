//! The block script's `params` grammar: whatever the toolstack passes, the
//! parse is an error or a disk spec whose paths are absolute and free of `..`
//! (and whose RBD names are printable, separator-free and round-trip).
#![no_main]

use blkbackd::hotplug::Params;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match Params::parse(s) {
        Ok(Params::Block(p)) | Ok(Params::File(p)) | Ok(Params::Direct(p)) => {
            assert!(p.is_absolute());
            assert!(!p.components().any(|c| c == std::path::Component::ParentDir));
        }
        Ok(Params::Snapshot(t)) => {
            assert!(!t.contains('/') && !t.starts_with('.') && !t.is_empty())
        }
        Ok(Params::Rbd(spec)) => {
            // Names a Xenstore value can carry, and that read back the same.
            for n in [&spec.pool, &spec.image]
                .into_iter()
                .chain(spec.namespace.as_ref())
                .chain(spec.snap.as_ref())
            {
                assert!(
                    !n.is_empty()
                        && n.bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@')
                );
            }
            assert_eq!(
                blkbackd::rbd::Spec::parse(&spec.to_string()).as_ref(),
                Ok(&spec)
            );
        }
        Ok(Params::Thin { pool, id, sectors }) => {
            assert!(!pool.is_empty() && !pool.contains('/') && pool != "." && pool != "..");
            assert!(id < 1 << 24 && sectors > 0);
        }
        Err(_) => {}
    }
});
