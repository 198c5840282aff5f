/* Prints the ioctl numbers and argument layouts of the disk layer as the
 * kernel's UAPI headers (Debian's linux-libc-dev) define them, one
 * "name value" per line, for tests/disk_abi.rs. */
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <linux/dm-ioctl.h>
#include <linux/stat.h>

#define S(t) printf("size." #t " %zu\n", sizeof(struct t))
#define O(t, f) printf("off." #t "." #f " %zu\n", offsetof(struct t, f))
#define V(n) printf("val." #n " %lld\n", (long long)(n))

int main(void)
{
    V(BLKGETDISKSEQ); V(BLKGETSIZE64); V(BLKSSZGET); V(BLKPBSZGET); V(BLKROGET);
    V(BLKDISCARD); V(BLKSECDISCARD); V(FS_IOC_GETVERSION);
    V(LOOP_CLR_FD); V(LOOP_GET_STATUS64); V(LOOP_SET_CAPACITY); V(LOOP_CONFIGURE);
    V(LOOP_CTL_ADD); V(LOOP_CTL_GET_FREE);
    V(LO_FLAGS_READ_ONLY); V(LO_FLAGS_AUTOCLEAR); V(LO_FLAGS_DIRECT_IO);
    S(loop_info64); O(loop_info64, lo_device); O(loop_info64, lo_inode); O(loop_info64, lo_flags);
    O(loop_info64, lo_file_name);
    S(loop_config); O(loop_config, block_size); O(loop_config, info);
    V(DM_VERSION); V(DM_LIST_DEVICES); V(DM_DEV_CREATE); V(DM_DEV_REMOVE); V(DM_DEV_SUSPEND);
    V(DM_DEV_STATUS); V(DM_TABLE_LOAD); V(DM_TABLE_CLEAR); V(DM_TABLE_STATUS); V(DM_TARGET_MSG);
    S(dm_ioctl); V(DM_NAME_LEN); V(DM_UUID_LEN);
    V(STATX_DIOALIGN); S(statx); O(statx, stx_mask); O(statx, stx_dio_offset_align);
    return 0;
}
