/* The librados/librbd declarations src/rbd/ffi.rs loads by name, checked
 * against the installed headers: each function is assigned to a pointer
 * of the type ffi.rs gives it (gcc -Werror refuses a mismatch), and the two
 * constants are printed for the test to compare. */
#include <stdio.h>
#include <sys/types.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

typedef void *P;
int main(void) {
    int (*rados_create_)(rados_t *, const char *) = rados_create;
    int (*rados_conf_read_file_)(rados_t, const char *) = rados_conf_read_file;
    int (*rados_conf_set_)(rados_t, const char *, const char *) = rados_conf_set;
    int (*rados_connect_)(rados_t) = rados_connect;
    void (*rados_shutdown_)(rados_t) = rados_shutdown;
    uint64_t (*rados_get_instance_id_)(rados_t) = rados_get_instance_id;
    int (*rados_ioctx_create_)(rados_t, const char *, rados_ioctx_t *) = rados_ioctx_create;
    void (*rados_ioctx_destroy_)(rados_ioctx_t) = rados_ioctx_destroy;
    void (*rados_ioctx_set_namespace_)(rados_ioctx_t, const char *) = rados_ioctx_set_namespace;
    int (*rbd_open_)(rados_ioctx_t, const char *, rbd_image_t *, const char *) = rbd_open;
    int (*rbd_open_read_only_)(rados_ioctx_t, const char *, rbd_image_t *, const char *) =
        rbd_open_read_only;
    int (*rbd_close_)(rbd_image_t) = rbd_close;
    int (*rbd_get_size_)(rbd_image_t, uint64_t *) = rbd_get_size;
    int (*rbd_get_id_)(rbd_image_t, char *, size_t) = rbd_get_id;
    int (*rbd_get_features_)(rbd_image_t, uint64_t *) = rbd_get_features;
    int (*rbd_lock_acquire_)(rbd_image_t, rbd_lock_mode_t) = rbd_lock_acquire;
    int (*rbd_is_exclusive_lock_owner_)(rbd_image_t, int *) = rbd_is_exclusive_lock_owner;
    int (*rbd_lock_get_owners_)(rbd_image_t, rbd_lock_mode_t *, char **, size_t *) =
        rbd_lock_get_owners;
    void (*rbd_lock_get_owners_cleanup_)(char **, size_t) = rbd_lock_get_owners_cleanup;
    int (*rbd_lock_break_)(rbd_image_t, rbd_lock_mode_t, const char *) = rbd_lock_break;
    ssize_t (*rbd_read_)(rbd_image_t, uint64_t, size_t, char *) = rbd_read;
    ssize_t (*rbd_write_)(rbd_image_t, uint64_t, size_t, const char *) = rbd_write;
    int (*rbd_flush_)(rbd_image_t) = rbd_flush;
    int (*rbd_discard_)(rbd_image_t, uint64_t, uint64_t) = rbd_discard;
    int (*rbd_aio_create_completion_)(void *, rbd_callback_t, rbd_completion_t *) =
        rbd_aio_create_completion;
    ssize_t (*rbd_aio_get_return_value_)(rbd_completion_t) = rbd_aio_get_return_value;
    void (*rbd_aio_release_)(rbd_completion_t) = rbd_aio_release;
    int (*rbd_aio_read_)(rbd_image_t, uint64_t, size_t, char *, rbd_completion_t) = rbd_aio_read;
    int (*rbd_aio_write_)(rbd_image_t, uint64_t, size_t, const char *, rbd_completion_t) =
        rbd_aio_write;
    int (*rbd_aio_flush_)(rbd_image_t, rbd_completion_t) = rbd_aio_flush;
    int (*rbd_aio_discard_)(rbd_image_t, uint64_t, uint64_t, rbd_completion_t) = rbd_aio_discard;
    P all[] = {
        (P)rados_create_, (P)rados_conf_read_file_, (P)rados_conf_set_, (P)rados_connect_,
        (P)rados_shutdown_, (P)rados_get_instance_id_, (P)rados_ioctx_create_,
        (P)rados_ioctx_destroy_, (P)rados_ioctx_set_namespace_, (P)rbd_open_, (P)rbd_open_read_only_, (P)rbd_close_,
        (P)rbd_get_size_, (P)rbd_get_id_, (P)rbd_get_features_, (P)rbd_lock_acquire_,
        (P)rbd_is_exclusive_lock_owner_, (P)rbd_lock_get_owners_,
        (P)rbd_lock_get_owners_cleanup_, (P)rbd_lock_break_, (P)rbd_read_, (P)rbd_write_, (P)rbd_flush_,
        (P)rbd_discard_, (P)rbd_aio_create_completion_, (P)rbd_aio_get_return_value_,
        (P)rbd_aio_release_, (P)rbd_aio_read_, (P)rbd_aio_write_, (P)rbd_aio_flush_,
        (P)rbd_aio_discard_,
    };
    printf("functions %zu\n", sizeof all / sizeof all[0]);
    printf("RBD_LOCK_MODE_EXCLUSIVE %d\n", (int)RBD_LOCK_MODE_EXCLUSIVE);
    printf("RBD_FEATURE_EXCLUSIVE_LOCK %llu\n", (unsigned long long)RBD_FEATURE_EXCLUSIVE_LOCK);
    printf("rbd_lock_mode_t %zu\n", sizeof(rbd_lock_mode_t));
    return 0;
}
