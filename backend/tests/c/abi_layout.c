/* Prints the sizes and offsets of the blkif, grant-table, gntdev and evtchn
 * structures as Debian's libxen-dev headers define them, one "name value" per
 * line. Built twice by tests/abi_layout.rs: natively (x86_64) and with -m32
 * (the i386 layout a 32-bit frontend uses). */
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/xenbus.h>
#include <xen/sys/gntdev.h>
#include <xen/sys/evtchn.h>

#define S(t) printf("size." #t " %zu\n", sizeof(struct t))
#define O(t, f) printf("off." #t "." #f " %zu\n", offsetof(struct t, f))
#define V(n) printf("val." #n " %lld\n", (long long)(n))

int main(void)
{
    S(blkif_request_segment); O(blkif_request_segment, gref); O(blkif_request_segment, first_sect);
    O(blkif_request_segment, last_sect);
    S(blkif_request); O(blkif_request, operation); O(blkif_request, nr_segments); O(blkif_request, handle);
    O(blkif_request, id); O(blkif_request, sector_number); O(blkif_request, seg);
    S(blkif_request_discard); O(blkif_request_discard, flag); O(blkif_request_discard, id);
    O(blkif_request_discard, sector_number); O(blkif_request_discard, nr_sectors);
    S(blkif_request_indirect); O(blkif_request_indirect, indirect_op); O(blkif_request_indirect, nr_segments);
    O(blkif_request_indirect, id); O(blkif_request_indirect, sector_number); O(blkif_request_indirect, handle);
    O(blkif_request_indirect, indirect_grefs);
    S(blkif_response); O(blkif_response, id); O(blkif_response, operation); O(blkif_response, status);
    O(blkif_sring, req_prod); O(blkif_sring, req_event); O(blkif_sring, rsp_prod); O(blkif_sring, rsp_event);
    O(blkif_sring, ring);
    printf("val.ring_entries_1 %u\n", (unsigned)__CONST_RING_SIZE(blkif, 4096));
    printf("val.ring_entries_16 %u\n", (unsigned)__CONST_RING_SIZE(blkif, 16 * 4096));
    S(grant_entry_v1); O(grant_entry_v1, flags); O(grant_entry_v1, domid); O(grant_entry_v1, frame);
    V(BLKIF_OP_READ); V(BLKIF_OP_WRITE); V(BLKIF_OP_WRITE_BARRIER); V(BLKIF_OP_FLUSH_DISKCACHE);
    V(BLKIF_OP_RESERVED_1); V(BLKIF_OP_DISCARD); V(BLKIF_OP_INDIRECT);
    V(BLKIF_RSP_OKAY); V(BLKIF_RSP_ERROR); V(BLKIF_RSP_EOPNOTSUPP);
    V(BLKIF_MAX_SEGMENTS_PER_REQUEST); V(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST); V(BLKIF_DISCARD_SECURE);
    V(VDISK_CDROM); V(VDISK_REMOVABLE); V(VDISK_READONLY);
    V(GTF_permit_access); V(GTF_readonly); V(GTF_reading); V(GTF_writing); V(GTF_type_mask);
    V(GNTST_okay); V(GNTST_bad_gntref); V(GNTST_permission_denied); V(GNTST_bad_copy_arg);
    V(XenbusStateInitWait); V(XenbusStateConnected); V(XenbusStateClosed); V(XenbusStateReconfigured);
#ifdef __x86_64__
    S(ioctl_gntdev_map_grant_ref); O(ioctl_gntdev_map_grant_ref, index); O(ioctl_gntdev_map_grant_ref, refs);
    S(ioctl_gntdev_unmap_grant_ref); S(ioctl_gntdev_unmap_notify);
    S(ioctl_gntdev_grant_copy_segment); O(ioctl_gntdev_grant_copy_segment, dest);
    O(ioctl_gntdev_grant_copy_segment, len); O(ioctl_gntdev_grant_copy_segment, flags);
    O(ioctl_gntdev_grant_copy_segment, status);
    S(ioctl_gntdev_grant_copy); O(ioctl_gntdev_grant_copy, segments);
    S(ioctl_evtchn_bind_interdomain);
    V(IOCTL_GNTDEV_MAP_GRANT_REF); V(IOCTL_GNTDEV_UNMAP_GRANT_REF); V(IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
    V(IOCTL_GNTDEV_GRANT_COPY); V(IOCTL_EVTCHN_BIND_INTERDOMAIN); V(IOCTL_EVTCHN_UNBIND);
    V(IOCTL_EVTCHN_NOTIFY); V(IOCTL_EVTCHN_RESET); V(GNTCOPY_source_gref); V(GNTCOPY_dest_gref);
    V(UNMAP_NOTIFY_CLEAR_BYTE); V(UNMAP_NOTIFY_SEND_EVENT);
#endif
    return 0;
}
