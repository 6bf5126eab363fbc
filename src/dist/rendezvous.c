/* TCP rendezvous (star, rank 0 is the hub) and the liveness channel built on its connections. Frame format and
 * protocol: see rendezvous.h. All sockets are non-blocking; every wait is a poll() bounded by the caller's deadline,
 * so no step of the exchange can hang past timeout_seconds. */
#include "dist/rendezvous.h"

#include "common/clock.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RV_MAGIC 0x4d42525au /* "MBRZ" */
#define RV_VERSION 1u
#define RV_HOST_SIZE 64
#define RV_HEADER_SIZE 8
#define RV_MAX_FRAME (4u << 20)
#define RV_HELLO_SIZE (5 * 4 + RV_HOST_SIZE)
#define RV_TABLE_ENTRY (4 + RV_HOST_SIZE)
#define RV_SEND_WAIT_SECONDS 0.1

enum { MSG_HELLO = 1, MSG_BLOB = 2, MSG_TABLE = 3, MSG_REJECT = 4, MSG_FAIL = 5, MSG_GOODBYE = 6 };

typedef struct rv_host {
    char name[RV_HOST_SIZE];
    int pid;
} rv_host;

/* One TCP connection with the bytes received but not yet parsed. */
typedef struct rv_conn {
    int fd;          /* -1 once closed */
    int rank;        /* rank at the other end, -1 before its hello */
    int said_goodbye;
    rv_host host;    /* from the hello (hub side, before the table exists) */
    uint8_t *buffer;
    size_t have, capacity;
} rv_conn;

typedef struct rv_frame {
    uint32_t type, length;
    const uint8_t *payload;
} rv_frame;

struct mb_rendezvous {
    int rank, world_size;
    rv_host *table;           /* world_size entries: who is who, for messages */
    rv_conn *conns;           /* hub: indexed by rank (entry 0 unused); peer: one entry, the hub */
    int conn_count;
    int wake_pipe[2];         /* written by close() to stop the watcher */
    pthread_t watcher;
    int watcher_started;
    pthread_mutex_t send_lock;  /* serialises sends and fd closes between the watcher and the caller's thread */
    pthread_mutex_t state_lock; /* guards why */
    atomic_int failed;
    char why[1024];
};

/* ---- time ---- */

static int remaining_ms(double deadline) {
    double left = (deadline - mb_monotonic_seconds()) * 1000.0;
    if (left <= 0) return 0;
    return left > INT_MAX ? INT_MAX : (int)left + 1;
}

/* ---- bytes ---- */

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static void local_host(rv_host *host) {
    memset(host, 0, sizeof *host);
    if (gethostname(host->name, sizeof host->name - 1) != 0) snprintf(host->name, sizeof host->name, "unknown");
    host->pid = (int)getpid();
}

static void describe(const rv_host *host, int rank, char *out, size_t size) {
    snprintf(out, size, "rank %d (host %s, pid %d)", rank, host->name, host->pid);
}

/* ---- sockets ---- */

static void set_socket_options(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Keepalive catches a peer whose whole machine vanished (no FIN ever comes): ~40 s to detect. */
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    int idle = 10, interval = 10, count = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
}

/* Sends all bytes, waiting for socket space until the deadline. MSG_NOSIGNAL: a dead peer gives EPIPE, not SIGPIPE. */
static int send_all(int fd, const uint8_t *data, size_t size, double deadline) {
    while (size > 0) {
        ssize_t sent = send(fd, data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent > 0) {
            data += sent, size -= (size_t)sent;
            continue;
        }
        if (sent < 0 && errno == EINTR) continue;
        if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        struct pollfd pfd = {fd, POLLOUT, 0};
        int ms = remaining_ms(deadline);
        if (ms == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (poll(&pfd, 1, ms) < 0 && errno != EINTR) return -1;
    }
    return 0;
}

static int send_frame(int fd, uint32_t type, const void *payload, size_t length, double deadline) {
    uint8_t header[RV_HEADER_SIZE];
    put_u32(header, type);
    put_u32(header + 4, (uint32_t)length);
    if (send_all(fd, header, sizeof header, deadline) != 0) return -1;
    return length > 0 ? send_all(fd, payload, length, deadline) : 0;
}

static void conn_init(rv_conn *conn, int fd) {
    memset(conn, 0, sizeof *conn);
    conn->fd = fd;
    conn->rank = -1;
}

static void conn_close(rv_conn *conn) {
    if (conn->fd >= 0) close(conn->fd);
    conn->fd = -1;
}

static void conn_free(rv_conn *conn) {
    conn_close(conn);
    free(conn->buffer);
    conn->buffer = NULL;
    conn->have = conn->capacity = 0;
}

enum { READ_OK, READ_EOF, READ_ERROR };

/* Appends whatever the socket has now (non-blocking). READ_EOF/READ_ERROR: the connection is over. */
static int conn_fill(rv_conn *conn) {
    for (;;) {
        if (conn->capacity - conn->have < 4096) {
            size_t capacity = conn->capacity == 0 ? 8192 : conn->capacity * 2;
            uint8_t *grown = realloc(conn->buffer, capacity);
            if (grown == NULL) return READ_ERROR;
            conn->buffer = grown, conn->capacity = capacity;
        }
        ssize_t got = recv(conn->fd, conn->buffer + conn->have, conn->capacity - conn->have, MSG_DONTWAIT);
        if (got > 0) {
            conn->have += (size_t)got;
            if (conn->have >= RV_HEADER_SIZE && get_u32(conn->buffer + 4) > RV_MAX_FRAME) return READ_ERROR;
            continue;
        }
        if (got == 0) return READ_EOF;
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? READ_OK : READ_ERROR;
    }
}

/* 1 and the first complete frame (valid until conn_consume), 0 when none is complete yet. */
static int conn_peek(const rv_conn *conn, rv_frame *frame) {
    if (conn->have < RV_HEADER_SIZE) return 0;
    frame->type = get_u32(conn->buffer);
    frame->length = get_u32(conn->buffer + 4);
    if (conn->have < RV_HEADER_SIZE + (size_t)frame->length) return 0;
    frame->payload = conn->buffer + RV_HEADER_SIZE;
    return 1;
}

static void conn_consume(rv_conn *conn, const rv_frame *frame) {
    size_t used = RV_HEADER_SIZE + (size_t)frame->length;
    memmove(conn->buffer, conn->buffer + used, conn->have - used);
    conn->have -= used;
}

/* Copies a text payload into a NUL-terminated string. */
static void frame_text(const rv_frame *frame, char *out, size_t size) {
    size_t n = frame->length < size - 1 ? frame->length : size - 1;
    memcpy(out, frame->payload, n);
    out[n] = '\0';
}

/* ---- failure state ---- */

static void set_failed(mb_rendezvous *rv, const char *line) {
    pthread_mutex_lock(&rv->state_lock);
    if (!atomic_load(&rv->failed)) {
        snprintf(rv->why, sizeof rv->why, "%s", line);
        atomic_store(&rv->failed, 1);
    }
    pthread_mutex_unlock(&rv->state_lock);
}

/* Sends a frame on every open connection except `skip` (an index into conns, -1 for none). */
static void broadcast(mb_rendezvous *rv, uint32_t type, const char *text, int skip) {
    double deadline = mb_monotonic_seconds() + RV_SEND_WAIT_SECONDS;
    pthread_mutex_lock(&rv->send_lock);
    for (int i = 0; i < rv->conn_count; i++)
        if (i != skip && rv->conns[i].fd >= 0) send_frame(rv->conns[i].fd, type, text, text ? strlen(text) : 0, deadline);
    pthread_mutex_unlock(&rv->send_lock);
}

/* ---- watcher thread ---- */

/* A connection ended: closes it; returns 1 when that is a failure (no goodbye came first). */
static int close_ended_connection(mb_rendezvous *rv, int index) {
    rv_conn *conn = &rv->conns[index];
    pthread_mutex_lock(&rv->send_lock);
    conn_close(conn);
    pthread_mutex_unlock(&rv->send_lock);
    return !conn->said_goodbye;
}

/* Connections that ended without a goodbye in the same poll round are reported together: their order inside one
 * round is unknown (e.g. a launcher SIGTERMs rank 2 right after rank 3 crashed), so the line names all of them. The
 * hub relays the line to everyone else. */
static void report_dead_connections(mb_rendezvous *rv, const int *indices, int count) {
    if (count == 0) return;
    char line[1024];
    size_t used = 0;
    for (int i = 0; i < count && used < sizeof line - 200; i++) {
        const rv_conn *conn = &rv->conns[indices[i]];
        char who[160];
        describe(&rv->table[conn->rank], conn->rank, who, sizeof who);
        used += (size_t)snprintf(line + used, sizeof line - used, "%s%s", i ? ", " : "", who);
    }
    snprintf(line + used, sizeof line - used, count == 1 ? " closed its connection without saying goodbye (the process died?)"
                                                         : " closed their connections without saying goodbye (the processes died?)");
    set_failed(rv, line);
    if (rv->rank == 0) broadcast(rv, MSG_FAIL, line, -1); /* the dead connections are closed already */
}

static void on_frame(mb_rendezvous *rv, int index, const rv_frame *frame) {
    rv_conn *conn = &rv->conns[index];
    if (frame->type == MSG_GOODBYE) {
        conn->said_goodbye = 1;
    } else if (frame->type == MSG_FAIL || (frame->type == MSG_REJECT && rv->rank != 0)) {
        /* REJECT after open: the hub failed while sending the results to a later rank */
        char text[900], line[1024];
        frame_text(frame, text, sizeof text);
        if (rv->rank != 0) { /* the hub already formatted it */
            set_failed(rv, text);
            return;
        }
        char who[160];
        describe(&rv->table[conn->rank], conn->rank, who, sizeof who);
        snprintf(line, sizeof line, "%s failed: %s", who, text);
        set_failed(rv, line);
        broadcast(rv, MSG_FAIL, line, index);
    }
}

static void *watch_connections(void *arg) {
    mb_rendezvous *rv = arg;
    struct pollfd *fds = calloc((size_t)rv->conn_count + 1, sizeof *fds);
    int *index_of = calloc((size_t)rv->conn_count + 1, sizeof *index_of);
    int *dead_indices = calloc((size_t)rv->conn_count + 1, sizeof *dead_indices);
    if (fds == NULL || index_of == NULL || dead_indices == NULL) {
        set_failed(rv, "rendezvous watcher: out of memory");
        free(fds), free(index_of), free(dead_indices);
        return NULL;
    }
    /* Frames that arrived together with the end of the rendezvous are already buffered: handle them first. */
    for (int i = 0; i < rv->conn_count; i++) {
        rv_frame frame;
        while (rv->conns[i].fd >= 0 && conn_peek(&rv->conns[i], &frame)) {
            on_frame(rv, i, &frame);
            conn_consume(&rv->conns[i], &frame);
        }
    }
    for (;;) {
        int n = 0;
        fds[n++] = (struct pollfd){rv->wake_pipe[0], POLLIN, 0};
        for (int i = 0; i < rv->conn_count; i++)
            if (rv->conns[i].fd >= 0) index_of[n] = i, fds[n++] = (struct pollfd){rv->conns[i].fd, POLLIN, 0};
        if (poll(fds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            set_failed(rv, "rendezvous watcher: poll failed");
            break;
        }
        if (fds[0].revents != 0) break;
        int dead = 0;
        for (int k = 1; k < n; k++) {
            if (fds[k].revents == 0) continue;
            rv_conn *conn = &rv->conns[index_of[k]];
            int status = conn_fill(conn);
            rv_frame frame;
            while (conn_peek(conn, &frame)) {
                on_frame(rv, index_of[k], &frame);
                conn_consume(conn, &frame);
            }
            if (status != READ_OK && close_ended_connection(rv, index_of[k])) dead_indices[dead++] = index_of[k];
        }
        report_dead_connections(rv, dead_indices, dead);
    }
    free(fds);
    free(index_of);
    free(dead_indices);
    return NULL;
}

static int start_watcher(mb_rendezvous *rv, mb_error *err) {
    if (pipe2(rv->wake_pipe, O_CLOEXEC) != 0) return mb_fail(err, "rendezvous: pipe: %s", strerror(errno));
    /* The watcher blocks every signal so that signals keep going to the application's threads. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    int status = pthread_create(&rv->watcher, NULL, watch_connections, rv);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (status != 0) return mb_fail(err, "rendezvous: cannot start the watcher thread: %s", strerror(status));
    rv->watcher_started = 1;
    return 0;
}

/* ---- object ---- */

static mb_rendezvous *rv_alloc(const mb_dist_env *env, int conn_count) {
    mb_rendezvous *rv = calloc(1, sizeof *rv);
    if (rv == NULL) return NULL;
    rv->rank = env->rank;
    rv->world_size = env->world_size;
    rv->wake_pipe[0] = rv->wake_pipe[1] = -1;
    rv->table = calloc((size_t)env->world_size, sizeof *rv->table);
    rv->conns = calloc((size_t)(conn_count > 0 ? conn_count : 1), sizeof *rv->conns);
    rv->conn_count = conn_count;
    pthread_mutex_init(&rv->send_lock, NULL);
    pthread_mutex_init(&rv->state_lock, NULL);
    atomic_init(&rv->failed, 0);
    if (rv->table == NULL || rv->conns == NULL) {
        free(rv->table), free(rv->conns), free(rv);
        return NULL;
    }
    for (int i = 0; i < conn_count; i++) conn_init(&rv->conns[i], -1);
    local_host(&rv->table[env->rank]);
    return rv;
}

static void rv_free(mb_rendezvous *rv) {
    for (int i = 0; i < rv->conn_count; i++) conn_free(&rv->conns[i]);
    if (rv->wake_pipe[0] >= 0) close(rv->wake_pipe[0]);
    if (rv->wake_pipe[1] >= 0) close(rv->wake_pipe[1]);
    pthread_mutex_destroy(&rv->send_lock);
    pthread_mutex_destroy(&rv->state_lock);
    free(rv->table);
    free(rv->conns);
    free(rv);
}

/* ---- hub (rank 0) ---- */

typedef struct hub_pending {
    rv_conn *items;
    int count, capacity;
} hub_pending;

static int listen_on_port(int port, mb_error *err) {
    int one = 1, zero = 0;
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero); /* dual stack: IPv4 peers too */
        struct sockaddr_in6 address = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port), .sin6_addr = in6addr_any};
        if (bind(fd, (struct sockaddr *)&address, sizeof address) == 0 && listen(fd, SOMAXCONN) == 0) return fd;
        if (errno == EADDRINUSE) {
            close(fd);
            return mb_fail(err, "rank 0: cannot listen on port %d: %s (another run on this port? set MASTER_PORT)", port,
                           strerror(EADDRINUSE));
        }
        close(fd);
    }
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0); /* no IPv6 on this machine */
    if (fd < 0) return mb_fail(err, "rank 0: socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&address, sizeof address) != 0 || listen(fd, SOMAXCONN) != 0) {
        int saved = errno;
        close(fd);
        return mb_fail(err, "rank 0: cannot listen on port %d: %s (another run on this port? set MASTER_PORT)", port,
                       strerror(saved));
    }
    return fd;
}

/* Tells everyone connected so far why the rendezvous failed (err's text), so each rank prints the real cause. */
static void hub_reject_all(mb_rendezvous *rv, hub_pending *pending, const mb_error *err) {
    const char *text = err != NULL ? err->message : "rendezvous failed at rank 0";
    double deadline = mb_monotonic_seconds() + RV_SEND_WAIT_SECONDS;
    for (int i = 0; i < rv->conn_count; i++)
        if (rv->conns[i].fd >= 0) send_frame(rv->conns[i].fd, MSG_REJECT, text, strlen(text), deadline);
    for (int i = 0; i < pending->count; i++)
        if (pending->items[i].rank >= 0) send_frame(pending->items[i].fd, MSG_REJECT, text, strlen(text), deadline);
}

/* Checks a hello. 1: accepted into conns[rank]; 0: not one of ours (dropped quietly); -1: fatal, err filled. */
static int hub_check_hello(mb_rendezvous *rv, rv_conn *conn, const rv_frame *frame, mb_error *err) {
    if (frame->type != MSG_HELLO || frame->length != RV_HELLO_SIZE || get_u32(frame->payload) != RV_MAGIC) return 0;
    const uint8_t *p = frame->payload;
    int rank = (int)get_u32(p + 8), world = (int)get_u32(p + 12);
    conn->host.pid = (int)get_u32(p + 16);
    memcpy(conn->host.name, p + 20, RV_HOST_SIZE);
    conn->host.name[RV_HOST_SIZE - 1] = '\0';
    conn->rank = rank;
    char who[160], hub[160];
    describe(&conn->host, rank, who, sizeof who);
    describe(&rv->table[0], 0, hub, sizeof hub);
    if (get_u32(p + 4) != RV_VERSION)
        return mb_fail(err, "rendezvous: %s speaks protocol version %u but %s speaks %u (different modernbert builds?)",
                       who, get_u32(p + 4), hub, RV_VERSION);
    if (world != rv->world_size)
        return mb_fail(err, "rendezvous: %s was started with world size %d but %s has world size %d", who, world, hub,
                       rv->world_size);
    if (rank <= 0 || rank >= rv->world_size)
        return mb_fail(err, "rendezvous: a process (host %s, pid %d) claims rank %d, which %s expects to be in 1..%d",
                       conn->host.name, conn->host.pid, rank, hub, rv->world_size - 1);
    if (rv->conns[rank].fd >= 0) {
        char first[160];
        describe(&rv->conns[rank].host, rank, first, sizeof first);
        return mb_fail(err, "rendezvous: rank %d is claimed twice: by %s and by host %s, pid %d", rank, first,
                       conn->host.name, conn->host.pid);
    }
    return 1;
}

static void pending_remove(hub_pending *pending, int i, int close_it) {
    if (close_it) conn_free(&pending->items[i]);
    pending->items[i] = pending->items[--pending->count];
}

static int hub_accept_new(int listen_fd, hub_pending *pending) {
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED ? 0 : -1;
        if (pending->count == pending->capacity) {
            int capacity = pending->capacity == 0 ? 16 : 2 * pending->capacity;
            rv_conn *grown = realloc(pending->items, (size_t)capacity * sizeof *grown);
            if (grown == NULL) {
                close(fd);
                return -1;
            }
            pending->items = grown, pending->capacity = capacity;
        }
        set_socket_options(fd);
        conn_init(&pending->items[pending->count++], fd);
    }
}

/* Reads what a not-yet-identified connection sent. 1 when it joined, 0 otherwise, -1 on a fatal hello. */
static int hub_read_pending(mb_rendezvous *rv, hub_pending *pending, int i, mb_error *err) {
    rv_conn *conn = &pending->items[i];
    int status = conn_fill(conn);
    rv_frame frame;
    if (conn_peek(conn, &frame)) {
        int verdict = hub_check_hello(rv, conn, &frame, err);
        if (verdict < 0) return -1;
        if (verdict == 0) {
            pending_remove(pending, i, 1);
            return 0;
        }
        conn_consume(conn, &frame);
        rv->conns[conn->rank] = *conn;
        rv->table[conn->rank] = conn->host;
        pending_remove(pending, i, 0);
        return 1;
    }
    if (status != READ_OK) pending_remove(pending, i, 1); /* closed before saying hello: not a rank we know */
    return 0;
}

static int hub_timeout_error(const mb_rendezvous *rv, int port, double timeout_seconds, int joined, mb_error *err) {
    char missing[640] = "";
    size_t used = 0;
    for (int r = 1; r < rv->world_size; r++) {
        if (rv->conns[r].fd >= 0) continue;
        if (used > sizeof missing - 24) {
            snprintf(missing + used, sizeof missing - used, ", ...");
            break;
        }
        used += (size_t)snprintf(missing + used, sizeof missing - used, "%s%d", used ? ", " : "", r);
    }
    return mb_fail(err, "rendezvous timed out after %g s at rank 0 (port %d): %d of %d ranks never arrived: %s",
                   timeout_seconds, port, rv->world_size - 1 - joined, rv->world_size, missing);
}

static int hub_gather(mb_rendezvous *rv, int listen_fd, hub_pending *pending, const mb_dist_env *env, double deadline,
                      double timeout_seconds, mb_error *err) {
    int joined = 0;
    struct pollfd *fds = NULL;
    int status = 0;
    while (joined < rv->world_size - 1) {
        int ms = remaining_ms(deadline);
        if (ms == 0) {
            status = hub_timeout_error(rv, env->master_port, timeout_seconds, joined, err);
            break;
        }
        struct pollfd *grown = realloc(fds, (size_t)(pending->count + 1) * sizeof *fds);
        if (grown == NULL) {
            status = mb_fail(err, "rendezvous: out of memory");
            break;
        }
        fds = grown;
        fds[0] = (struct pollfd){listen_fd, POLLIN, 0};
        for (int i = 0; i < pending->count; i++) fds[i + 1] = (struct pollfd){pending->items[i].fd, POLLIN, 0};
        int polled = pending->count;
        if (poll(fds, (nfds_t)polled + 1, ms) < 0 && errno != EINTR) {
            status = mb_fail(err, "rendezvous: poll: %s", strerror(errno));
            break;
        }
        for (int i = polled - 1; i >= 0 && status == 0; i--) { /* backwards: removal moves the last item */
            if (fds[i + 1].revents == 0) continue;
            int verdict = hub_read_pending(rv, pending, i, err);
            if (verdict < 0) status = -1;
            joined += verdict > 0;
        }
        if (status != 0) break;
        if (fds[0].revents != 0 && hub_accept_new(listen_fd, pending) != 0) {
            status = mb_fail(err, "rendezvous: accept on port %d: %s", env->master_port, strerror(errno));
            break;
        }
    }
    free(fds);
    return status;
}

static int hub_send_results(mb_rendezvous *rv, const void *blob, size_t blob_size, double deadline, mb_error *err) {
    size_t table_size = (size_t)rv->world_size * RV_TABLE_ENTRY;
    uint8_t *table = calloc(table_size, 1);
    if (table == NULL) return mb_fail(err, "rendezvous: out of memory");
    for (int r = 0; r < rv->world_size; r++) {
        put_u32(table + (size_t)r * RV_TABLE_ENTRY, (uint32_t)rv->table[r].pid);
        memcpy(table + (size_t)r * RV_TABLE_ENTRY + 4, rv->table[r].name, RV_HOST_SIZE);
    }
    int status = 0;
    for (int r = 1; r < rv->world_size && status == 0; r++) {
        if (send_frame(rv->conns[r].fd, MSG_BLOB, blob, blob_size, deadline) != 0 ||
            send_frame(rv->conns[r].fd, MSG_TABLE, table, table_size, deadline) != 0) {
            char who[160];
            describe(&rv->table[r], r, who, sizeof who);
            status = mb_fail(err, "rendezvous: cannot send to %s: %s", who, strerror(errno));
        }
    }
    free(table);
    return status;
}

static int hub_open(mb_rendezvous *rv, const mb_dist_env *env, const void *blob, size_t blob_size, double deadline,
                    double timeout_seconds, mb_error *err) {
    int listen_fd = listen_on_port(env->master_port, err);
    if (listen_fd < 0) return -1;
    hub_pending pending = {NULL, 0, 0};
    int status = hub_gather(rv, listen_fd, &pending, env, deadline, timeout_seconds, err);
    close(listen_fd); /* everyone is here (or we give up): nobody else may join */
    if (status == 0) status = hub_send_results(rv, blob, blob_size, deadline, err);
    if (status != 0) hub_reject_all(rv, &pending, err);
    for (int i = 0; i < pending.count; i++) conn_free(&pending.items[i]);
    free(pending.items);
    return status;
}

/* ---- peer (rank > 0) ---- */

/* One non-blocking connect attempt to every address of the hub; the connected fd or -1 (*last_error set). */
static int try_connect(const struct addrinfo *addresses, double deadline, int *last_error) {
    for (const struct addrinfo *a = addresses; a != NULL; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            *last_error = errno;
            continue;
        }
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) return fd;
        if (errno == EINPROGRESS) {
            struct pollfd pfd = {fd, POLLOUT, 0};
            int ms = remaining_ms(deadline);
            int ready = poll(&pfd, 1, ms < 2000 ? ms : 2000); /* an unreachable host must not eat the whole timeout */
            int so_error = 0;
            socklen_t length = sizeof so_error;
            if (ready > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &length) == 0 && so_error == 0) return fd;
            *last_error = ready > 0 ? so_error : ETIMEDOUT;
        } else {
            *last_error = errno;
        }
        close(fd);
    }
    return -1;
}

static int peer_connect(const mb_dist_env *env, double deadline, double timeout_seconds, mb_error *err) {
    char port[16];
    snprintf(port, sizeof port, "%d", env->master_port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    double backoff = 0.1;
    int last_error = 0;
    char last_text[256] = "no attempt finished";
    for (;;) {
        struct addrinfo *addresses = NULL;
        int gai = getaddrinfo(env->master_addr, port, &hints, &addresses);
        if (gai == 0) {
            int fd = try_connect(addresses, deadline, &last_error);
            freeaddrinfo(addresses);
            if (fd >= 0) return fd;
            snprintf(last_text, sizeof last_text, "%s", strerror(last_error));
        } else if (gai == EAI_AGAIN) {
            snprintf(last_text, sizeof last_text, "%s", gai_strerror(gai));
        } else {
            return mb_fail(err, "rank %d: cannot resolve MASTER_ADDR \"%s\": %s", env->rank, env->master_addr,
                           gai_strerror(gai));
        }
        double left = (deadline - mb_monotonic_seconds());
        if (left <= 0)
            return mb_fail(err, "rank %d: could not reach rank 0 at %s:%d within %g s (last error: %s); is rank 0 "
                           "running, and do all ranks use the same MASTER_ADDR and MASTER_PORT?",
                           env->rank, env->master_addr, env->master_port, timeout_seconds, last_text);
        mb_sleep_seconds(backoff < left ? backoff : left);
        backoff = backoff * 1.5 > 0.5 ? 0.5 : backoff * 1.5;
    }
}

static void decode_table(mb_rendezvous *rv, const rv_frame *frame) {
    for (int r = 0; r < rv->world_size; r++) {
        const uint8_t *entry = frame->payload + (size_t)r * RV_TABLE_ENTRY;
        rv->table[r].pid = (int)get_u32(entry);
        memcpy(rv->table[r].name, entry + 4, RV_HOST_SIZE);
        rv->table[r].name[RV_HOST_SIZE - 1] = '\0';
    }
}

/* Handles one frame of the hub's answer. 1 once both the blob and the table have arrived, 0 to continue, -1 on error. */
static int peer_on_answer(mb_rendezvous *rv, const mb_dist_env *env, const rv_frame *frame, void *blob,
                          size_t blob_size, int *got_blob, mb_error *err) {
    if (frame->type == MSG_REJECT) {
        char text[900];
        frame_text(frame, text, sizeof text);
        return mb_fail(err, "rank %d: rank 0 at %s:%d ended the rendezvous: %s", rv->rank, env->master_addr,
                       env->master_port, text);
    }
    if (frame->type == MSG_BLOB) {
        if (frame->length != blob_size)
            return mb_fail(err, "rank %d: rank 0 sent %u bytes of rendezvous data but this rank expects %zu", rv->rank,
                           frame->length, blob_size);
        if (blob_size > 0) memcpy(blob, frame->payload, blob_size);
        *got_blob = 1;
    } else if (frame->type == MSG_TABLE) {
        if (frame->length != (size_t)rv->world_size * RV_TABLE_ENTRY)
            return mb_fail(err, "rank %d: rank 0 sent a table of %u bytes, expected %zu", rv->rank, frame->length,
                           (size_t)rv->world_size * RV_TABLE_ENTRY);
        decode_table(rv, frame);
        return *got_blob ? 1 : mb_fail(err, "rank %d: rank 0 sent the table before the data", rv->rank);
    }
    return 0;
}

static int peer_exchange(mb_rendezvous *rv, const mb_dist_env *env, void *blob, size_t blob_size, double deadline,
                         double timeout_seconds, mb_error *err) {
    rv_conn *hub = &rv->conns[0];
    uint8_t hello[RV_HELLO_SIZE] = {0};
    put_u32(hello, RV_MAGIC);
    put_u32(hello + 4, RV_VERSION);
    put_u32(hello + 8, (uint32_t)rv->rank);
    put_u32(hello + 12, (uint32_t)rv->world_size);
    put_u32(hello + 16, (uint32_t)rv->table[rv->rank].pid);
    memcpy(hello + 20, rv->table[rv->rank].name, RV_HOST_SIZE);
    if (send_frame(hub->fd, MSG_HELLO, hello, sizeof hello, deadline) != 0)
        return mb_fail(err, "rank %d: cannot send hello to rank 0 at %s:%d: %s", rv->rank, env->master_addr,
                       env->master_port, strerror(errno));
    int got_blob = 0;
    for (;;) {
        struct pollfd pfd = {hub->fd, POLLIN, 0};
        int ms = remaining_ms(deadline);
        if (ms == 0)
            return mb_fail(err, "rank %d: connected to rank 0 at %s:%d but the rendezvous did not finish within %g s "
                           "(rank 0 is still waiting for other ranks?)", rv->rank, env->master_addr, env->master_port,
                           timeout_seconds);
        if (poll(&pfd, 1, ms) <= 0) continue;
        int status = conn_fill(hub);
        rv_frame frame;
        while (conn_peek(hub, &frame)) {
            int verdict = peer_on_answer(rv, env, &frame, blob, blob_size, &got_blob, err);
            conn_consume(hub, &frame);
            if (verdict != 0) return verdict > 0 ? 0 : -1;
        }
        if (status != READ_OK)
            return mb_fail(err, "rank %d: rank 0 at %s:%d closed the connection during the rendezvous", rv->rank,
                           env->master_addr, env->master_port);
    }
}

/* ---- public API ---- */

int mb_rendezvous_open(mb_rendezvous **out, const mb_dist_env *env, void *blob, size_t blob_size,
                       double timeout_seconds, mb_error *err) {
    *out = NULL;
    if (env->world_size < 1 || env->rank < 0 || env->rank >= env->world_size)
        return mb_fail(err, "rendezvous: rank %d is outside world size %d", env->rank, env->world_size);
    if (blob_size > RV_MAX_FRAME) return mb_fail(err, "rendezvous: %zu bytes of data is too much (at most %u)", blob_size, RV_MAX_FRAME);
    if ((size_t)env->world_size * RV_TABLE_ENTRY > RV_MAX_FRAME)
        return mb_fail(err, "rendezvous: world size %d is too large", env->world_size);
    int conn_count = env->world_size == 1 ? 0 : env->rank == 0 ? env->world_size : 1;
    mb_rendezvous *rv = rv_alloc(env, conn_count);
    if (rv == NULL) return mb_fail(err, "rendezvous: out of memory");
    if (env->world_size == 1) {
        *out = rv;
        return 0;
    }
    double deadline = mb_monotonic_seconds() + timeout_seconds;
    int status;
    if (env->rank == 0) {
        status = hub_open(rv, env, blob, blob_size, deadline, timeout_seconds, err);
    } else {
        int fd = peer_connect(env, deadline, timeout_seconds, err);
        status = fd < 0 ? -1 : 0;
        if (status == 0) {
            set_socket_options(fd);
            conn_init(&rv->conns[0], fd);
            rv->conns[0].rank = 0;
            status = peer_exchange(rv, env, blob, blob_size, deadline, timeout_seconds, err);
        }
    }
    if (status == 0) status = start_watcher(rv, err);
    if (status != 0) {
        rv_free(rv);
        return -1;
    }
    *out = rv;
    return 0;
}

int mb_rendezvous_failed(mb_rendezvous *rv, char *why, size_t size) {
    if (rv == NULL || !atomic_load_explicit(&rv->failed, memory_order_acquire)) return 0;
    if (why != NULL && size > 0) {
        pthread_mutex_lock(&rv->state_lock);
        snprintf(why, size, "%s", rv->why);
        pthread_mutex_unlock(&rv->state_lock);
    }
    return 1;
}

void mb_rendezvous_report_failure(mb_rendezvous *rv, const char *message) {
    if (rv == NULL || rv->world_size == 1) return;
    char text[900];
    if (rv->rank == 0) {
        char who[160];
        describe(&rv->table[0], 0, who, sizeof who);
        snprintf(text, sizeof text, "%s failed: %s", who, message);
    } else {
        snprintf(text, sizeof text, "%s", message);
    }
    broadcast(rv, MSG_FAIL, text, -1);
}

void mb_rendezvous_close(mb_rendezvous *rv) {
    if (rv == NULL) return;
    if (rv->watcher_started) {
        broadcast(rv, MSG_GOODBYE, NULL, -1);
        ssize_t ignored = write(rv->wake_pipe[1], "x", 1);
        (void)ignored;
        pthread_join(rv->watcher, NULL);
    }
    rv_free(rv);
}

int mb_rendezvous_rank(const mb_rendezvous *rv) { return rv->rank; }

int mb_rendezvous_world_size(const mb_rendezvous *rv) { return rv->world_size; }
