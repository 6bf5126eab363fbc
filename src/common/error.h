/* Error reporting for the core library.
 *
 * The library never calls exit(): a function that can fail returns 0 on success and -1 on failure, and fills an
 * mb_error with a message that names the file and the field or byte offset involved. Front ends print the message. */
#ifndef MB_ERROR_H
#define MB_ERROR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mb_error {
    char message[1024];
} mb_error;

/* Formats the message into err (when err is non-NULL) and returns -1, so callers can write `return mb_fail(...)`. */
int mb_fail(mb_error *err, const char *format, ...) __attribute__((format(printf, 2, 3)));

/* Prepends "context: " to an existing message (for adding the file name as the error travels up). Returns -1. */
int mb_fail_context(mb_error *err, const char *format, ...) __attribute__((format(printf, 2, 3)));

void mb_error_clear(mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
