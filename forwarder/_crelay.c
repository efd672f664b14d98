/* Raw mode in C: one thread per event loop that moves bytes between the two sockets of busy plain-TCP connections.
 *
 * rawmode.py's PyRaw does the same from uvloop reader callbacks, and is the reference and the fallback. What it
 * cannot shed is the event loop's turn and a Python call between epoll_wait returning and the write, on each hop.
 * Here the hop is epoll_wait, read, write, with nothing in between, and the GIL is never taken: the thread touches no Python
 * object. Python hands over duplicates of both sockets (Relay.add) and keeps the control plane: byte counts
 * (Link.counts), closing (Link.stop), and the end of a connection, which the thread reports through an eventfd
 * (Relay.fileno, Relay.done).
 *
 * The rules are PyRaw's: small messages are copied with one read and one write (the same system calls as HAProxy),
 * a read that fills COPY_READ switches that direction to splicing socket -> pipe -> socket, and a run of small
 * splices switches it back. Backpressure is the same: while the peer's socket is full, the unsent rest stays ours
 * (a malloc'd tail, or bytes in our pipe) and that direction stops reading. An EOF is passed on with
 * shutdown(SHUT_WR); once both directions saw one, or on any error, the connection is done and Python closes it.
 *
 * An inline relay (Relay(threaded=False)) is the same machine without the thread: Python runs it from its event loop
 * (Relay.run, when the epoll set Relay.fileno() turns readable), and it takes a connection from its node connect on
 * (Relay.connect): the connect's completion, every byte, both EOFs and the end are handled here, and Python hears of
 * them in Relay.run's reports (REPORT_*). That is direct.InlineClient, DirectClient's lean copy mode with no Python
 * call per event; a connection that stays busy is reported (REPORT_BUSY) and moves to the thread (Relay.adopt).
 * With the GIL held throughout, an inline relay never needs its lock, and frees a stopped pair at once.
 *
 * Locking: one mutex per relay. The thread holds it while it handles what one epoll_wait returned; Python holds it
 * in add, stop and counts. A stopped pair's memory goes to a graveyard the thread frees after its current batch, so
 * an event fetched before the stop never points at freed memory.
 */
#define _GNU_SOURCE /* pthread_setname_np */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Kept equal to rawmode.py's and resources.py's (the module exposes them; tests/test_crelay.py compares). */
#define COPY_READ (16 * 1024)
#define SPLICE_CHUNK (64 * 1024)
#define SEGMENT_BUDGET (65536 - 1 - 320)
#define SPLICE_BURST 16
#define BULK_MIN (16 * 1024)
#define COPY_AFTER_SMALL 8
#define PIPE_POOL_LIMIT 16
#define MAX_EVENTS 128
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

enum { RUNNING, CONNECTING, DONE, DEAD };
enum { STEP_OK, STEP_FAILED };
/* What Relay.run() reports per link (Relay.done() keeps only DONE and FAILED, as failed=False/True). */
enum { REPORT_DONE, REPORT_FAILED, REPORT_CONNECTED, REPORT_CONNECT_FAILED, REPORT_BUSY };

typedef struct Pair Pair;
typedef struct Relay Relay;

typedef struct {
    Pair *pair;
    int index; /* 0: the first socket handed over, 1: the second */
} Side;

/* One direction: reads fds[index], writes fds[1 - index]. */
typedef struct {
    char *tail; /* copy mode: the unsent rest of a chunk */
    size_t tail_len, tail_off;
    int pipe_r, pipe_w; /* splice mode: only while bytes wait in it for the peer's socket */
    size_t in_pipe;
    size_t chunk; /* splice at most this much at a time: splice_chunk() of the socket it writes */
    int copying, small_splices;
    int eof;
    uint64_t nbytes; /* bytes read */
} Dir;

struct Pair {
    Relay *relay;
    uint64_t id;
    int fds[2];
    uint32_t masks[2]; /* what each socket is registered for; 0 = not registered */
    Side sides[2];
    Dir dirs[2];
    int state;
    int failed;
    int failed_side; /* the socket whose error ended it (0 or 1), -1 if neither */
    int first_eof;   /* the direction that saw EOF first, -1 before any */
    int handoff;     /* messages until REPORT_BUSY (inline relays), 0: never */
    int64_t started_ns; /* when the connect began (Relay.connect) */
    Pair *next_dead;
};

struct Relay {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_t thread;
    int thread_running;
    int threaded; /* 0: an inline relay, run by Python from its event loop (Relay.run) */
    int open;
    int epfd, notify_fd, wake_fd;
    int closing;
    size_t live; /* pairs added and not stopped */
    /* Reports Python has not collected: link id, REPORT_* and a value (see Relay.run). */
    uint64_t *done_ids;
    char *done_kind;
    int64_t *done_value;
    size_t ndone, done_cap;
    Pair *graveyard;
    int pipes[PIPE_POOL_LIMIT][2]; /* empty pipes */
    int npipes;
    int pipes_open, pipe_limit; /* pipes that exist (pooled or holding bytes), and how many may */
    int can_splice;
    char buf[COPY_READ];
};

typedef struct {
    PyObject_HEAD
    Relay *relay; /* a strong reference: the relay outlives its links */
    Pair *pair;   /* NULL once stopped */
    uint64_t id;
    uint64_t final[2];
} Link;

static PyTypeObject RelayType;
static PyTypeObject LinkType;

/* Link ids are unique across relays: a link moved from an inline relay to the thread (Relay.adopt) keeps its id. */
static uint64_t next_link_id = 1;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void report(Relay *r, Pair *p, int kind, int64_t value)
{
    r->done_ids[r->ndone] = p->id;
    r->done_kind[r->ndone] = (char)kind;
    r->done_value[r->ndone] = value;
    r->ndone++;
}

/* Room for every report that can come before Python collects them (three per inline link: CONNECTED, BUSY and
 * the end), so handling an event never allocates. 0, or -1 without memory. */
static int reserve_reports(Relay *r, size_t pairs)
{
    size_t need = (r->live + pairs) * 3 + r->ndone;
    if (need <= r->done_cap)
        return 0;
    size_t cap = need * 2;
    uint64_t *ids = realloc(r->done_ids, cap * sizeof *ids);
    if (ids == NULL)
        return -1;
    r->done_ids = ids;
    char *kinds = realloc(r->done_kind, cap);
    if (kinds == NULL)
        return -1;
    r->done_kind = kinds;
    int64_t *values = realloc(r->done_value, cap * sizeof *values);
    if (values == NULL)
        return -1;
    r->done_value = values;
    r->done_cap = cap;
    return 0;
}

static int failed_at(Pair *p, int side)
{
    if (p->failed_side < 0)
        p->failed_side = side;
    return STEP_FAILED;
}

/* The most one splice moves: a whole number of the packets TCP makes of it on the socket it writes. TCP's size goal
 * for one (GSO) packet is gso_max_size - 1 - MAX_TCP_HEADER (65536 - 1 - 320 on x86_64) rounded down to the MSS, so
 * a 64 KiB splice left a runt: 65160 + 376 bytes at a 1500-byte MTU, 9 packets per 256 KiB where the sender sent 5.
 * SPLICE_CHUNK where the MSS is unknown (not TCP) or beyond the budget. */
static size_t splice_chunk(int fd)
{
    int mss = 0;
    socklen_t len = sizeof mss;
    if (getsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, &len) < 0 || mss <= 0 || mss > SEGMENT_BUDGET)
        return SPLICE_CHUNK;
    size_t packet = (size_t)(SEGMENT_BUDGET / mss) * (size_t)mss;
    return SPLICE_CHUNK / packet * packet;
}

/* ---- pipes (called with the lock held) ---- */

static int take_pipe(Relay *r, int *rd, int *wr)
{
    if (r->npipes) {
        r->npipes--;
        *rd = r->pipes[r->npipes][0];
        *wr = r->pipes[r->npipes][1];
        return 1;
    }
    if (!r->can_splice || r->pipes_open >= r->pipe_limit)
        return 0;
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return 0;
    r->pipes_open++;
    *rd = p[0];
    *wr = p[1];
    return 1;
}

/* An empty pipe goes back to the pool; one that still holds bytes (its connection died) is closed. */
static void give_pipe(Relay *r, int rd, int wr, int empty)
{
    if (empty && r->npipes < PIPE_POOL_LIMIT) {
        r->pipes[r->npipes][0] = rd;
        r->pipes[r->npipes][1] = wr;
        r->npipes++;
        return;
    }
    close(rd);
    close(wr);
    r->pipes_open--;
}

/* ---- one connection (the lock held) ---- */

static void set_mask(Pair *p, int i, uint32_t mask)
{
    if (p->masks[i] == mask)
        return;
    struct epoll_event ev = {.events = mask, .data.ptr = &p->sides[i]};
    int op = !p->masks[i] ? EPOLL_CTL_ADD : !mask ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    /* An unregistered socket is not watched at all: epoll reports hang-ups whatever the mask, and one we have no
     * use for (both directions waiting on the other socket) would spin the thread. */
    if (epoll_ctl(p->relay->epfd, op, p->fds[i], &ev) == 0 || op == EPOLL_CTL_DEL)
        p->masks[i] = mask;
    else
        p->failed = 1;
}

static int pending(const Dir *d) { return d->tail != NULL || d->in_pipe != 0; }

/* Register each socket for what its two directions wait for: reading it, and writing the other one's bytes to it. */
static void update_masks(Pair *p)
{
    if (p->state == CONNECTING) { /* only the node's socket (fds[1]), until its connect is done */
        set_mask(p, 0, 0);
        set_mask(p, 1, EPOLLOUT);
        return;
    }
    for (int i = 0; i < 2; i++) {
        Dir *in = &p->dirs[i], *out = &p->dirs[1 - i];
        uint32_t mask = 0;
        if (p->state == RUNNING) {
            if (!in->eof && !pending(in))
                mask |= EPOLLIN;
            if (pending(out))
                mask |= EPOLLOUT;
        }
        set_mask(p, i, mask);
    }
}

static void release(Pair *p)
{
    Relay *r = p->relay;
    for (int i = 0; i < 2; i++) {
        Dir *d = &p->dirs[i];
        free(d->tail);
        d->tail = NULL;
        if (d->pipe_r >= 0) {
            give_pipe(r, d->pipe_r, d->pipe_w, d->in_pipe == 0);
            d->pipe_r = d->pipe_w = -1;
            d->in_pipe = 0;
        }
    }
}

static void finish(Pair *p, int failed)
{
    Relay *r = p->relay;
    if (p->state != RUNNING)
        return;
    p->state = DONE;
    p->failed = failed;
    /* An inline relay's owner stops the link (closing both sockets, which takes them out of the epoll set) before
     * the next epoll_wait: no epoll_ctl. The thread's may wait for Python, so it unregisters both. */
    if (r->threaded)
        update_masks(p);
    release(p);
    if (failed)
        report(r, p, REPORT_FAILED, p->failed_side);
    else
        report(r, p, REPORT_DONE, p->first_eof);
}

/* Our side of direction `i` sent EOF: pass it on at once (the second one too, rather than wait for Python to
 * close the sockets); the caller finishes once both directions have. */
static int on_eof(Pair *p, int i)
{
    p->dirs[i].eof = 1;
    if (p->first_eof < 0)
        p->first_eof = i;
    else if (!p->relay->threaded)
        return STEP_OK; /* the second: its owner closes both sockets at once, which says as much */
    if (shutdown(p->fds[1 - i], SHUT_WR) < 0)
        return failed_at(p, 1 - i);
    return STEP_OK;
}

/* Send what waits in direction i: STEP_OK (maybe not all of it: pending() tells) or STEP_FAILED. */
static int flush(Pair *p, int i)
{
    Dir *d = &p->dirs[i];
    int out = p->fds[1 - i];
    if (d->tail != NULL) {
        ssize_t sent = send(out, d->tail + d->tail_off, d->tail_len - d->tail_off, MSG_NOSIGNAL);
        if (sent < 0)
            return (errno == EAGAIN || errno == EINTR) ? STEP_OK : failed_at(p, 1 - i);
        d->tail_off += (size_t)sent;
        if (d->tail_off < d->tail_len)
            return STEP_OK;
        free(d->tail);
        d->tail = NULL;
    }
    while (d->in_pipe) {
        ssize_t sent = splice(d->pipe_r, NULL, out, NULL, d->in_pipe, SPLICE_FLAGS);
        if (sent < 0)
            return (errno == EAGAIN || errno == EINTR) ? STEP_OK : failed_at(p, 1 - i);
        d->in_pipe -= (size_t)sent;
    }
    if (d->pipe_r >= 0) {
        give_pipe(p->relay, d->pipe_r, d->pipe_w, 1);
        d->pipe_r = d->pipe_w = -1;
    }
    return STEP_OK;
}

static int splice_chunks(Pair *p, int i)
{
    Relay *r = p->relay;
    Dir *d = &p->dirs[i];
    int in = p->fds[i], out = p->fds[1 - i];
    if (d->chunk == 0) /* on first use: most connections never splice, and this is a system call */
        d->chunk = splice_chunk(out);
    for (int burst = 0; burst < SPLICE_BURST; burst++) {
        int pr, pw;
        if (!take_pipe(r, &pr, &pw)) {
            d->copying = 1; /* no pipe to spare: level-triggered epoll brings the bytes back as a copy */
            return STEP_OK;
        }
        ssize_t n = splice(in, NULL, pw, NULL, d->chunk, SPLICE_FLAGS);
        if (n < 0) {
            int err = errno;
            give_pipe(r, pr, pw, 1);
            if (err == EAGAIN || err == EINTR)
                return STEP_OK;
            if (err == EINVAL || err == ENOSYS || err == EOPNOTSUPP) {
                r->can_splice = 0; /* nothing moved: this kernel or socket cannot splice, copy from now on */
                d->copying = 1;
                return STEP_OK;
            }
            return failed_at(p, i);
        }
        if (n == 0) {
            give_pipe(r, pr, pw, 1);
            return on_eof(p, i);
        }
        d->nbytes += (uint64_t)n;
        ssize_t sent = splice(pr, NULL, out, NULL, (size_t)n, SPLICE_FLAGS);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                give_pipe(r, pr, pw, 0);
                return failed_at(p, 1 - i);
            }
            sent = 0;
        }
        if (sent < n) { /* the peer's socket is full: the rest stays in the pipe, ours until it drains */
            d->pipe_r = pr;
            d->pipe_w = pw;
            d->in_pipe = (size_t)(n - sent);
            return STEP_OK;
        }
        give_pipe(r, pr, pw, 1);
        if (n >= BULK_MIN) {
            d->small_splices = 0;
            if ((size_t)n < d->chunk)
                return STEP_OK;
            continue;
        }
        /* The tail of a bulk message, or a stream of small ones: only a run of small splices means the latter. */
        if (++d->small_splices >= COPY_AFTER_SMALL) {
            d->small_splices = 0;
            d->copying = 1;
        }
        return STEP_OK;
    }
    return STEP_OK;
}

static int readable(Pair *p, int i)
{
    Relay *r = p->relay;
    Dir *d = &p->dirs[i];
    if (!d->copying)
        return splice_chunks(p, i);
    ssize_t n = read(p->fds[i], r->buf, COPY_READ);
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? STEP_OK : failed_at(p, i);
    if (n == 0)
        return on_eof(p, i);
    d->nbytes += (uint64_t)n;
    if (p->handoff && --p->handoff == 0)
        report(r, p, REPORT_BUSY, 0);
    ssize_t sent = send(p->fds[1 - i], r->buf, (size_t)n, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return failed_at(p, 1 - i);
        sent = 0;
    }
    if (sent < n) {
        d->tail = malloc((size_t)(n - sent));
        if (d->tail == NULL)
            return STEP_FAILED;
        memcpy(d->tail, r->buf + sent, (size_t)(n - sent));
        d->tail_len = (size_t)(n - sent);
        d->tail_off = 0;
    } else if (n == COPY_READ && r->can_splice) {
        d->copying = 0; /* a full read: more is probably queued, and it is bulk */
        return splice_chunks(p, i);
    }
    return STEP_OK;
}

static void handle(Pair *p, int i, uint32_t events);

/* The node's connect (Relay.connect) is done: relay from now on, or report why it failed. As the Python path does,
 * SO_ERROR is read only when epoll flags an error. */
static void connect_done(Pair *p, uint32_t events)
{
    Relay *r = p->relay;
    int err = 0;
    if (events & (EPOLLERR | EPOLLHUP)) {
        socklen_t len = sizeof err;
        if (getsockopt(p->fds[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
    }
    if (err) {
        p->state = DONE;
        set_mask(p, 1, 0); /* the owner reads the client before it closes both: no level-triggered repeats */
        report(r, p, REPORT_CONNECT_FAILED, err);
        return;
    }
    p->state = RUNNING;
    report(r, p, REPORT_CONNECTED, now_ns() - p->started_ns);
    /* The client has usually sent its request by now: read it at once (one read, EAGAIN at worst) rather than
     * after the next epoll_wait, a whole loop iteration later. */
    handle(p, 0, EPOLLIN);
}

static void handle(Pair *p, int i, uint32_t events)
{
    int step = STEP_OK;
    if (p->state == CONNECTING) {
        if (i == 1)
            connect_done(p, events);
        return;
    }
    Dir *out = &p->dirs[1 - i]; /* the direction that writes to this socket */
    if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && pending(out))
        step = flush(p, 1 - i);
    if (step == STEP_OK && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && !p->dirs[i].eof && !pending(&p->dirs[i]))
        step = readable(p, i);
    if (step != STEP_OK || p->failed)
        finish(p, 1);
    else if (p->dirs[0].eof && p->dirs[1].eof)
        finish(p, 0);
    else
        update_masks(p);
}

static void *run(void *arg)
{
    Relay *r = arg;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR)
            break;
        pthread_mutex_lock(&r->lock);
        if (r->closing) {
            pthread_mutex_unlock(&r->lock);
            break;
        }
        size_t before = r->ndone;
        for (int k = 0; k < n; k++) {
            Side *side = events[k].data.ptr;
            if (side == NULL || side->pair->state != RUNNING)
                continue; /* the wake-up eventfd, or a pair Python stopped since epoll_wait returned */
            /* (No pair here is CONNECTING: only inline relays connect.) */
            handle(side->pair, side->index, events[k].events);
        }
        while (r->graveyard != NULL) {
            Pair *dead = r->graveyard;
            r->graveyard = dead->next_dead;
            free(dead);
        }
        if (r->ndone != before) {
            uint64_t one = 1;
            ssize_t ignored = write(r->notify_fd, &one, sizeof one);
            (void)ignored; /* a full eventfd counter still reads as readable */
        }
        pthread_mutex_unlock(&r->lock);
    }
    return NULL;
}

/* ---- Relay ---- */

static void relay_stop_thread(Relay *r)
{
    r->open = 0;
    if (!r->thread_running)
        return;
    pthread_mutex_lock(&r->lock);
    r->closing = 1;
    pthread_mutex_unlock(&r->lock);
    uint64_t one = 1;
    ssize_t ignored = write(r->wake_fd, &one, sizeof one);
    (void)ignored;
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->thread_running = 0;
    while (r->graveyard != NULL) {
        Pair *dead = r->graveyard;
        r->graveyard = dead->next_dead;
        free(dead);
    }
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"pipe_limit", "threaded", NULL};
    int pipe_limit = 0, threaded = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|p", kwlist, &pipe_limit, &threaded))
        return NULL;
    if (pipe_limit < 0) {
        PyErr_SetString(PyExc_ValueError, "pipe_limit must be >= 0");
        return NULL;
    }
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->epfd = r->notify_fd = r->wake_fd = -1;
    r->pipe_limit = pipe_limit;
    r->can_splice = 1;
    r->threaded = threaded;
    pthread_mutex_init(&r->lock, NULL);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    r->open = 1;
    if (!threaded)
        return (PyObject *)r;
    r->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->notify_fd < 0 || r->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    /* Signals stay with Python's threads: the relay thread starts with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&r->thread, NULL, run, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(r);
        return NULL;
    }
    r->thread_running = 1;
    pthread_setname_np(r->thread, "natfwd-relay"); /* what top -H and ps -L show */
    return (PyObject *)r;
}

static void Relay_dealloc(Relay *r)
{
    relay_stop_thread(r);
    for (int k = 0; k < r->npipes; k++) {
        close(r->pipes[k][0]);
        close(r->pipes[k][1]);
    }
    r->npipes = 0;
    if (r->epfd >= 0)
        close(r->epfd);
    if (r->notify_fd >= 0)
        close(r->notify_fd);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    free(r->done_ids);
    free(r->done_kind);
    free(r->done_value);
    pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Relay_fileno(Relay *r, PyObject *unused) { return PyLong_FromLong(r->threaded ? r->notify_fd : r->epfd); }

/* A Link for a new pair of fd0 and fd1 in `state` (RUNNING or CONNECTING), registered; NULL with an exception set,
 * and then neither descriptor is the relay's. */
static Link *new_link(Relay *r, int fd0, int fd1, unsigned long long count0, unsigned long long count1, int state)
{
    if (!r->open) {
        PyErr_SetString(PyExc_RuntimeError, "the relay is closed");
        return NULL;
    }
    if (fd0 < 0 || fd1 < 0 || fd0 == fd1) {
        PyErr_SetString(PyExc_ValueError, "two distinct open descriptors are needed");
        return NULL;
    }
    Link *link = PyObject_New(Link, &LinkType);
    if (link == NULL)
        return NULL;
    link->relay = NULL;
    link->pair = NULL;
    Pair *p = calloc(1, sizeof *p);
    if (p == NULL) {
        Py_DECREF(link);
        PyErr_NoMemory();
        return NULL;
    }
    Py_INCREF(r);
    link->relay = r;
    p->relay = r;
    p->fds[0] = fd0;
    p->fds[1] = fd1;
    p->failed_side = p->first_eof = -1;
    for (int i = 0; i < 2; i++) {
        p->sides[i].pair = p;
        p->sides[i].index = i;
        p->dirs[i].pipe_r = p->dirs[i].pipe_w = -1;
        p->dirs[i].copying = 1;
    }
    p->dirs[0].nbytes = count0;
    p->dirs[1].nbytes = count1;
    pthread_mutex_lock(&r->lock);
    if (reserve_reports(r, 1) < 0) {
        pthread_mutex_unlock(&r->lock);
        free(p);
        Py_DECREF(link);
        PyErr_NoMemory();
        return NULL;
    }
    p->id = next_link_id++;
    p->state = state;
    update_masks(p);
    int failed = p->failed;
    if (failed) {
        p->state = DONE;
        for (int i = 0; i < 2; i++)
            set_mask(p, i, 0);
    } else {
        r->live++;
    }
    pthread_mutex_unlock(&r->lock);
    if (failed) {
        free(p);
        Py_DECREF(link);
        PyErr_SetString(PyExc_OSError, "epoll_ctl refused a descriptor");
        return NULL;
    }
    link->pair = p;
    link->id = p->id;
    link->final[0] = count0;
    link->final[1] = count1;
    return link;
}

static PyObject *Relay_add(Relay *r, PyObject *args)
{
    int fd0, fd1;
    unsigned long long count0 = 0, count1 = 0;
    if (!PyArg_ParseTuple(args, "ii|KK", &fd0, &fd1, &count0, &count1))
        return NULL;
    Link *link = new_link(r, fd0, fd1, count0, count1, RUNNING);
    if (link == NULL)
        return NULL;
    return (PyObject *)link; /* fds are ours now: Link.stop closes them */
}

/* Relay.connect(fd, family, host, port, handoff): connect a new non-blocking socket to (host, port) and relay
 * between `fd` (fd0, the client's) and it (fd1) once connected. Inline relays only. */
static PyObject *Relay_connect(Relay *r, PyObject *args)
{
    int fd, family, port, handoff = 0;
    const char *host;
    if (!PyArg_ParseTuple(args, "iisi|i", &fd, &family, &host, &port, &handoff))
        return NULL;
    if (r->threaded) {
        PyErr_SetString(PyExc_RuntimeError, "connect() is for inline relays (threaded=False)");
        return NULL;
    }
    struct sockaddr_storage addr;
    socklen_t addr_len;
    memset(&addr, 0, sizeof addr);
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&addr;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        addr_len = sizeof *in;
        if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
            family = -1;
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&addr;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        addr_len = sizeof *in6;
        if (inet_pton(AF_INET6, host, &in6->sin6_addr) != 1)
            family = -1;
    } else {
        family = -1;
    }
    if (family < 0 || port < 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "not an IP address and port: %s %d", host, port);
        return NULL;
    }
    int node = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (node < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int one = 1, state = RUNNING;
    int64_t started = now_ns();
    if (setsockopt(node, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        state = -1;
    else if (connect(node, (struct sockaddr *)&addr, addr_len) < 0)
        state = errno == EINPROGRESS ? CONNECTING : -1;
    if (state < 0) {
        int err = errno;
        close(node);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Link *link = new_link(r, fd, node, 0, 0, state);
    if (link == NULL) {
        close(node);
        return NULL;
    }
    Pair *p = link->pair;
    p->started_ns = started;
    p->handoff = handoff;
    return (PyObject *)link;
}

static PyObject *reports(Relay *r, int detailed)
{
    PyObject *list = PyList_New((Py_ssize_t)r->ndone);
    if (list == NULL)
        return NULL;
    for (size_t k = 0; k < r->ndone; k++) {
        PyObject *item;
        if (detailed)
            item = Py_BuildValue("(KiL)", (unsigned long long)r->done_ids[k], (int)r->done_kind[k],
                                 (long long)r->done_value[k]);
        else
            item = Py_BuildValue("(KO)", (unsigned long long)r->done_ids[k],
                                 r->done_kind[k] == REPORT_FAILED ? Py_True : Py_False);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, item);
    }
    r->ndone = 0;
    return list;
}

static PyObject *Relay_done(Relay *r, PyObject *unused)
{
    uint64_t value;
    if (r->threaded) {
        ssize_t ignored = read(r->notify_fd, &value, sizeof value); /* re-arms the eventfd */
        (void)ignored;
    }
    pthread_mutex_lock(&r->lock);
    PyObject *list = reports(r, 0);
    pthread_mutex_unlock(&r->lock);
    return list;
}

/* An inline relay's turn: handle what epoll has for it now, and return what happened since the last call. The
 * GIL stays held: this is a few system calls per event, and Python has nothing else to run meanwhile. */
static PyObject *Relay_run(Relay *r, PyObject *unused)
{
    if (r->threaded) {
        PyErr_SetString(PyExc_RuntimeError, "run() is for inline relays (threaded=False); the thread runs itself");
        return NULL;
    }
    struct epoll_event events[MAX_EVENTS];
    int n = r->open ? epoll_wait(r->epfd, events, MAX_EVENTS, 0) : 0;
    for (int k = 0; k < n; k++) {
        Pair *p = ((Side *)events[k].data.ptr)->pair;
        if (p->state == RUNNING || p->state == CONNECTING)
            handle(p, ((Side *)events[k].data.ptr)->index, events[k].events);
    }
    return reports(r, 1);
}

/* Relay.adopt(link): take a running link of an inline relay into this thread's, when nothing of it waits to be
 * sent (no tail, no pipe). True if taken; the id stays. */
static PyObject *Relay_adopt(Relay *r, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &LinkType)) {
        PyErr_SetString(PyExc_TypeError, "adopt() takes a Link");
        return NULL;
    }
    Link *link = (Link *)arg;
    Pair *p = link->pair;
    Relay *old = link->relay;
    if (!r->threaded || !r->open || p == NULL || old == r || old->threaded || p->state != RUNNING || p->failed)
        Py_RETURN_FALSE;
    for (int i = 0; i < 2; i++)
        if (pending(&p->dirs[i]) || p->dirs[i].pipe_r >= 0)
            Py_RETURN_FALSE;
    pthread_mutex_lock(&r->lock);
    if (reserve_reports(r, 1) < 0) {
        pthread_mutex_unlock(&r->lock);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < 2; i++)
        set_mask(p, i, 0); /* out of the inline relay's epoll set, with p->relay still the old one */
    old->live--;
    p->relay = r;
    p->handoff = 0;
    p->failed = 0;
    r->live++;
    update_masks(p);
    if (p->failed) {
        finish(p, 1);
        uint64_t one = 1;
        ssize_t ignored = write(r->notify_fd, &one, sizeof one);
        (void)ignored;
    }
    pthread_mutex_unlock(&r->lock);
    Py_INCREF(r);
    link->relay = r;
    Py_DECREF(old);
    Py_RETURN_TRUE;
}

static PyObject *Relay_stats(Relay *r, PyObject *unused)
{
    pthread_mutex_lock(&r->lock);
    PyObject *result = Py_BuildValue("{s:i,s:i,s:O}", "pipes_open", r->pipes_open, "pipes_pooled", r->npipes,
                                     "can_splice", r->can_splice ? Py_True : Py_False);
    pthread_mutex_unlock(&r->lock);
    return result;
}

static PyObject *Relay_close(Relay *r, PyObject *unused)
{
    relay_stop_thread(r);
    Py_RETURN_NONE;
}

static PyMethodDef Relay_methods[] = {
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "Threaded: an eventfd that turns readable when connections finish. Inline: the epoll set Relay.run() serves."},
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(fd0, fd1, count0=0, count1=0) -> Link: relay between two sockets; the descriptors become the relay's."},
    {"connect", (PyCFunction)Relay_connect, METH_VARARGS,
     "connect(fd, family, host, port, handoff=0) -> Link: connect to (host, port) and relay between fd and that "
     "socket once connected (inline relays); fd becomes the relay's, unless this raises."},
    {"run", (PyCFunction)Relay_run, METH_NOARGS,
     "Inline relays: handle what is ready now; [(id, kind, value)] of what happened since the last call."},
    {"adopt", (PyCFunction)Relay_adopt, METH_O,
     "adopt(link) -> bool: move a quiet link of an inline relay into this thread's."},
    {"done", (PyCFunction)Relay_done, METH_NOARGS, "[(id, failed)] of connections finished since the last call."},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "Pipes open and pooled, and whether splice still works."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "Stop the thread (links must be stopped by their owners)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forwarder._crelay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relay(pipe_limit, threaded=True): a thread (or, inline, the caller's Relay.run()) moving bytes "
              "between pairs of sockets.",
    .tp_new = Relay_new,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

/* ---- Link ---- */

static void link_stop(Link *link)
{
    Pair *p = link->pair;
    if (p == NULL)
        return;
    Relay *r = link->relay;
    pthread_mutex_lock(&r->lock);
    link->final[0] = p->dirs[0].nbytes;
    link->final[1] = p->dirs[1].nbytes;
    if (p->state == RUNNING || p->state == CONNECTING)
        p->state = DONE;
    if (r->threaded)
        update_masks(p); /* unregisters both */
    else
        p->masks[0] = p->masks[1] = 0; /* closing them below takes them out of the epoll set */
    release(p);
    close(p->fds[0]);
    close(p->fds[1]);
    p->state = DEAD;
    r->live--;
    if (r->thread_running) {
        p->next_dead = r->graveyard; /* the thread may hold an event for it: freed after its current batch */
        r->graveyard = p;
    } else {
        free(p);
    }
    link->pair = NULL;
    pthread_mutex_unlock(&r->lock);
}

static PyObject *Link_counts(Link *link, PyObject *unused)
{
    Pair *p = link->pair;
    if (p != NULL) {
        pthread_mutex_lock(&link->relay->lock);
        link->final[0] = p->dirs[0].nbytes;
        link->final[1] = p->dirs[1].nbytes;
        pthread_mutex_unlock(&link->relay->lock);
    }
    return Py_BuildValue("(KK)", (unsigned long long)link->final[0], (unsigned long long)link->final[1]);
}

static PyObject *Link_stop(Link *link, PyObject *unused)
{
    link_stop(link);
    return Py_BuildValue("(KK)", (unsigned long long)link->final[0], (unsigned long long)link->final[1]);
}

static PyObject *Link_state(Link *link, PyObject *unused)
{
    Pair *p = link->pair;
    if (p == NULL)
        return PyUnicode_FromString("stopped");
    pthread_mutex_lock(&link->relay->lock);
    int state = p->state, failed = p->failed;
    pthread_mutex_unlock(&link->relay->lock);
    return PyUnicode_FromString(state == RUNNING      ? "running"
                                : state == CONNECTING ? "connecting"
                                : failed              ? "failed"
                                                      : "done");
}

static PyObject *Link_get_connecting(Link *link, void *unused)
{
    return PyBool_FromLong(link->pair != NULL && link->pair->state == CONNECTING);
}

static size_t unsent(const Dir *d) { return (d->tail ? d->tail_len - d->tail_off : 0) + d->in_pipe; }

static PyObject *Link_pending(Link *link, PyObject *unused)
{
    Pair *p = link->pair;
    if (p == NULL)
        return Py_BuildValue("(nn)", (Py_ssize_t)0, (Py_ssize_t)0);
    pthread_mutex_lock(&link->relay->lock);
    size_t first = unsent(&p->dirs[0]), second = unsent(&p->dirs[1]);
    pthread_mutex_unlock(&link->relay->lock);
    return Py_BuildValue("(nn)", (Py_ssize_t)first, (Py_ssize_t)second);
}

static PyObject *Link_get_id(Link *link, void *unused) { return PyLong_FromUnsignedLongLong(link->id); }

static void Link_dealloc(Link *link)
{
    if (link->relay != NULL) {
        link_stop(link);
        Py_CLEAR(link->relay);
    }
    PyObject_Free(link);
}

static PyMethodDef Link_methods[] = {
    {"counts", (PyCFunction)Link_counts, METH_NOARGS, "(bytes read from fd0, bytes read from fd1) so far."},
    {"stop", (PyCFunction)Link_stop, METH_NOARGS, "Stop relaying and close both descriptors; returns counts()."},
    {"pending", (PyCFunction)Link_pending, METH_NOARGS,
     "(bytes read from fd0, from fd1) that wait for the other socket to take them: that direction is not reading."},
    {"state", (PyCFunction)Link_state, METH_NOARGS, "'running', 'done', 'failed' or 'stopped'."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Link_getset[] = {
    {"id", (getter)Link_get_id, NULL, "The id Relay.done() and Relay.run() report.", NULL},
    {"connecting", (getter)Link_get_connecting, NULL, "Whether Relay.connect's connect is still under way.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LinkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forwarder._crelay.Link",
    .tp_basicsize = sizeof(Link),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One relayed connection (made by Relay.add).",
    .tp_dealloc = (destructor)Link_dealloc,
    .tp_methods = Link_methods,
    .tp_getset = Link_getset,
};

/* ---- module ---- */

static PyObject *module_splice_chunk(PyObject *self, PyObject *arg)
{
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0)
        return NULL;
    return PyLong_FromSize_t(splice_chunk(fd));
}

/* accept(listen_fd) -> (fd, ip, error) or None when none is queued: socket.accept() for direct connections, with
 * what they need done in the same call. The socket is non-blocking and close-on-exec from accept4() (CPython's
 * asks for close-on-exec only, so setblocking() costs an ioctl), `error` is its pending SO_ERROR (non-zero: it
 * reset while queued), and no socket object is made (CPython's validates the descriptor with getsockname()). */
static PyObject *module_accept(PyObject *self, PyObject *arg)
{
    int lfd = PyObject_AsFileDescriptor(arg);
    if (lfd < 0)
        return NULL;
    struct sockaddr_storage addr;
    socklen_t len = sizeof addr;
    int fd = accept4(lfd, (struct sockaddr *)&addr, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int err = 0;
    socklen_t err_len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_len) < 0)
        err = errno;
    char ip[NI_MAXHOST];
    int ok;
    if (addr.ss_family == AF_INET) /* as CPython formats it, for less than getnameinfo() costs */
        ok = inet_ntop(AF_INET, &((struct sockaddr_in *)&addr)->sin_addr, ip, sizeof ip) != NULL;
    else /* IPv6 as CPython does: with the scope of a link-local address */
        ok = getnameinfo((struct sockaddr *)&addr, len, ip, sizeof ip, NULL, 0, NI_NUMERICHOST) == 0;
    if (!ok) {
        close(fd);
        PyErr_SetString(PyExc_OSError, "accept: the peer's address could not be formatted");
        return NULL;
    }
    PyObject *result = Py_BuildValue("(isi)", fd, ip, err);
    if (result == NULL)
        close(fd);
    return result;
}

static PyMethodDef module_methods[] = {
    {"accept", module_accept, METH_O,
     "accept(listen_fd) -> (fd, ip, error) or None: accept4() non-blocking, and the socket's pending error."},
    {"splice_chunk", module_splice_chunk, METH_O, "The most one splice moves for a direction that writes this socket."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "forwarder._crelay", "Raw mode's relay thread in C (see rawmode.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__crelay(void)
{
    if (PyType_Ready(&RelayType) < 0 || PyType_Ready(&LinkType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddObjectRef(m, "Link", (PyObject *)&LinkType) < 0 ||
        PyModule_AddIntConstant(m, "COPY_READ", COPY_READ) < 0 ||
        PyModule_AddIntConstant(m, "SPLICE_CHUNK", SPLICE_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "SEGMENT_BUDGET", SEGMENT_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "SPLICE_BURST", SPLICE_BURST) < 0 ||
        PyModule_AddIntConstant(m, "BULK_MIN", BULK_MIN) < 0 ||
        PyModule_AddIntConstant(m, "COPY_AFTER_SMALL", COPY_AFTER_SMALL) < 0 ||
        PyModule_AddIntConstant(m, "PIPE_POOL_LIMIT", PIPE_POOL_LIMIT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
