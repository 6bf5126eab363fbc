#define _POSIX_C_SOURCE 200809L
#include "common/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int mb_read_file(const char *path, char **data, size_t *size, mb_error *err) {
    *data = NULL;
    *size = 0;
    FILE *stream = fopen(path, "rb");
    if (stream == NULL) return mb_fail(err, "%s: cannot open: %s", path, strerror(errno));
    if (fseeko(stream, 0, SEEK_END) != 0) {
        fclose(stream);
        return mb_fail(err, "%s: cannot seek: %s", path, strerror(errno));
    }
    off_t length = ftello(stream);
    rewind(stream);
    if (length < 0) {
        fclose(stream);
        return mb_fail(err, "%s: cannot tell size", path);
    }
    char *buffer = malloc((size_t)length + 1);
    if (buffer == NULL) {
        fclose(stream);
        return mb_fail(err, "%s: out of memory reading %lld bytes", path, (long long)length);
    }
    size_t got = fread(buffer, 1, (size_t)length, stream);
    int read_failed = ferror(stream);
    fclose(stream);
    if (read_failed || got != (size_t)length) {
        free(buffer);
        return mb_fail(err, "%s: short read (%zu of %lld bytes)", path, got, (long long)length);
    }
    buffer[length] = '\0';
    *data = buffer;
    *size = (size_t)length;
    return 0;
}

int mb_atomic_file_open(mb_atomic_file *file, const char *path, mb_error *err) {
    memset(file, 0, sizeof *file);
    if (strlen(path) >= sizeof file->final_path) return mb_fail(err, "%s: path too long", path);
    snprintf(file->final_path, sizeof file->final_path, "%s", path);
    snprintf(file->temp_path, sizeof file->temp_path, "%s.tmp.%ld", path, (long)getpid());
    file->stream = fopen(file->temp_path, "wb");
    if (file->stream == NULL) return mb_fail(err, "%s: cannot create: %s", file->temp_path, strerror(errno));
    return 0;
}

int mb_atomic_file_write(mb_atomic_file *file, const void *data, size_t size, mb_error *err) {
    if (size == 0) return 0;
    if (fwrite(data, 1, size, file->stream) != size)
        return mb_fail(err, "%s: write failed: %s", file->temp_path, strerror(errno));
    return 0;
}

int mb_fsync_dir(const char *path, mb_error *err) {
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return mb_fail(err, "%s: cannot open directory: %s", path, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    if (rc != 0 && errno != EINVAL) return mb_fail(err, "%s: fsync failed: %s", path, strerror(errno));
    return 0;
}

static int fsync_parent(const char *path, mb_error *err) {
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    return mb_fsync_dir(dirname(copy), err);
}

int mb_atomic_file_commit(mb_atomic_file *file, mb_error *err) {
    int failed = fflush(file->stream) != 0 || fsync(fileno(file->stream)) != 0;
    int saved_errno = errno;
    if (fclose(file->stream) != 0) failed = 1;
    file->stream = NULL;
    if (failed) {
        unlink(file->temp_path);
        return mb_fail(err, "%s: flush failed: %s", file->temp_path, strerror(saved_errno));
    }
    if (rename(file->temp_path, file->final_path) != 0) {
        saved_errno = errno;
        unlink(file->temp_path);
        return mb_fail(err, "%s: rename to %s failed: %s", file->temp_path, file->final_path, strerror(saved_errno));
    }
    return fsync_parent(file->final_path, err);
}

void mb_atomic_file_abort(mb_atomic_file *file) {
    if (file->stream != NULL) fclose(file->stream);
    file->stream = NULL;
    if (file->temp_path[0] != '\0') unlink(file->temp_path);
}

int mb_write_file_atomic(const char *path, const void *data, size_t size, mb_error *err) {
    mb_atomic_file file;
    if (mb_atomic_file_open(&file, path, err) != 0) return -1;
    if (mb_atomic_file_write(&file, data, size, err) != 0) {
        mb_atomic_file_abort(&file);
        return -1;
    }
    return mb_atomic_file_commit(&file, err);
}

int mb_copy_file_atomic(const char *from, const char *to, mb_error *err) {
    char *data = NULL;
    size_t size = 0;
    if (mb_read_file(from, &data, &size, err) != 0) return -1;
    int rc = mb_write_file_atomic(to, data, size, err);
    free(data);
    return rc;
}

int mb_make_dirs(const char *path, mb_error *err) {
    char buffer[4096];
    if (strlen(path) >= sizeof buffer) return mb_fail(err, "%s: path too long", path);
    snprintf(buffer, sizeof buffer, "%s", path);
    for (char *p = buffer + 1; *p != '\0'; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buffer, 0755) != 0 && errno != EEXIST) return mb_fail(err, "%s: mkdir failed: %s", buffer, strerror(errno));
        *p = '/';
    }
    if (mkdir(buffer, 0755) != 0 && errno != EEXIST) return mb_fail(err, "%s: mkdir failed: %s", buffer, strerror(errno));
    if (!mb_is_directory(buffer)) return mb_fail(err, "%s: exists and is not a directory", buffer);
    return 0;
}

int mb_path_exists(const char *path) {
    struct stat info;
    return stat(path, &info) == 0;
}

int mb_is_directory(const char *path) {
    struct stat info;
    return stat(path, &info) == 0 && S_ISDIR(info.st_mode);
}

int mb_path_join(char *out, size_t out_size, const char *dir, const char *name) {
    size_t dir_length = strlen(dir);
    const char *separator = (dir_length > 0 && dir[dir_length - 1] == '/') ? "" : "/";
    int written = snprintf(out, out_size, "%s%s%s", dir, separator, name);
    return (written < 0 || (size_t)written >= out_size) ? -1 : 0;
}
