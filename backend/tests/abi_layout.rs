//! Every size, offset and constant of `blkbackd::abi` against Debian's
//! `libxen-dev` headers, compiled with gcc for both the 64-bit and the i386
//! layout (the two request layouts a frontend may use).

#[path = "common/cprobe.rs"]
mod cprobe;
#[path = "common/tier.rs"]
mod tier;
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use tier::Tier;

use blkbackd::abi::blkif::*;
use blkbackd::abi::sys::*;

fn c_values(m32: bool) -> BTreeMap<String, i64> {
    if m32 {
        cprobe::c_values("abi_layout", &["-m32"], "libxen-dev and gcc-multilib")
    } else {
        cprobe::c_values("abi_layout", &[], "libxen-dev")
    }
}

fn check(c: &BTreeMap<String, i64>, ours: &[(&str, i64)]) {
    let mut bad = Vec::new();
    for (k, v) in ours {
        match c.get(*k) {
            Some(cv) if cv == v => {}
            other => bad.push(format!("{k}: C says {other:?}, we say {v}")),
        }
    }
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

macro_rules! sz {
    ($t:ty) => {
        size_of::<$t>() as i64
    };
}
macro_rules! off {
    ($t:ty, $f:ident) => {
        offset_of!($t, $f) as i64
    };
}

/// The request, discard, indirect and response entries of one ABI.
macro_rules! request_layouts {
    ($abi:expr, $req:ty, $dis:ty, $ind:ty, $rsp:ty) => {{
        let l = $abi.layout();
        vec![
            ("size.blkif_request", sz!($req)),
            ("off.blkif_request.handle", off!($req, handle)),
            ("off.blkif_request.id", l.id as i64),
            ("off.blkif_request.sector_number", l.sector as i64),
            ("off.blkif_request.seg", l.seg as i64),
            ("size.blkif_request_discard", sz!($dis)),
            ("off.blkif_request_discard.id", off!($dis, id)),
            (
                "off.blkif_request_discard.sector_number",
                off!($dis, sector_number),
            ),
            (
                "off.blkif_request_discard.nr_sectors",
                l.discard_nr_sectors as i64,
            ),
            ("size.blkif_request_indirect", sz!($ind)),
            ("off.blkif_request_indirect.id", l.ind_id as i64),
            (
                "off.blkif_request_indirect.sector_number",
                l.ind_sector as i64,
            ),
            ("off.blkif_request_indirect.handle", off!($ind, handle)),
            (
                "off.blkif_request_indirect.indirect_grefs",
                l.ind_grefs as i64,
            ),
            ("size.blkif_response", l.rsp as i64),
            ("off.blkif_response.id", off!($rsp, id)),
            ("off.blkif_response.operation", l.rsp_op as i64),
            ("off.blkif_response.status", l.rsp_status as i64),
        ]
    }};
}

fn common(entries_1: u32, entries_16: u32) -> Vec<(&'static str, i64)> {
    vec![
        ("size.blkif_request_segment", sz!(BlkifRequestSegment)),
        (
            "off.blkif_request_segment.gref",
            off!(BlkifRequestSegment, gref),
        ),
        (
            "off.blkif_request_segment.first_sect",
            off!(BlkifRequestSegment, first_sect),
        ),
        (
            "off.blkif_request_segment.last_sect",
            off!(BlkifRequestSegment, last_sect),
        ),
        ("off.blkif_request.operation", REQ_OPERATION as i64),
        ("off.blkif_request.nr_segments", REQ_NR_SEGMENTS as i64),
        ("off.blkif_request_discard.flag", REQ_NR_SEGMENTS as i64),
        (
            "off.blkif_request_indirect.indirect_op",
            REQ_NR_SEGMENTS as i64,
        ),
        (
            "off.blkif_request_indirect.nr_segments",
            REQ_IND_NR_SEGMENTS as i64,
        ),
        ("off.blkif_sring.req_prod", SRING_REQ_PROD as i64),
        ("off.blkif_sring.req_event", SRING_REQ_EVENT as i64),
        ("off.blkif_sring.rsp_prod", SRING_RSP_PROD as i64),
        ("off.blkif_sring.rsp_event", SRING_RSP_EVENT as i64),
        ("off.blkif_sring.ring", SRING_ENTRIES_OFFSET as i64),
        ("val.ring_entries_1", entries_1 as i64),
        ("val.ring_entries_16", entries_16 as i64),
        ("size.grant_entry_v1", sz!(GrantEntryV1)),
        ("off.grant_entry_v1.flags", off!(GrantEntryV1, flags)),
        ("off.grant_entry_v1.domid", off!(GrantEntryV1, domid)),
        ("off.grant_entry_v1.frame", off!(GrantEntryV1, frame)),
        ("val.BLKIF_OP_READ", BLKIF_OP_READ as i64),
        ("val.BLKIF_OP_WRITE", BLKIF_OP_WRITE as i64),
        ("val.BLKIF_OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER as i64),
        (
            "val.BLKIF_OP_FLUSH_DISKCACHE",
            BLKIF_OP_FLUSH_DISKCACHE as i64,
        ),
        ("val.BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1 as i64),
        ("val.BLKIF_OP_DISCARD", BLKIF_OP_DISCARD as i64),
        ("val.BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT as i64),
        ("val.BLKIF_RSP_OKAY", BLKIF_RSP_OKAY as i64),
        ("val.BLKIF_RSP_ERROR", BLKIF_RSP_ERROR as i64),
        ("val.BLKIF_RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP as i64),
        (
            "val.BLKIF_MAX_SEGMENTS_PER_REQUEST",
            BLKIF_MAX_SEGMENTS_PER_REQUEST as i64,
        ),
        (
            "val.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
            BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST as i64,
        ),
        ("val.BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE as i64),
        ("val.VDISK_CDROM", VDISK_CDROM as i64),
        ("val.VDISK_REMOVABLE", VDISK_REMOVABLE as i64),
        ("val.VDISK_READONLY", VDISK_READONLY as i64),
        ("val.GTF_permit_access", GTF_PERMIT_ACCESS as i64),
        ("val.GTF_readonly", GTF_READONLY as i64),
        ("val.GTF_reading", GTF_READING as i64),
        ("val.GTF_writing", GTF_WRITING as i64),
        ("val.GTF_type_mask", GTF_TYPE_MASK as i64),
        ("val.GNTST_okay", GNTST_OKAY as i64),
        ("val.GNTST_bad_gntref", GNTST_BAD_GNTREF as i64),
        (
            "val.GNTST_permission_denied",
            GNTST_PERMISSION_DENIED as i64,
        ),
        ("val.GNTST_bad_copy_arg", GNTST_BAD_COPY_ARG as i64),
        ("val.XenbusStateInitWait", XenbusState::InitWait as i64),
        ("val.XenbusStateConnected", XenbusState::Connected as i64),
        ("val.XenbusStateClosed", XenbusState::Closed as i64),
        (
            "val.XenbusStateReconfigured",
            XenbusState::Reconfigured as i64,
        ),
    ]
}

#[test]
fn x86_64_layouts_match_libxen_dev() {
    if !tier::need(Tier::Headers("xen/io/blkif.h")) {
        return;
    }
    let c = c_values(false);
    let mut ours = common(Abi::X86_64.ring_entries(1), Abi::X86_64.ring_entries(16));
    ours.extend(request_layouts!(
        Abi::X86_64,
        RequestX86_64,
        DiscardX86_64,
        IndirectX86_64,
        ResponseX86_64
    ));
    ours.extend([
        ("size.ioctl_gntdev_map_grant_ref", sz!(GntdevMapGrantRef)),
        (
            "off.ioctl_gntdev_map_grant_ref.index",
            off!(GntdevMapGrantRef, index),
        ),
        (
            "off.ioctl_gntdev_map_grant_ref.refs",
            off!(GntdevMapGrantRef, refs),
        ),
        (
            "size.ioctl_gntdev_unmap_grant_ref",
            sz!(GntdevUnmapGrantRef),
        ),
        ("size.ioctl_gntdev_unmap_notify", sz!(GntdevUnmapNotify)),
        (
            "size.ioctl_gntdev_grant_copy_segment",
            sz!(GntdevGrantCopySegment),
        ),
        (
            "off.ioctl_gntdev_grant_copy_segment.dest",
            off!(GntdevGrantCopySegment, dest),
        ),
        (
            "off.ioctl_gntdev_grant_copy_segment.len",
            off!(GntdevGrantCopySegment, len),
        ),
        (
            "off.ioctl_gntdev_grant_copy_segment.flags",
            off!(GntdevGrantCopySegment, flags),
        ),
        (
            "off.ioctl_gntdev_grant_copy_segment.status",
            off!(GntdevGrantCopySegment, status),
        ),
        ("size.ioctl_gntdev_grant_copy", sz!(GntdevGrantCopy)),
        (
            "off.ioctl_gntdev_grant_copy.segments",
            off!(GntdevGrantCopy, segments),
        ),
        (
            "size.ioctl_evtchn_bind_interdomain",
            sz!(EvtchnBindInterdomain),
        ),
        (
            "val.IOCTL_GNTDEV_MAP_GRANT_REF",
            IOCTL_GNTDEV_MAP_GRANT_REF as i64,
        ),
        (
            "val.IOCTL_GNTDEV_UNMAP_GRANT_REF",
            IOCTL_GNTDEV_UNMAP_GRANT_REF as i64,
        ),
        (
            "val.IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
            IOCTL_GNTDEV_SET_UNMAP_NOTIFY as i64,
        ),
        (
            "val.IOCTL_GNTDEV_GRANT_COPY",
            IOCTL_GNTDEV_GRANT_COPY as i64,
        ),
        (
            "val.IOCTL_EVTCHN_BIND_INTERDOMAIN",
            IOCTL_EVTCHN_BIND_INTERDOMAIN as i64,
        ),
        ("val.IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND as i64),
        ("val.IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY as i64),
        ("val.IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET as i64),
        ("val.GNTCOPY_source_gref", GNTCOPY_SOURCE_GREF as i64),
        ("val.GNTCOPY_dest_gref", GNTCOPY_DEST_GREF as i64),
        (
            "val.UNMAP_NOTIFY_CLEAR_BYTE",
            UNMAP_NOTIFY_CLEAR_BYTE as i64,
        ),
        (
            "val.UNMAP_NOTIFY_SEND_EVENT",
            UNMAP_NOTIFY_SEND_EVENT as i64,
        ),
    ]);
    check(&c, &ours);
}

#[test]
fn i386_layouts_match_libxen_dev() {
    if !tier::need(Tier::Headers("xen/io/blkif.h"))
        || !tier::need(Tier::Headers("x86_64-linux-gnu/gnu/stubs-32.h"))
    {
        return;
    }
    let c = c_values(true);
    let mut ours = common(Abi::X86_32.ring_entries(1), Abi::X86_32.ring_entries(16));
    ours.extend(request_layouts!(
        Abi::X86_32,
        RequestX86_32,
        DiscardX86_32,
        IndirectX86_32,
        ResponseX86_32
    ));
    check(&c, &ours);
}
