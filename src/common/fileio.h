/* File helpers: whole-file reads and crash-safe writes.
 *
 * Anything the project writes goes through mb_atomic_file_*: data goes to "<path>.tmp.<pid>", is fsync'ed, then renamed
 * over <path> and the directory is fsync'ed, so a crash leaves either the old file or the new one, never a torn one. */
#ifndef MB_FILEIO_H
#define MB_FILEIO_H

#include <stdint.h>
#include <stdio.h>
#include <stddef.h>

#include "common/error.h"

/* Reads the whole file into a malloc'ed buffer (NUL-terminated, the terminator not counted in *size). */
int mb_read_file(const char *path, char **data, size_t *size, mb_error *err);

typedef struct mb_atomic_file {
    FILE *stream;
    char final_path[4096];
    char temp_path[4200];
} mb_atomic_file;

int mb_atomic_file_open(mb_atomic_file *file, const char *path, mb_error *err);
int mb_atomic_file_write(mb_atomic_file *file, const void *data, size_t size, mb_error *err);
/* Flushes, fsyncs, renames over the final path and fsyncs the directory. Closes the file in every case. */
int mb_atomic_file_commit(mb_atomic_file *file, mb_error *err);
/* Closes and removes the temporary file; the final path is untouched. */
void mb_atomic_file_abort(mb_atomic_file *file);

/* Writes a whole buffer atomically. */
int mb_write_file_atomic(const char *path, const void *data, size_t size, mb_error *err);
/* Copies a file's contents to `to` atomically (e.g. tokenizer.json into a checkpoint). */
int mb_copy_file_atomic(const char *from, const char *to, mb_error *err);

/* mkdir -p. */
int mb_make_dirs(const char *path, mb_error *err);
/* fsync a directory so a rename inside it is durable. */
int mb_fsync_dir(const char *path, mb_error *err);
int mb_path_exists(const char *path);
int mb_is_directory(const char *path);
/* Joins dir and name with one '/'. Returns -1 if it does not fit. */
int mb_path_join(char *out, size_t out_size, const char *dir, const char *name);

#endif
