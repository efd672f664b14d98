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
#include <sys/socket.h>
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

enum { RUNNING, DONE, DEAD };
enum { STEP_OK, STEP_FAILED };

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
    Pair *next_dead;
};

struct Relay {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_t thread;
    int thread_running;
    int epfd, notify_fd, wake_fd;
    int closing;
    uint64_t next_id;
    size_t live; /* pairs added and not stopped */
    /* Finished pairs Python has not collected: their ids and whether they failed. */
    uint64_t *done_ids;
    char *done_failed;
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
    update_masks(p); /* unregisters both */
    release(p);
    r->done_ids[r->ndone] = p->id;
    r->done_failed[r->ndone] = (char)failed;
    r->ndone++;
}

/* Our side of direction `i` sent EOF: pass it on at once (the second one too, rather than wait for Python to
 * close the sockets); the caller finishes once both directions have. */
static int on_eof(Pair *p, int i)
{
    p->dirs[i].eof = 1;
    if (shutdown(p->fds[1 - i], SHUT_WR) < 0)
        return STEP_FAILED;
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
            return (errno == EAGAIN || errno == EINTR) ? STEP_OK : STEP_FAILED;
        d->tail_off += (size_t)sent;
        if (d->tail_off < d->tail_len)
            return STEP_OK;
        free(d->tail);
        d->tail = NULL;
    }
    while (d->in_pipe) {
        ssize_t sent = splice(d->pipe_r, NULL, out, NULL, d->in_pipe, SPLICE_FLAGS);
        if (sent < 0)
            return (errno == EAGAIN || errno == EINTR) ? STEP_OK : STEP_FAILED;
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
            return STEP_FAILED;
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
                return STEP_FAILED;
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
        return (errno == EAGAIN || errno == EINTR) ? STEP_OK : STEP_FAILED;
    if (n == 0)
        return on_eof(p, i);
    d->nbytes += (uint64_t)n;
    ssize_t sent = send(p->fds[1 - i], r->buf, (size_t)n, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return STEP_FAILED;
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

static void handle(Pair *p, int i, uint32_t events)
{
    int step = STEP_OK;
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
    static char *kwlist[] = {"pipe_limit", NULL};
    int pipe_limit = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &pipe_limit))
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
    r->next_id = 1;
    pthread_mutex_init(&r->lock, NULL);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->epfd < 0 || r->notify_fd < 0 || r->wake_fd < 0) {
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
    free(r->done_failed);
    pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Relay_fileno(Relay *r, PyObject *unused) { return PyLong_FromLong(r->notify_fd); }

static PyObject *Relay_add(Relay *r, PyObject *args)
{
    int fd0, fd1;
    unsigned long long count0 = 0, count1 = 0;
    if (!PyArg_ParseTuple(args, "ii|KK", &fd0, &fd1, &count0, &count1))
        return NULL;
    if (!r->thread_running) {
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
    Pair *p = calloc(1, sizeof *p);
    if (p == NULL) {
        link->relay = NULL;
        link->pair = NULL;
        Py_DECREF(link);
        return PyErr_NoMemory();
    }
    Py_INCREF(r);
    link->relay = r;
    p->relay = r;
    p->fds[0] = fd0;
    p->fds[1] = fd1;
    for (int i = 0; i < 2; i++) {
        p->sides[i].pair = p;
        p->sides[i].index = i;
        p->dirs[i].pipe_r = p->dirs[i].pipe_w = -1;
        p->dirs[i].copying = 1;
        p->dirs[i].chunk = splice_chunk(p->fds[1 - i]);
    }
    p->dirs[0].nbytes = count0;
    p->dirs[1].nbytes = count1;
    pthread_mutex_lock(&r->lock);
    /* Room for every report that can come before Python collects them, so the thread never allocates. */
    size_t need = r->live + r->ndone + 1;
    if (need > r->done_cap) {
        size_t cap = need * 2;
        uint64_t *ids = realloc(r->done_ids, cap * sizeof *ids);
        if (ids != NULL)
            r->done_ids = ids;
        char *flags = ids == NULL ? NULL : realloc(r->done_failed, cap);
        if (flags != NULL)
            r->done_failed = flags;
        if (ids == NULL || flags == NULL) {
            pthread_mutex_unlock(&r->lock);
            free(p);
            link->pair = NULL;
            Py_DECREF(link);
            return PyErr_NoMemory();
        }
        r->done_cap = cap;
    }
    p->id = r->next_id++;
    p->state = RUNNING;
    update_masks(p);
    int failed = p->failed;
    if (failed) {
        p->state = DONE;
        update_masks(p);
    }
    if (!failed)
        r->live++;
    pthread_mutex_unlock(&r->lock);
    if (failed) {
        free(p);
        link->pair = NULL;
        Py_DECREF(link);
        PyErr_SetString(PyExc_OSError, "epoll_ctl refused a descriptor");
        return NULL;
    }
    link->pair = p;
    link->id = p->id;
    link->final[0] = count0;
    link->final[1] = count1;
    return (PyObject *)link; /* fds are ours now: Link.stop closes them */
}

static PyObject *Relay_done(Relay *r, PyObject *unused)
{
    uint64_t value;
    ssize_t ignored = read(r->notify_fd, &value, sizeof value); /* re-arms the eventfd */
    (void)ignored;
    pthread_mutex_lock(&r->lock);
    size_t n = r->ndone;
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list != NULL) {
        for (size_t k = 0; k < n; k++) {
            PyObject *item = Py_BuildValue("(KO)", (unsigned long long)r->done_ids[k],
                                           r->done_failed[k] ? Py_True : Py_False);
            if (item == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)k, item);
        }
        if (list != NULL)
            r->ndone = 0;
    }
    pthread_mutex_unlock(&r->lock);
    return list;
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
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The eventfd that turns readable when connections finish."},
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(fd0, fd1, count0=0, count1=0) -> Link: relay between two sockets; the descriptors become the relay's."},
    {"done", (PyCFunction)Relay_done, METH_NOARGS, "[(id, failed)] of connections finished since the last call."},
    {"stats", (PyCFunction)Relay_stats, METH_NOARGS, "Pipes open and pooled, and whether splice still works."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "Stop the thread (links must be stopped by their owners)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forwarder._crelay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relay(pipe_limit): a thread moving bytes between pairs of sockets.",
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
    if (p->state == RUNNING)
        p->state = DONE;
    update_masks(p); /* unregisters both */
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
    return PyUnicode_FromString(state == RUNNING ? "running" : failed ? "failed" : "done");
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
    {"id", (getter)Link_get_id, NULL, "The id Relay.done() reports.", NULL},
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

static PyMethodDef module_methods[] = {
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
