use std::cell::RefCell;

use super::ioctl::{cstr_at, encode_table, u32_at, u64_at, Req, HEADER, READONLY_FLAG};
use super::*;

#[test]
fn names_that_could_escape_or_that_the_kernel_refuses_are_rejected() {
    for bad_name in [
        "",
        ".",
        "..",
        "control",
        "a/b",
        "../x",
        "has space",
        &"x".repeat(128),
    ] {
        assert!(validate_name(bad_name).is_err(), "{bad_name:?} accepted");
    }
    for ok in ["blkbackd-3-51712", "blkbackd-3-51712-cow", &"x".repeat(127)] {
        validate_name(ok).unwrap();
    }
    assert_eq!(
        vbd_name(3, 51712, Some("cow")).unwrap(),
        "blkbackd-3-51712-cow"
    );
    assert!(vbd_name(3, 51712, Some("a/b")).is_err());
}

#[test]
fn uuids_are_ours_bounded_and_unique() {
    assert!(validate_uuid("LVM-abc").is_err());
    assert!(validate_uuid("BLKBACKD-").is_err());
    assert!(validate_uuid(&format!("BLKBACKD-{}", "x".repeat(120))).is_err());
    assert!(validate_uuid("BLKBACKD-a b").is_err());
    let a = new_uuid("blkbackd-1-2").unwrap();
    let b = new_uuid("blkbackd-1-2").unwrap();
    assert!(a.starts_with("BLKBACKD-blkbackd-1-2-"));
    assert_ne!(a, b);
}

#[test]
fn the_spec_parser_reads_every_target_and_rejects_bad_specs_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let spec = format!(
        "# a disk\n0 100 linear 7:0 2048\n100 50 zero\n150 10 error\n\
         160 40 snapshot 254:1 254:2 P 16\n200 8 crypt aes-xts-plain64 keyfile={} 0 7:1 0\n",
        key.display()
    );
    let t = Table::parse(&spec).unwrap();
    assert_eq!(t.sectors(), 208);
    assert_eq!(
        t.0[0].target,
        Target::Linear {
            dev: DevRef { major: 7, minor: 0 },
            offset: 2048
        }
    );
    // The key is read from the file and never shows in Debug output.
    let dbg = format!("{t:?}");
    assert!(!dbg.contains("0707"), "{dbg}");
    assert!(dbg.contains("redacted"));
    let pool = Table::parse("0 1024 thin-pool 7:2 7:3 128 16\n").unwrap();
    assert_eq!(pool.0[0].target.kind(), "thin-pool");
    Table::parse("0 1024 thin 254:5 3").unwrap();
    Table::parse("0 1024 snapshot-origin 254:5").unwrap();
    for (spec, wants) in [
        ("", "at least one line"),
        ("0 100 linear 7:0", "takes 2 arguments"),
        ("10 100 zero", "not 0"),
        ("0 100 zero\n101 5 zero", "line 2"),
        ("0 0 zero", "no sectors"),
        ("0 100 linear 7-0 0", "MAJOR:MINOR"),
        ("0 100 linear 7:0 -1", "decimal"),
        ("0 100 striped 2 7:0 0", "unknown target type"),
        ("0 100 crypt aes 00112233 0 7:0 0", "keyfile="),
        (
            "0 100 crypt aes keyfile=/nonexistent 0 7:0 0",
            "cannot read key file",
        ),
        ("0 100 snapshot 1:1 1:2 X 16", "P or N"),
        ("0 100 snapshot 1:1 1:2 P 12", "power of two"),
        ("0 100 thin-pool 1:1 1:2 100 0", "multiple of 64"),
        ("0 99999999999999999999 zero", "too large"),
        ("0 18446744073709551615 zero", "too long"),
    ] {
        let e = Table::parse(spec).unwrap_err().to_string();
        assert!(e.contains(wants), "{spec:?}: {e}");
    }
}

#[test]
fn table_load_payload_follows_dm_target_spec() {
    let t = Table(vec![
        Line {
            start: 0,
            len: 8,
            target: Target::Linear {
                dev: DevRef { major: 7, minor: 1 },
                offset: 16,
            },
        },
        Line {
            start: 8,
            len: 8,
            target: Target::Error,
        },
    ]);
    let b = encode_table(&t);
    // 40-byte spec + "7:1 16\0" padded to 48, then 40 + "\0" padded to 48.
    assert_eq!(b.len(), 96);
    assert_eq!(u64_at(&b, 0), 0);
    assert_eq!(u64_at(&b, 8), 8);
    assert_eq!(u32_at(&b, 20), 48);
    assert_eq!(cstr_at(&b, 24, 16), "linear");
    assert_eq!(cstr_at(&b, 40, 8), "7:1 16");
    assert_eq!(u64_at(&b, 48), 8);
    assert_eq!(cstr_at(&b, 48 + 24, 16), "error");
    let r = Req::new(
        Some(&DevId::Name("blkbackd-1-2".into())),
        READONLY_FLAG,
        &b,
        HEADER,
    );
    assert_eq!(u32_at(&r.b, 0), 4);
    assert_eq!(u32_at(&r.b, 12) as usize, r.b.len());
    assert_eq!(u32_at(&r.b, 16), 312);
    assert_eq!(cstr_at(&r.b, 48, 128), "blkbackd-1-2");
    assert_eq!(r.b.len() % 8, 0);
}

#[test]
fn dev_numbers_decode_as_huge_encode_dev() {
    // major 253, minor 0x12345: (minor & 0xff) | major << 8 | (minor & ~0xff) << 12
    let d = 0x45u64 | (253 << 8) | ((0x12345u64 & !0xff) << 12);
    assert_eq!(decode_dev(d), (253, 0x12345));
}

/// Records the calls and fails the one named.
struct Faulty {
    fail: Option<&'static str>,
    calls: RefCell<Vec<&'static str>>,
}

impl Faulty {
    fn step(&self, s: &'static str) -> Result<(), DmError> {
        self.calls.borrow_mut().push(s);
        if self.fail == Some(s) {
            return Err(DmError::Ioctl {
                op: s,
                dev: "test".into(),
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }
}

impl DmOps for Faulty {
    fn load(&self, _: &DevId, _: &Table, _: bool) -> Result<(), DmError> {
        self.step("load")
    }
    fn suspend(&self, _: &DevId, _: bool) -> Result<(), DmError> {
        self.step("suspend")
    }
    fn resume(&self, _: &DevId) -> Result<(), DmError> {
        // A failing resume fails once; the rollback's resume succeeds.
        let n = self
            .calls
            .borrow()
            .iter()
            .filter(|c| **c == "resume")
            .count();
        if self.fail == Some("resume") && n > 0 {
            self.calls.borrow_mut().push("resume");
            return Ok(());
        }
        self.step("resume")
    }
    fn clear(&self, _: &DevId) -> Result<(), DmError> {
        self.step("clear")
    }
}

#[test]
fn a_swap_that_fails_at_any_step_clears_the_new_table_and_resumes_the_old() {
    let id = DevId::Name("blkbackd-1-2".into());
    let t = Table::single(8, Target::Zero);
    for (fail, want) in [
        (None, vec!["load", "suspend", "resume"]),
        (Some("load"), vec!["load", "clear"]),
        (Some("suspend"), vec!["load", "suspend", "clear", "resume"]),
        (
            Some("resume"),
            vec!["load", "suspend", "resume", "clear", "resume"],
        ),
    ] {
        let ops = Faulty {
            fail,
            calls: RefCell::new(Vec::new()),
        };
        let r = swap_table(&ops, &id, &t, false);
        assert_eq!(*ops.calls.borrow(), want, "failing {fail:?}");
        match fail {
            None => r.unwrap(),
            Some(step) => {
                let e = r.unwrap_err();
                assert!(
                    matches!(&e, DmError::SwapRolledBack { step: s, .. } if *s == step),
                    "{e}"
                );
                // Whatever failed, the device ends resumed (never suspended).
                let calls = ops.calls.borrow();
                let last_suspend = calls.iter().rposition(|c| *c == "suspend");
                let last_resume = calls.iter().rposition(|c| *c == "resume");
                assert!(last_suspend.is_none() || last_resume > last_suspend);
            }
        }
    }
    // An invalid table never reaches the kernel.
    let ops = Faulty {
        fail: None,
        calls: RefCell::new(Vec::new()),
    };
    assert!(swap_table(&ops, &id, &Table(vec![]), false).is_err());
    assert!(ops.calls.borrow().is_empty());
}

#[test]
fn revoke_swaps_to_an_error_table_of_the_same_size_without_flushing() {
    struct Seen(RefCell<Option<Table>>, RefCell<Vec<bool>>);
    impl DmOps for Seen {
        fn load(&self, _: &DevId, t: &Table, _: bool) -> Result<(), DmError> {
            *self.0.borrow_mut() = Some(t.clone());
            Ok(())
        }
        fn suspend(&self, _: &DevId, noflush: bool) -> Result<(), DmError> {
            self.1.borrow_mut().push(noflush);
            Ok(())
        }
        fn resume(&self, _: &DevId) -> Result<(), DmError> {
            Ok(())
        }
        fn clear(&self, _: &DevId) -> Result<(), DmError> {
            Ok(())
        }
    }
    let s = Seen(RefCell::new(None), RefCell::new(vec![]));
    let id = DevId::Uuid("BLKBACKD-blkbackd-1-2-00000000000000aa".into());
    revoke(&s, &id, 4096).unwrap();
    // A flushing suspend would wait for the I/O a thin volume of a full
    // pool holds (until the pool's no-space timeout); noflush requeues it
    // onto the error table. An ordinary swap flushes.
    assert_eq!(*s.1.borrow(), [true]);
    swap_table(&s, &id, &Table::single(8, Target::Zero), false).unwrap();
    assert_eq!(*s.1.borrow(), [true, false]);
    assert_eq!(s.0.into_inner().unwrap(), Table::single(8, Target::Zero));
}

#[test]
fn an_operation_binds_to_the_disk_the_vbd_published_and_nothing_else() {
    let info = |major, minor| Info {
        name: "blkbackd-3-51712".into(),
        uuid: "BLKBACKD-blkbackd-3-51712-0123456789abcdef".into(),
        major,
        minor,
        open_count: 1,
        suspended: false,
        active: true,
        inactive: false,
    };
    let published = DiskId {
        major: 254,
        minor: 3,
        diskseq: 26,
    };
    check_published(&info(254, 3), 26, published).unwrap();
    // Re-created under the name: another diskseq (maybe the same minor).
    let e = check_published(&info(254, 3), 28, published).unwrap_err();
    assert_eq!(
        e.to_string(),
        "blkbackd-3-51712 is now 254:3 (diskseq 28), not the disk 254:3 (diskseq 26) \
         its vbd published: it was replaced; refusing to act on it"
    );
    // Another minor altogether.
    assert!(matches!(
        check_published(&info(254, 4), 26, published),
        Err(DmError::Replaced { .. })
    ));
}

#[test]
fn a_thin_table_names_its_pool_and_volume_and_nothing_else_does() {
    let line = |t: &str, p: &str| (0u64, 2048u64, t.to_owned(), p.to_owned());
    assert_eq!(thin_target(&[line("thin", "253:0 7")]), Some(((253, 0), 7)));
    assert_eq!(
        thin_target(&[line("thin", "253:4 16777215 7:3")]),
        Some(((253, 4), 16777215))
    );
    for bad in [
        vec![],
        vec![line("linear", "7:0 0")],
        vec![line("thin", "253:0")],
        vec![line("thin", "pool 7")],
        vec![line("thin", "253:0 x")],
        vec![line("thin", "253:0 7"), line("thin", "253:0 8")],
    ] {
        assert_eq!(thin_target(&bad), None, "{bad:?}");
    }
}
