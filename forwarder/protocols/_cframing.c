/* The scanners of forwarder/protocols/framing.py in C: the same functions, arguments, results and errors.
 *
 * framing.py is the reference (its docstrings say what each returns); this file only makes it cheap. A multiplexed
 * request costs about 1.5 us of Python to scan and its reply 0.4-1 us, as much as the rest of natfwd's work on it;
 * here each is under 0.1 us. tests/test_framing.py runs every test against both, and a differential fuzz compares
 * them on mutated input. Built when a compiler is there (pyproject.toml, optional); NATFWD_NO_EXTENSIONS=1 turns
 * it off. Python's own quirks are kept where a reply could show them (int() takes " +1_0 "), so the two never
 * disagree on what a node sent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define STAY 0
#define PIN (-1)
#define SATURATED ((int64_t)1 << 62) /* any length at least this big is "more than any buffer holds" */
#define INT_MAX_DIGITS 4300          /* int()'s default limit on decimal digits (sys.get_int_max_str_digits) */

/* Kept equal to framing.py's by test_framing.py (the module exposes them). */
#define KEY_MAX 250
#define REDIS_MAX_ARGS 1024
#define REDIS_BULK_MAX (1024 * 1024)
#define MEMCACHED_LINE_MAX 8192
#define MEMCACHED_SHORT_LINE_MAX 2048
#define REPLY_LINE_MAX 8192
#define COMMAND_MAX 32 /* no Redis command name is longer (framing.py's redis_requests says the same) */

static PyObject *FramingError;  /* framing.FramingError, handed over by init() */
static char (*commands)[COMMAND_MAX + 1]; /* framing.REDIS_COMMANDS */
/* A hash set over `commands` (open addressing; an entry's index + 1, 0 when empty): every request's name is looked
 * up, and a binary search's string compares cost a pipeline of 16 GETs a third of its scan. */
static uint32_t *command_slots;
static uint32_t command_mask;

static inline uint32_t fnv1a(uint32_t h, unsigned char c) { return (h ^ c) * 16777619u; }
#define FNV_START 2166136261u

/* ---- small helpers over bytes ---- */

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* Python's Py_ISSPACE for bytes: what int() strips and bytes.split() splits on. */
static inline int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* bytes.isdigit() of b[s:e]: non-empty, ASCII digits only. */
static int all_digits(const unsigned char *b, Py_ssize_t s, Py_ssize_t e)
{
    if (s >= e)
        return 0;
    for (; s < e; s++)
        if (!is_digit(b[s]))
            return 0;
    return 1;
}

/* v * 10 + digit, saturating at SATURATED; v is at most SATURATED, and v * 10 is not computed when it would
 * overflow. */
static inline int64_t append_digit(int64_t v, unsigned char digit)
{
    if (v > SATURATED / 10)
        return SATURATED;
    v = v * 10 + digit;
    return v < SATURATED ? v : SATURATED;
}

/* The value of b[s:e], all digits, saturating at SATURATED. */
static int64_t digits_value(const unsigned char *b, Py_ssize_t s, Py_ssize_t e)
{
    int64_t v = 0;
    for (; s < e && v < SATURATED; s++)
        v = append_digit(v, b[s] - '0');
    return v;
}

/* int(b[s:e]) as CPython parses bytes in base 10: surrounding whitespace, one sign, single underscores between
 * digits, at most INT_MAX_DIGITS digits. Saturates; 0 when int() would raise ValueError. */
static int parse_int(const unsigned char *b, Py_ssize_t s, Py_ssize_t e, int64_t *out)
{
    while (s < e && is_space(b[s]))
        s++;
    while (e > s && is_space(b[e - 1]))
        e--;
    int negative = 0;
    if (s < e && (b[s] == '+' || b[s] == '-')) {
        negative = b[s] == '-';
        s++;
    }
    if (s >= e || !is_digit(b[s]) || b[e - 1] == '_')
        return 0;
    int64_t v = 0;
    Py_ssize_t ndigits = 0;
    for (; s < e; s++) {
        unsigned char c = b[s];
        if (c == '_') {
            if (b[s + 1] == '_') /* s + 1 < e: the last byte is a digit */
                return 0;
            continue;
        }
        if (!is_digit(c))
            return 0;
        ndigits++;
        v = append_digit(v, c - '0');
    }
    if (ndigits > INT_MAX_DIGITS)
        return 0;
    *out = negative ? -v : v;
    return 1;
}

/* buf.find(b"\r\n", pos) within b[:end]. */
static Py_ssize_t find_crlf(const unsigned char *b, Py_ssize_t pos, Py_ssize_t end)
{
    while (pos + 1 < end) {
        const unsigned char *r = memchr(b + pos, '\r', (size_t)(end - 1 - pos));
        if (r == NULL)
            return -1;
        Py_ssize_t i = r - b;
        if (b[i + 1] == '\n')
            return i;
        pos = i + 1;
    }
    return -1;
}

/* buf.find(b"\n", pos, end). */
static Py_ssize_t find_lf(const unsigned char *b, Py_ssize_t pos, Py_ssize_t end)
{
    if (pos >= end)
        return -1;
    const unsigned char *r = memchr(b + pos, '\n', (size_t)(end - pos));
    return r == NULL ? -1 : r - b;
}

static int starts_with(const unsigned char *b, Py_ssize_t n, Py_ssize_t pos, const char *prefix, Py_ssize_t len)
{
    return pos >= 0 && pos + len <= n && memcmp(b + pos, prefix, (size_t)len) == 0;
}

static int equals(const unsigned char *b, Py_ssize_t len, const char *word)
{
    return (size_t)len == strlen(word) && memcmp(b, word, (size_t)len) == 0;
}

/* bytes.split() of b[s:e]: the first `max` tokens' bounds, and how many there are in all. */
static Py_ssize_t split_ws(const unsigned char *b, Py_ssize_t s, Py_ssize_t e, Py_ssize_t *starts, Py_ssize_t *ends,
                           Py_ssize_t max)
{
    Py_ssize_t count = 0;
    while (s < e) {
        while (s < e && is_space(b[s]))
            s++;
        if (s >= e)
            break;
        Py_ssize_t t = s;
        while (s < e && !is_space(b[s]))
            s++;
        if (count < max) {
            starts[count] = t;
            ends[count] = s;
        }
        count++;
    }
    return count;
}

static PyObject *pair(Py_ssize_t a, Py_ssize_t b)
{
    PyObject *t = PyTuple_New(2);
    if (t == NULL)
        return NULL;
    PyObject *x = PyLong_FromSsize_t(a), *y = PyLong_FromSsize_t(b);
    if (x == NULL || y == NULL) {
        Py_XDECREF(x);
        Py_XDECREF(y);
        Py_DECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, x);
    PyTuple_SET_ITEM(t, 1, y);
    return t;
}

static PyObject *triple(Py_ssize_t a, Py_ssize_t b, long c)
{
    PyObject *t = PyTuple_New(3);
    if (t == NULL)
        return NULL;
    PyObject *x = PyLong_FromSsize_t(a), *y = PyLong_FromSsize_t(b), *z = PyLong_FromLong(c);
    if (x == NULL || y == NULL || z == NULL) {
        Py_XDECREF(x);
        Py_XDECREF(y);
        Py_XDECREF(z);
        Py_DECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, x);
    PyTuple_SET_ITEM(t, 1, y);
    PyTuple_SET_ITEM(t, 2, z);
    return t;
}

/* ---- arguments ---- */

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max)
{
    if (nargs < min || nargs > max) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", name, min, max, nargs);
        return 0;
    }
    return 1;
}

static int index_arg(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t v = PyNumber_AsSsize_t(o, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "a position must not be negative");
        return 0;
    }
    *out = v;
    return 1;
}

/* The arguments of the request scanners, (buf) or (buf, lane): 0 with an exception set when they are wrong;
 * otherwise the caller owns `view` and releases it. `lane` NULL: the lane is not read (memcached has one). */
static int request_args(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_buffer *view, long *lane)
{
    if (!check_nargs(name, nargs, 1, 2))
        return 0;
    if (lane != NULL && nargs == 2) {
        *lane = PyLong_AsLong(args[1]);
        if (*lane == -1 && PyErr_Occurred())
            return 0;
    }
    return PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) == 0;
}

/* The arguments of the reply scanners, (buf, pos) or (buf, pos, want): 0 with an exception set when they are
 * wrong; otherwise the caller owns `view` and releases it. */
static int scanner_args(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
                        Py_buffer *view, Py_ssize_t *pos, Py_ssize_t *want)
{
    if (!check_nargs(name, nargs, expected, expected) || !index_arg(args[1], pos))
        return 0;
    if (expected == 3) {
        *want = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
        if (*want == -1 && PyErr_Occurred())
            return 0;
    }
    return PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) == 0;
}

/* ---- Redis ---- */

/* Whether upper-cased b[s:e] is in framing.REDIS_COMMANDS; `upper` gets the name. */
static int known_command(const unsigned char *b, Py_ssize_t s, Py_ssize_t e, char *upper)
{
    Py_ssize_t len = e - s;
    uint32_t h = FNV_START;
    upper[0] = 0;
    if (len > COMMAND_MAX)
        return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = b[s + i];
        if (c == 0) { /* not a name, and it would end the C string early */
            upper[0] = 0;
            return 0;
        }
        upper[i] = (char)(c >= 'a' && c <= 'z' ? c - 32 : c);
        h = fnv1a(h, (unsigned char)upper[i]);
    }
    upper[len] = 0;
    if (command_slots == NULL)
        return 0;
    for (uint32_t i = h & command_mask; command_slots[i]; i = (i + 1) & command_mask)
        if (strcmp(upper, commands[command_slots[i] - 1]) == 0)
            return 1;
    return 0;
}

static int upper_equals(const unsigned char *b, Py_ssize_t len, const char *word)
{
    if ((size_t)len != strlen(word))
        return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = b[i];
        if ((char)(c >= 'a' && c <= 'z' ? c - 32 : c) != word[i])
            return 0;
    }
    return 1;
}

enum { NOT_SPECIAL, CLIENT, HELLO };

static PyObject *redis_requests(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long lane = 2;
    Py_buffer view;
    if (!request_args("redis_requests", args, nargs, &view, &lane))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len, pos = 0, count = 0;
    long leave = STAY;
    char upper[COMMAND_MAX + 1];
    while (pos < n) {
        if (b[pos] != '*') { /* an inline command, or not RESP at all */
            leave = PIN;
            break;
        }
        Py_ssize_t e = find_crlf(b, pos, n);
        if (e < 0)
            break;
        /* Redis refuses a leading zero (a protocol error, and it closes the connection); no request has 0
         * arguments. */
        if (!all_digits(b, pos + 1, e) || b[pos + 1] == '0') {
            leave = PIN;
            break;
        }
        int64_t argc = digits_value(b, pos + 1, e);
        if (argc > REDIS_MAX_ARGS) {
            leave = PIN;
            break;
        }
        int special = NOT_SPECIAL;
        const unsigned char *argument = NULL;
        Py_ssize_t argument_len = 0, p = e + 2;
        long stop = 1; /* 1: the request is whole and may be multiplexed */
        for (int64_t index = 0; index < argc; index++) {
            if (p >= n) {
                stop = STAY;
                break;
            }
            if (b[p] != '$') {
                stop = PIN;
                break;
            }
            e = find_crlf(b, p, n);
            if (e < 0) {
                stop = STAY;
                break;
            }
            /* Redis's string2ll takes no sign, no leading zero and no space */
            if (!all_digits(b, p + 1, e) || (b[p + 1] == '0' && e - (p + 1) > 1)) {
                stop = PIN;
                break;
            }
            Py_ssize_t start = e + 2;
            int64_t size = digits_value(b, p + 1, e);
            if (size > REDIS_BULK_MAX) { /* Redis refuses it and closes the connection */
                stop = PIN;
                break;
            }
            if (size > n - start - 2) {
                stop = !index && n - start >= 32 ? PIN : STAY; /* no command name is this long */
                break;
            }
            p = start + (Py_ssize_t)size + 2;
            if (b[p - 2] != '\r' || b[p - 1] != '\n') {
                stop = PIN;
                break;
            }
            if (!index) {
                if (!known_command(b, start, p - 2, upper)) {
                    if (strcmp(upper, "CLIENT") == 0 && p - 2 - start == 6)
                        special = CLIENT;
                    else if (strcmp(upper, "HELLO") == 0 && p - 2 - start == 5)
                        special = HELLO;
                    else {
                        stop = PIN;
                        break;
                    }
                }
            } else if (index == 1 && special) {
                argument = b + start;
                argument_len = p - 2 - start;
            }
        }
        if (stop != 1) {
            leave = stop;
            break;
        }
        if (special == CLIENT) {
            if (argument == NULL ||
                !(upper_equals(argument, argument_len, "SETINFO") ||
                  upper_equals(argument, argument_len, "MAINT_NOTIFICATIONS"))) {
                leave = PIN;
                break;
            }
        } else if (special == HELLO) {
            if (argc != 2 || argument_len != 1 || (argument[0] != '2' && argument[0] != '3')) {
                leave = PIN;
                break;
            }
            if (argument[0] - '0' != lane) {
                leave = argument[0] - '0';
                break;
            }
        }
        pos = p;
        count++;
    }
    PyBuffer_Release(&view);
    return triple(pos, count, leave);
}

/* a + b for lengths and counts, neither negative, saturating at SATURATED. */
static inline int64_t add_saturating(int64_t a, int64_t b) { return a >= SATURATED - b ? SATURATED : a + b; }

/* A reply walk's state between buffers: framing.scan_state()'s list of three ints, read and written back. */
typedef struct {
    int64_t remaining; /* values still owed to the reply being walked; 0 between replies */
    int64_t skip;      /* bytes of a value and its CRLF still to pass */
    int64_t push;      /* 1 while the reply is a push */
} walk_state;

static int state_get(PyObject *o, walk_state *st)
{
    if (!PyList_CheckExact(o) || PyList_GET_SIZE(o) != 3) {
        PyErr_SetString(PyExc_TypeError, "a scan state must be a list of 3 ints (framing.scan_state())");
        return 0;
    }
    int64_t *fields[3] = {&st->remaining, &st->skip, &st->push};
    for (int i = 0; i < 3; i++) {
        long long v = PyLong_AsLongLong(PyList_GET_ITEM(o, i));
        if (v == -1 && PyErr_Occurred())
            return 0;
        if (v < 0 || v > SATURATED) {
            PyErr_SetString(PyExc_ValueError, "a scan state's fields are counts from 0 to 2**62");
            return 0;
        }
        *fields[i] = v;
    }
    return 1;
}

static int state_put(PyObject *o, const walk_state *st)
{
    const int64_t fields[3] = {st->remaining, st->skip, st->push};
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyLong_FromLongLong(fields[i]);
        if (v == NULL || PyList_SetItem(o, i, v) < 0)
            return 0;
    }
    return 1;
}

static Py_ssize_t not_crlf(void)
{
    PyErr_SetString(FramingError, "a value in a reply is not followed by CRLF");
    return -2;
}

static Py_ssize_t line_too_long(void)
{
    PyErr_Format(FramingError, "a line of more than %d bytes in a reply", REPLY_LINE_MAX);
    return -2;
}

/* framing._pass_body: pass *skip bytes of a value and its CRLF from p, as far as b[:n] goes, checking the CRLF as
 * it arrives. The new p, or -2 with FramingError set. */
static Py_ssize_t pass_body(const unsigned char *b, Py_ssize_t p, Py_ssize_t n, int64_t *skip)
{
    int64_t s = *skip;
    if (s <= n - p) {
        Py_ssize_t end = p + (Py_ssize_t)s;
        if (b[end - 1] != '\n' || (s >= 2 && b[end - 2] != '\r'))
            return not_crlf();
        *skip = 0;
        return end;
    }
    if (s >= 2 && s - 2 < n - p && b[p + (Py_ssize_t)(s - 2)] != '\r')
        return not_crlf();
    *skip = s - (n - p);
    return n;
}

/* framing._resp_walk: walk on from p in the reply `st` describes until it ends or the bytes run out; where it
 * stopped, or -2 with FramingError set. Aggregates are walked flat: `remaining` counts the values still owed. */
static Py_ssize_t resp_walk(const unsigned char *b, Py_ssize_t p, Py_ssize_t n, walk_state *st)
{
    for (;;) {
        if (st->skip) {
            p = pass_body(b, p, n, &st->skip);
            if (p < 0)
                return p;
            if (st->skip)
                return p;
        }
        if (!st->remaining || p >= n)
            return p;
        unsigned char kind = b[p];
        Py_ssize_t e = find_crlf(b, p, n - p > REPLY_LINE_MAX + 2 ? p + REPLY_LINE_MAX + 2 : n);
        if (e < 0)
            return n - p >= REPLY_LINE_MAX + 2 ? line_too_long() : p;
        if (kind == '+' || kind == '-' || kind == ':' || kind == '_' || kind == ',' || kind == '#' || kind == '(') {
            /* a line and nothing more */
        } else if (kind == '$' || kind == '!' || kind == '=' || kind == '*' || kind == '~' || kind == '>' ||
                   kind == '%' || kind == '|') {
            int64_t v;
            if (!parse_int(b, p + 1, e, &v)) {
                PyObject *text = PyBytes_FromStringAndSize((const char *)b + p + 1, e - p - 1);
                if (text != NULL) {
                    PyErr_Format(FramingError, "malformed RESP length in a reply: %.80R", text);
                    Py_DECREF(text);
                }
                return -2;
            }
            int64_t size = v < 0 ? 0 : v; /* a null bulk or array is -1: nothing follows it */
            if (kind == '$' || kind == '!' || kind == '=') {
                if (v >= 0)
                    st->skip = add_saturating(size, 2);
            } else {
                if (kind == '%') /* a map: key and value per entry */
                    st->remaining = add_saturating(st->remaining, size);
                else if (kind == '|') /* attributes, then the value they describe */
                    st->remaining = add_saturating(add_saturating(st->remaining, size), 1);
                st->remaining = add_saturating(st->remaining, size);
            }
        } else {
            PyErr_Format(FramingError, "unexpected RESP type byte %d in a reply", (int)kind);
            return -2;
        }
        p = e + 2;
        st->remaining--;
    }
}

/* framing._memcached_walk: resp_walk for memcached; `remaining` is 1 until the line that ends the reply. */
static Py_ssize_t memcached_walk(const unsigned char *b, Py_ssize_t p, Py_ssize_t n, walk_state *st)
{
    for (;;) {
        if (st->skip) {
            p = pass_body(b, p, n, &st->skip);
            if (p < 0 || st->skip)
                return p;
        }
        if (p >= n)
            return p;
        Py_ssize_t e = find_lf(b, p, n - p > REPLY_LINE_MAX + 1 ? p + REPLY_LINE_MAX + 1 : n);
        if (e < 0)
            return n - p > REPLY_LINE_MAX ? line_too_long() : p;
        if (!starts_with(b, n, p, "VALUE ", 6)) {
            if (starts_with(b, n, p, "MN\r\n", 4)) { /* the sentinel's reply where a client's is due */
                PyErr_SetString(FramingError, "the node answered fewer requests than were sent");
                return -2;
            }
            st->remaining = 0;
            return e + 1;
        }
        Py_ssize_t starts[5], ends[5];
        Py_ssize_t size = split_ws(b, p, e, starts, ends, 5);
        if ((size != 4 && size != 5) || !all_digits(b, starts[3], ends[3])) {
            Py_ssize_t shown = e - p < 80 ? e - p : 80;
            PyObject *line = PyBytes_FromStringAndSize((const char *)b + p, shown);
            if (line != NULL) {
                PyErr_Format(FramingError, "malformed memcached VALUE line in a reply: %R", line);
                Py_DECREF(line);
            }
            return -2;
        }
        st->skip = add_saturating(digits_value(b, starts[3], ends[3]), 2);
        p = e + 1;
    }
}

typedef Py_ssize_t (*walker)(const unsigned char *, Py_ssize_t, Py_ssize_t, walk_state *);

/* framing.redis_replies and memcached_replies: whole replies only, from a fresh walk each. */
static PyObject *whole_replies(const char *name, walker walk, int pushes, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos, want;
    Py_buffer view;
    if (!scanner_args(name, args, nargs, 3, &view, &pos, &want))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len, got = 0;
    while (got < want && pos < n && !(pushes && b[pos] == '>')) {
        walk_state st = {1, 0, 0};
        Py_ssize_t end = walk(b, pos, n, &st);
        if (end == -2) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (st.remaining || st.skip)
            break;
        pos = end;
        got++;
    }
    PyBuffer_Release(&view);
    return pair(pos, got);
}

/* framing.redis_scan and memcached_scan. */
static PyObject *resumed_replies(const char *name, walker walk, int pushes, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos, want;
    Py_buffer view;
    walk_state st;
    if (!check_nargs(name, nargs, 4, 4) || !state_get(args[3], &st) ||
        !scanner_args(name, args, 3, 3, &view, &pos, &want))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len, got = 0;
    int failed = 0;
    const walk_state before = st;
    if (st.remaining || st.skip) {
        pos = walk(b, pos, n, &st);
        failed = pos == -2;
        if (!failed && !st.remaining && !st.skip)
            got = 1;
    }
    if (!failed && !st.remaining && !st.skip) {
        while (got < want && pos < n && !(pushes && b[pos] == '>')) {
            st.remaining = 1;
            pos = walk(b, pos, n, &st);
            if (pos == -2) {
                failed = 1;
                break;
            }
            if (st.remaining || st.skip)
                break;
            got++;
        }
    }
    PyBuffer_Release(&view);
    if (failed || (memcmp(&st, &before, sizeof st) != 0 && !state_put(args[3], &st)))
        return NULL;
    return pair(pos, got);
}

static PyObject *redis_replies(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return whole_replies("redis_replies", resp_walk, 1, args, nargs);
}

static PyObject *redis_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return resumed_replies("redis_scan", resp_walk, 1, args, nargs);
}

static PyObject *redis_push(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos;
    Py_buffer view;
    if (!scanner_args("redis_push", args, nargs, 2, &view, &pos, NULL))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t end = 0;
    if (pos < view.len && b[pos] == '>') {
        walk_state st = {1, 0, 0};
        end = resp_walk(b, pos, view.len, &st);
        if (end >= 0 && (st.remaining || st.skip))
            end = -1;
    }
    PyBuffer_Release(&view);
    return end == -2 ? NULL : PyLong_FromSsize_t(end);
}

static PyObject *redis_skip_push(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pos;
    Py_buffer view;
    walk_state st;
    if (!check_nargs("redis_skip_push", nargs, 3, 3) || !state_get(args[2], &st) ||
        !scanner_args("redis_skip_push", args, 2, 2, &view, &pos, NULL))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t end;
    if (!st.push && (st.remaining || st.skip || pos >= view.len || b[pos] != '>')) {
        PyBuffer_Release(&view);
        return PyLong_FromLong(-1);
    }
    if (!st.push)
        st.remaining = st.push = 1;
    end = resp_walk(b, pos, view.len, &st);
    PyBuffer_Release(&view);
    if (end == -2)
        return NULL;
    if (!st.remaining && !st.skip)
        st.push = 0;
    if (!state_put(args[2], &st))
        return NULL;
    return PyLong_FromSsize_t(end);
}

/* ---- memcached ---- */

static Py_ssize_t memcached_line_limit(const unsigned char *b, Py_ssize_t n, Py_ssize_t pos)
{
    /* memcached closes a connection holding more than 2048 bytes of an unfinished line, except for get and gets */
    return starts_with(b, n, pos, "get ", 4) || starts_with(b, n, pos, "gets ", 5) ? MEMCACHED_LINE_MAX
                                                                                  : MEMCACHED_SHORT_LINE_MAX;
}

/* Whether b[s:e] is a number in plain decimal (no sign, no leading zero) no bigger than `limit`: one memcached's
 * strtoul/strtol read as natfwd does. */
static int mc_number(const unsigned char *b, Py_ssize_t s, Py_ssize_t e, uint64_t limit)
{
    if (!all_digits(b, s, e) || (b[s] == '0' && e - s > 1))
        return 0;
    uint64_t v = 0;
    for (; s < e; s++)
        if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, (uint64_t)(b[s] - '0'), &v))
            return 0;
    return v <= limit;
}

/* Whether b[s:e] holds a control character: below 0x20 (NUL included) or 0x7f. */
static int has_control(const unsigned char *b, Py_ssize_t s, Py_ssize_t e)
{
    int control = 0;
    for (; s < e; s++)
        control |= b[s] < 0x20 || b[s] == 0x7f;
    return control;
}

#define MC_TOKENS 8

static PyObject *memcached_requests(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static const uint64_t storage_limits[] = {UINT32_MAX, INT32_MAX, INT32_MAX - 2, UINT64_MAX}; /* flags, exptime,
                                                                                                    bytes, cas */
    Py_buffer view;
    if (!request_args("memcached_requests", args, nargs, &view, NULL))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len, pos = 0, count = 0;
    long leave = STAY;
    while (pos < n) {
        Py_ssize_t e = find_lf(b, pos, n);
        if (e < 0) {
            /* binary protocol requests have NULs in their headers, and maybe no LF at all: pin them at once */
            if (n - pos > memcached_line_limit(b, n, pos) || has_control(b, pos, b[n - 1] == '\r' ? n - 1 : n))
                leave = PIN;
            break;
        }
        if (e - pos > MEMCACHED_SHORT_LINE_MAX && e - pos > memcached_line_limit(b, n, pos)) {
            leave = PIN;
            break;
        }
        Py_ssize_t line_end = e > pos && b[e - 1] == '\r' ? e - 1 : e, line_len = line_end - pos;
        /* memcached reads a line up to a NUL (strlen) and keeps other control characters in its tokens, where they
         * would end the line early or split a key in the VALUE line that echoes it: any of them pins */
        if (has_control(b, pos, line_end)) {
            leave = PIN;
            break;
        }
        Py_ssize_t starts[MC_TOKENS], ends[MC_TOKENS], size = 0, longest = 0, s = pos;
        int empty = 0;
        while (1) { /* line.split(b" "), keeping the first MC_TOKENS */
            const unsigned char *space = memchr(b + s, ' ', (size_t)(line_end - s));
            Py_ssize_t t = space == NULL ? line_end : space - b;
            empty |= t == s;
            if (size < MC_TOKENS) {
                starts[size] = s;
                ends[size] = t;
            }
            if (size && t - s > longest)
                longest = t - s;
            size++;
            if (space == NULL)
                break;
            s = t + 1;
        }
        if (empty) {
            leave = PIN;
            break;
        }
        const unsigned char *command = b + starts[0];
        Py_ssize_t command_len = ends[0] - starts[0], key_len = size > 1 ? ends[1] - starts[1] : 0, next = e + 1;
        int ok;
        if (equals(command, command_len, "get") || equals(command, command_len, "gets")) {
            ok = size >= 2 && !(line_len > KEY_MAX && longest > KEY_MAX); /* no key is longer than its line */
        } else if (equals(command, command_len, "gat") || equals(command, command_len, "gats")) {
            ok = size >= 3 && mc_number(b, starts[1], ends[1], INT32_MAX) && !(line_len > KEY_MAX && longest > KEY_MAX);
        } else if (equals(command, command_len, "set") || equals(command, command_len, "add") ||
                   equals(command, command_len, "replace") || equals(command, command_len, "append") ||
                   equals(command, command_len, "prepend") || equals(command, command_len, "cas")) {
            /* Out of range, memcached answers CLIENT_ERROR and then runs the data block as a command: two
             * replies. */
            ok = size == (equals(command, command_len, "cas") ? 6 : 5) && key_len <= KEY_MAX;
            for (Py_ssize_t index = 2; ok && index < size; index++)
                ok = mc_number(b, starts[index], ends[index], storage_limits[index - 2]);
            if (ok) {
                next = e + 1 + (Py_ssize_t)digits_value(b, starts[4], ends[4]) + 2;
                if (next > n)
                    break;
                /* memcached would answer "bad data chunk" and read the rest as commands */
                ok = b[next - 2] == '\r' && b[next - 1] == '\n';
            }
        } else if (equals(command, command_len, "delete")) {
            ok = size == 2 && key_len <= KEY_MAX;
        } else if (equals(command, command_len, "incr") || equals(command, command_len, "decr")) {
            ok = size == 3 && key_len <= KEY_MAX && mc_number(b, starts[2], ends[2], UINT64_MAX);
        } else if (equals(command, command_len, "touch")) {
            ok = size == 3 && key_len <= KEY_MAX && mc_number(b, starts[2], ends[2], INT32_MAX);
        } else {
            ok = equals(command, command_len, "version") && size == 1;
        }
        if (!ok) {
            leave = PIN;
            break;
        }
        pos = next;
        count++;
    }
    PyBuffer_Release(&view);
    return triple(pos, count, leave);
}

static PyObject *memcached_replies(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return whole_replies("memcached_replies", memcached_walk, 0, args, nargs);
}

static PyObject *memcached_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return resumed_replies("memcached_scan", memcached_walk, 0, args, nargs);
}

/* ---- the module ---- */

/* init(FramingError, REDIS_COMMANDS): framing.py hands over what it owns, so there is one list of commands. */
static PyObject *init(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (!check_nargs("init", nargs, 2, 2))
        return NULL;
    PyObject *iterator = PyObject_GetIter(args[1]);
    if (iterator == NULL)
        return NULL;
    Py_ssize_t size = PyObject_Length(args[1]);
    if (size < 0) {
        Py_DECREF(iterator);
        return NULL;
    }
    char(*table)[COMMAND_MAX + 1] = calloc((size_t)size + 1, sizeof *table);
    if (table == NULL) {
        Py_DECREF(iterator);
        return PyErr_NoMemory();
    }
    size_t count = 0;
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        char *text;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(item, &text, &len) < 0 || len > COMMAND_MAX || (size_t)len != strlen(text) ||
            (Py_ssize_t)count >= size) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a Redis command name must be at most 32 bytes, with no NUL");
            Py_DECREF(item);
            break;
        }
        memcpy(table[count++], text, (size_t)len);
        Py_DECREF(item);
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) {
        free(table);
        return NULL;
    }
    uint32_t mask = 15;
    while (mask < 2 * count)
        mask = mask * 2 + 1;
    uint32_t *slots = calloc((size_t)mask + 1, sizeof *slots);
    if (slots == NULL) {
        free(table);
        return PyErr_NoMemory();
    }
    for (size_t k = 0; k < count; k++) {
        uint32_t h = FNV_START;
        for (const char *c = table[k]; *c; c++)
            h = fnv1a(h, (unsigned char)*c);
        uint32_t i = h & mask;
        while (slots[i])
            i = (i + 1) & mask;
        slots[i] = (uint32_t)k + 1;
    }
    free(command_slots);
    free(commands);
    commands = table;
    command_slots = slots;
    command_mask = mask;
    Py_XSETREF(FramingError, Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"init", (PyCFunction)(void (*)(void))init, METH_FASTCALL, "Hand over FramingError and REDIS_COMMANDS."},
    {"redis_requests", (PyCFunction)(void (*)(void))redis_requests, METH_FASTCALL, "framing.redis_requests"},
    {"redis_replies", (PyCFunction)(void (*)(void))redis_replies, METH_FASTCALL, "framing.redis_replies"},
    {"redis_push", (PyCFunction)(void (*)(void))redis_push, METH_FASTCALL, "framing.redis_push"},
    {"redis_scan", (PyCFunction)(void (*)(void))redis_scan, METH_FASTCALL, "framing.redis_scan"},
    {"redis_skip_push", (PyCFunction)(void (*)(void))redis_skip_push, METH_FASTCALL, "framing.redis_skip_push"},
    {"memcached_requests", (PyCFunction)(void (*)(void))memcached_requests, METH_FASTCALL,
     "framing.memcached_requests"},
    {"memcached_replies", (PyCFunction)(void (*)(void))memcached_replies, METH_FASTCALL, "framing.memcached_replies"},
    {"memcached_scan", (PyCFunction)(void (*)(void))memcached_scan, METH_FASTCALL, "framing.memcached_scan"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cframing",
    .m_doc = "The scanners of forwarder/protocols/framing.py in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__cframing(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "KEY_MAX", KEY_MAX) < 0 ||
        PyModule_AddIntConstant(module, "REPLY_LINE_MAX", REPLY_LINE_MAX) < 0 ||
        PyModule_AddIntConstant(module, "REDIS_MAX_ARGS", REDIS_MAX_ARGS) < 0 ||
        PyModule_AddIntConstant(module, "REDIS_BULK_MAX", REDIS_BULK_MAX) < 0 ||
        PyModule_AddIntConstant(module, "MEMCACHED_LINE_MAX", MEMCACHED_LINE_MAX) < 0 ||
        PyModule_AddIntConstant(module, "MEMCACHED_SHORT_LINE_MAX", MEMCACHED_SHORT_LINE_MAX) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
