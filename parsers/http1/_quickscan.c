/* The C twin of parsers/http1/quick.py's quick_request_head, for the plainest heads.
 *
 *     configure(MessageHead, RequestFields, field_names)   once, at import of quick.py
 *     derive_forms(make_request, make_form)               once, at import of engine.py
 *     scan_request_head(raw) -> MessageHead | None
 *
 * ``raw`` is one whole request head (up to and with its empty line). When it is in the
 * subset below, the head comes back built as quick_request_head builds it (with
 * frame_request's facts and ``wire``), and with ``derived_fields`` already holding what
 * the engine's request_field_facts gives for it (the decoded, lower-cased fields). Any
 * other head gives None, and the Python code decides: the quick read, then the full
 * parser. So every decision about what is refused, and how a body is framed, keeps its
 * one definition in Python; this file only reads heads on which those decisions are
 * trivial, in one pass, without a Python call per field.
 *
 * The subset (a strict subset of SIMPLE_REQUEST_HEAD's, see docs/http1.md):
 *   - GET HEAD POST PUT DELETE PATCH OPTIONS, one space, an origin-form target of
 *     SIMPLE_TARGET characters (a `%` only as `%XX`, no "://"), one space, HTTP/1.0 or
 *     HTTP/1.1, CRLF;
 *   - at most 100 field lines "token: value" CRLF: exactly one space after the colon, a
 *     value of visible ASCII and inner spaces, neither empty nor ending in a space;
 *   - no Content-Length, Transfer-Encoding, Upgrade or Expect field (their rules are
 *     Python's); at most one Connection field, whose value is `close` or `keep-alive`
 *     in any case; at most one Host field, `reg-name[:port]` (an IP literal in brackets
 *     goes to Python);
 *   - the empty line, and nothing after it.
 *
 * MessageHead is a slotted dataclass: it is made without running its Python __init__
 * (which would cost more than the whole scan), each field stored in its slot, at the
 * offset its member descriptor gives, as the descriptor's own __set__ would store it.
 * configure() checks the class has exactly the fields this file sets, in order, each a
 * writable object slot of the class itself, so a field added in Python refuses the C
 * scanner (quick.py then reads every head itself, and says so) instead of leaving a
 * slot unset.
 *
 * Once the engine has given its constructors (derive_forms), a head is also given the
 * form the engine forwards it by (``derived``: its RequestForm of the HttpRequest that
 * ``decide`` sees, and ``wire``), as the engine's _request_form would make it on the
 * head's first use: the two constructors are C callables (parsers.fastnew), called
 * without a Python frame. An HTTP/1.1 head without Host gets none: the engine refuses
 * it, in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

#define MAX_FIELDS 100 /* quick.MAX_QUICK_FIELDS */

static const char *const HEAD_FIELDS[] = {
    "method",   "target",   "status",     "reason",  "version",         "headers",
    "size",     "framing",  "length",     "codings", "keep_alive",      "upgrade",
    "expect_continue", "derived", "derived_fields", "wire",
};
enum {
    F_METHOD, F_TARGET, F_STATUS, F_REASON, F_VERSION, F_HEADERS, F_SIZE, F_FRAMING,
    F_LENGTH, F_CODINGS, F_KEEP_ALIVE, F_UPGRADE, F_EXPECT, F_DERIVED, F_DERIVED_FIELDS,
    F_WIRE, N_HEAD_FIELDS
};
static const char *const REQUEST_FIELDS[] = {"headers", "host", "has_host", "section"};
#define N_REQUEST_FIELDS 4

static const char *const METHODS[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                      "OPTIONS"};
#define N_METHODS 7

typedef struct {
    PyTypeObject *head_type;   /* parsers.http1.head.MessageHead */
    PyTypeObject *fields_type; /* parsers.http1.head.RequestFields */
    Py_ssize_t offsets[N_HEAD_FIELDS]; /* of each field's slot in a MessageHead */
    PyObject *methods[N_METHODS];
    PyObject *v10, *v11, *none, *empty;
    PyObject *make_request; /* HttpRequest(method, path, host, headers, version), or NULL */
    PyObject *make_form;    /* RequestForm(request, wire) */
} State;

/* ------------------------------------------------------------------ byte classes */

enum { TARGET_PLAIN = 1, TARGET_PERCENT = 2, TARGET_COLON = 3 };

/* One bit per class, per byte. */
enum { TCHAR = 1, VCHAR_SP = 2, HEX = 4, REG_NAME = 8, DIGIT = 16 };
static unsigned char CLASS[256];
static unsigned char TARGET[256];
static unsigned char LOWER[256];

static void
init_tables(void)
{
    const char *tchar = "!#$%&'*+-.^_`|~";
    const char *target = "._~!$&'()*+,;=/?-";
    const char *reg_name = "._~!$&'()*+,;=%-";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        unsigned char k = 0;
        if (alnum || (c && strchr(tchar, c)))
            k |= TCHAR;
        if (c >= 0x20 && c <= 0x7e)
            k |= VCHAR_SP;
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))
            k |= HEX;
        if (alnum || (c && strchr(reg_name, c)))
            k |= REG_NAME;
        if (c >= '0' && c <= '9')
            k |= DIGIT;
        CLASS[c] = k;
        TARGET[c] = (alnum || (c && strchr(target, c))) ? TARGET_PLAIN : 0;
        LOWER[c] = (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : (unsigned char)c;
    }
    TARGET['%'] = TARGET_PERCENT;
    TARGET[':'] = TARGET_COLON;
}

/* ------------------------------------------------------------------ the scan */

typedef struct {
    Py_ssize_t name, name_len, value, value_len;
} Field;

typedef struct {
    int method;
    Py_ssize_t target, target_len;
    int minor;
    int count;
    int host; /* index of the Host field, or -1 */
    int keep_alive;
    Field fields[MAX_FIELDS];
} Head;

static int
is_lower(const unsigned char *p, Py_ssize_t len, const char *word)
{
    for (Py_ssize_t i = 0; i < len; i++)
        if (LOWER[p[i]] != (unsigned char)word[i])
            return 0;
    return 1;
}

/* HOST_VALUE for a value not starting with "[": reg-name, then ":" and 0-5 digits. */
static int
plain_host(const unsigned char *p, Py_ssize_t len)
{
    Py_ssize_t i = 0;
    while (i < len && (CLASS[p[i]] & REG_NAME))
        i++;
    if (i == len)
        return 1;
    if (p[i] != ':' || len - i - 1 > 5)
        return 0;
    for (i++; i < len; i++)
        if (!(CLASS[p[i]] & DIGIT))
            return 0;
    return 1;
}

/* The subset's rules for the fields frame_request reads. 0: leave the head to Python. */
static int
framing_field(const unsigned char *p, const Field *f, int index, Head *h, int *connection)
{
    const unsigned char *name = p + f->name, *value = p + f->value;
    switch (f->name_len) {
    case 4:
        if (!is_lower(name, 4, "host"))
            return 1;
        if (h->host >= 0 || value[0] == '[' || !plain_host(value, f->value_len))
            return 0;
        h->host = index;
        return 1;
    case 10:
        if (!is_lower(name, 10, "connection"))
            return 1;
        if (*connection)
            return 0;
        if (f->value_len == 5 && is_lower(value, 5, "close"))
            *connection = 'c';
        else if (f->value_len == 10 && is_lower(value, 10, "keep-alive"))
            *connection = 'k';
        else
            return 0;
        return 1;
    case 14:
        return !is_lower(name, 14, "content-length");
    case 17:
        return !is_lower(name, 17, "transfer-encoding");
    case 7:
        return !is_lower(name, 7, "upgrade");
    case 6:
        return !is_lower(name, 6, "expect");
    default:
        return 1;
    }
}

static int
scan(const unsigned char *p, Py_ssize_t n, Head *h)
{
    Py_ssize_t i = 0;
    h->method = -1;
    for (int m = 0; m < N_METHODS; m++) {
        Py_ssize_t len = (Py_ssize_t)strlen(METHODS[m]);
        if (n > len && p[len] == ' ' && memcmp(p, METHODS[m], (size_t)len) == 0) {
            h->method = m;
            i = len + 1;
            break;
        }
    }
    if (h->method < 0 || i >= n || p[i] != '/')
        return 0;
    h->target = i++;
    for (;;) {
        if (i >= n)
            return 0;
        unsigned char kind = TARGET[p[i]];
        if (kind == TARGET_PLAIN)
            i++;
        else if (kind == TARGET_PERCENT) {
            if (i + 2 >= n || !(CLASS[p[i + 1]] & HEX) || !(CLASS[p[i + 2]] & HEX))
                return 0;
            i += 3;
        }
        else if (kind == TARGET_COLON) {
            if (i + 2 < n && p[i + 1] == '/' && p[i + 2] == '/')
                return 0; /* "://": never read as a URL here */
            i++;
        }
        else if (p[i] == ' ')
            break;
        else
            return 0;
    }
    h->target_len = i - h->target;
    if (n - i < 11 || memcmp(p + i, " HTTP/1.", 8) != 0 || (p[i + 8] != '0' && p[i + 8] != '1') ||
        p[i + 9] != '\r' || p[i + 10] != '\n')
        return 0;
    h->minor = p[i + 8] - '0';
    i += 11;

    int connection = 0;
    h->count = 0;
    h->host = -1;
    for (;;) {
        if (n - i < 2)
            return 0;
        if (p[i] == '\r') {
            if (p[i + 1] != '\n' || i + 2 != n)
                return 0;
            break;
        }
        if (h->count == MAX_FIELDS)
            return 0;
        Field *f = &h->fields[h->count];
        f->name = i;
        while (i < n && (CLASS[p[i]] & TCHAR))
            i++;
        f->name_len = i - f->name;
        if (f->name_len == 0 || n - i < 3 || p[i] != ':' || p[i + 1] != ' ')
            return 0;
        i += 2;
        f->value = i;
        if (p[i] == ' ' || !(CLASS[p[i]] & VCHAR_SP))
            return 0;
        while (i < n && (CLASS[p[i]] & VCHAR_SP))
            i++;
        f->value_len = i - f->value;
        if (n - i < 2 || p[i] != '\r' || p[i + 1] != '\n' || p[i - 1] == ' ')
            return 0;
        i += 2;
        if (!framing_field(p, f, h->count, h, &connection))
            return 0;
        h->count++;
    }
    if (h->minor == 1)
        h->keep_alive = connection != 'c';
    else
        h->keep_alive = connection == 'k';
    return 1;
}

/* ------------------------------------------------------------------ building */

static PyObject *
ascii_str(const unsigned char *p, Py_ssize_t len, int lower)
{
    PyObject *s = PyUnicode_New(len, 127);
    if (s == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(s);
    if (lower)
        for (Py_ssize_t i = 0; i < len; i++)
            out[i] = LOWER[p[i]];
    else
        memcpy(out, p, (size_t)len);
    return s;
}

/* (a, b), taking both references; NULL if either is. */
static PyObject *
pair(PyObject *a, PyObject *b)
{
    PyObject *t = (a && b) ? PyTuple_New(2) : NULL;
    if (t == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    return t;
}

/* The field list (as the quick read's findall cuts it) and the engine's decoded fields. */
static int
build_fields(const unsigned char *p, const Head *h, PyObject **wire_fields, PyObject **decoded)
{
    PyObject *list = PyList_New(h->count);
    PyObject *tuple = PyTuple_New(h->count);
    if (list == NULL || tuple == NULL)
        goto fail;
    for (int k = 0; k < h->count; k++) {
        const Field *f = &h->fields[k];
        PyObject *raw = pair(PyBytes_FromStringAndSize((const char *)p + f->name, f->name_len),
                             PyBytes_FromStringAndSize((const char *)p + f->value, f->value_len));
        if (raw == NULL)
            goto fail;
        PyList_SET_ITEM(list, k, raw);
        PyObject *str = pair(ascii_str(p + f->name, f->name_len, 1),
                             ascii_str(p + f->value, f->value_len, 0));
        if (str == NULL)
            goto fail;
        PyTuple_SET_ITEM(tuple, k, str);
    }
    *wire_fields = list;
    *decoded = tuple;
    return 0;
fail:
    Py_XDECREF(list);
    Py_XDECREF(tuple);
    return -1;
}

/* RequestFields(headers, host, has_host, section=None), made by tuple.__new__ (its
   Python __new__ only packs the four). */
static PyObject *
request_fields(State *st, const Head *h, PyObject *decoded)
{
    PyObject *host = st->empty;
    if (h->host >= 0)
        host = PyTuple_GET_ITEM(PyTuple_GET_ITEM(decoded, h->host), 1);
    PyObject *items = PyTuple_Pack(4, decoded, host, h->host >= 0 ? Py_True : Py_False, Py_None);
    if (items == NULL)
        return NULL;
    PyObject *args = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (args == NULL)
        return NULL;
    PyObject *obj = PyTuple_Type.tp_new(st->fields_type, args, NULL);
    Py_DECREF(args);
    return obj;
}

static PyObject *
build(State *st, PyObject *raw, const unsigned char *p, Py_ssize_t n, const Head *h)
{
    PyObject *values[N_HEAD_FIELDS] = {NULL};
    PyObject *decoded = NULL, *head = NULL;
    if (build_fields(p, h, &values[F_HEADERS], &decoded) < 0)
        goto done;
    values[F_DERIVED_FIELDS] = request_fields(st, h, decoded);
    values[F_TARGET] = ascii_str(p + h->target, h->target_len, 0);
    values[F_SIZE] = PyLong_FromSsize_t(n);
    if (values[F_DERIVED_FIELDS] == NULL || values[F_TARGET] == NULL || values[F_SIZE] == NULL)
        goto done;
    values[F_METHOD] = Py_NewRef(st->methods[h->method]);
    values[F_STATUS] = PyLong_FromLong(0);
    values[F_REASON] = Py_NewRef(st->empty);
    values[F_VERSION] = Py_NewRef(h->minor ? st->v11 : st->v10);
    values[F_FRAMING] = Py_NewRef(st->none);
    values[F_LENGTH] = PyLong_FromLong(0);
    values[F_CODINGS] = PyTuple_New(0);
    values[F_KEEP_ALIVE] = PyBool_FromLong(h->keep_alive);
    values[F_UPGRADE] = Py_NewRef(Py_False);
    values[F_EXPECT] = Py_NewRef(Py_False);
    values[F_WIRE] = Py_NewRef(raw); /* the quick read's ``head.wire = raw`` */
    if (values[F_CODINGS] == NULL)
        goto done;
    if (st->make_form != NULL && (h->minor == 0 || h->host >= 0)) {
        /* The engine's _request_form for an origin-form target: the path as it came. */
        PyObject *request_args[5] = {
            values[F_METHOD], values[F_TARGET],
            PyTuple_GET_ITEM(values[F_DERIVED_FIELDS], 1), /* RequestFields.host */
            decoded, values[F_VERSION],
        };
        PyObject *request = PyObject_Vectorcall(st->make_request, request_args, 5, NULL);
        if (request == NULL)
            goto done;
        PyObject *form_args[2] = {request, raw};
        values[F_DERIVED] = PyObject_Vectorcall(st->make_form, form_args, 2, NULL);
        Py_DECREF(request);
        if (values[F_DERIVED] == NULL)
            goto done;
    } else {
        values[F_DERIVED] = Py_NewRef(Py_None);
    }
    head = st->head_type->tp_alloc(st->head_type, 0);
    if (head == NULL)
        goto done;
    for (int k = 0; k < N_HEAD_FIELDS; k++) { /* each slot takes its value's reference */
        *(PyObject **)((char *)head + st->offsets[k]) = values[k];
        values[k] = NULL;
    }
done:
    for (int k = 0; k < N_HEAD_FIELDS; k++)
        Py_XDECREF(values[k]);
    Py_XDECREF(decoded);
    return head;
}

/* ------------------------------------------------------------------ the module */

static PyObject *
scan_request_head(PyObject *module, PyObject *raw)
{
    State *st = (State *)PyModule_GetState(module);
    if (st->head_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_quickscan.configure() was not called");
        return NULL;
    }
    if (!PyBytes_Check(raw)) {
        PyErr_Format(PyExc_TypeError, "a request head is bytes, not %.80s",
                     Py_TYPE(raw)->tp_name);
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    Head h;
    if (!scan(p, n, &h))
        Py_RETURN_NONE;
    return build(st, raw, p, n, &h);
}

/* The names in ``names`` (a tuple of str) are exactly ``expected``, in order. */
static int
same_names(PyObject *names, const char *const *expected, Py_ssize_t count, const char *what)
{
    if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != count)
        goto wrong;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *name = PyTuple_GET_ITEM(names, k);
        if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, expected[k]) != 0)
            goto wrong;
    }
    return 0;
wrong:
    PyErr_Format(PyExc_TypeError, "%s has fields %R; this scanner was written for another set",
                 what, names);
    return -1;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    State *st = (State *)PyModule_GetState(module);
    PyTypeObject *head_type, *fields_type;
    PyObject *head_names, *fields_names = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O:configure", &PyType_Type, &head_type, &PyType_Type,
                          &fields_type, &head_names))
        return NULL;
    if (same_names(head_names, HEAD_FIELDS, N_HEAD_FIELDS, "MessageHead") < 0)
        return NULL;
    /* Made without __init__: that is only right when __init__ just stores its arguments
       and __new__ is object's. */
    if (head_type->tp_new != PyBaseObject_Type.tp_new) {
        PyErr_SetString(PyExc_TypeError, "MessageHead has a __new__ of its own");
        return NULL;
    }
    if (PyObject_HasAttrString((PyObject *)head_type, "__post_init__")) {
        PyErr_SetString(PyExc_TypeError, "MessageHead has a __post_init__");
        return NULL;
    }
    Py_ssize_t offsets[N_HEAD_FIELDS];
    for (int k = 0; k < N_HEAD_FIELDS; k++) {
        PyObject *descr = PyObject_GetAttrString((PyObject *)head_type, HEAD_FIELDS[k]);
        if (descr == NULL)
            return NULL;
        int slot = Py_IS_TYPE(descr, &PyMemberDescr_Type) && PyDescr_TYPE(descr) == head_type;
        if (slot) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            slot = member->type == T_OBJECT_EX && !(member->flags & READONLY);
            offsets[k] = member->offset;
        }
        Py_DECREF(descr);
        if (!slot) {
            PyErr_Format(PyExc_TypeError, "MessageHead.%s is not an object slot of its own",
                         HEAD_FIELDS[k]);
            return NULL;
        }
    }
    if (!PyType_IsSubtype(fields_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "RequestFields is not a named tuple");
        goto fail;
    }
    fields_names = PyObject_GetAttrString((PyObject *)fields_type, "_fields");
    if (fields_names == NULL ||
        same_names(fields_names, REQUEST_FIELDS, N_REQUEST_FIELDS, "RequestFields") < 0)
        goto fail;
    Py_DECREF(fields_names);
    Py_XSETREF(st->head_type, (PyTypeObject *)Py_NewRef(head_type));
    Py_XSETREF(st->fields_type, (PyTypeObject *)Py_NewRef(fields_type));
    memcpy(st->offsets, offsets, sizeof(offsets));
    Py_RETURN_NONE;
fail:
    Py_XDECREF(fields_names);
    return NULL;
}

static PyObject *
derive_forms(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = (State *)PyModule_GetState(module);
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "derive_forms(make_request, make_form): two callables");
        return NULL;
    }
    Py_XSETREF(st->make_request, Py_NewRef(args[0]));
    Py_XSETREF(st->make_form, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static int
exec_module(PyObject *module)
{
    State *st = (State *)PyModule_GetState(module);
    for (int m = 0; m < N_METHODS; m++)
        if ((st->methods[m] = PyUnicode_InternFromString(METHODS[m])) == NULL)
            return -1;
    st->v10 = PyUnicode_InternFromString("1.0");
    st->v11 = PyUnicode_InternFromString("1.1");
    st->none = PyUnicode_InternFromString("none");
    st->empty = PyUnicode_New(0, 0);
    if (st->v10 == NULL || st->v11 == NULL || st->none == NULL || st->empty == NULL)
        return -1;
    return PyModule_AddIntConstant(module, "MAX_FIELDS", MAX_FIELDS);
}

static int
traverse(PyObject *module, visitproc visit, void *arg)
{
    State *st = (State *)PyModule_GetState(module);
    Py_VISIT(st->head_type);
    Py_VISIT(st->fields_type);
    Py_VISIT(st->make_request);
    Py_VISIT(st->make_form);
    return 0;
}

static int
clear(PyObject *module)
{
    State *st = (State *)PyModule_GetState(module);
    Py_CLEAR(st->head_type);
    Py_CLEAR(st->fields_type);
    Py_CLEAR(st->make_request);
    Py_CLEAR(st->make_form);
    for (int m = 0; m < N_METHODS; m++)
        Py_CLEAR(st->methods[m]);
    Py_CLEAR(st->v10);
    Py_CLEAR(st->v11);
    Py_CLEAR(st->none);
    Py_CLEAR(st->empty);
    return 0;
}

static void
free_module(void *module)
{
    clear((PyObject *)module);
}

static PyMethodDef methods[] = {
    {"scan_request_head", scan_request_head, METH_O,
     "scan_request_head(raw, /)\n--\n\nThe MessageHead of a plain request head, as "
     "parsers.http1.quick.quick_request_head reads it, or None."},
    {"configure", configure, METH_VARARGS,
     "configure(head_type, fields_type, head_field_names, /)\n--\n\nThe classes to build "
     "(MessageHead, RequestFields), checked against the fields this scanner sets."},
    {"derive_forms", (PyCFunction)(void (*)(void))derive_forms, METH_FASTCALL,
     "derive_forms(make_request, make_form, /)\n--\n\nThe engine's constructors of a "
     "head's HttpRequest and RequestForm: each head scanned from now on carries its form "
     "(``derived``)."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "parsers.http1._quickscan",
    .m_doc = "The C twin of parsers.http1.quick for the plainest request heads.",
    .m_size = sizeof(State),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = traverse,
    .m_clear = clear,
    .m_free = free_module,
};

PyMODINIT_FUNC
PyInit__quickscan(void)
{
    init_tables();
    return PyModuleDef_Init(&module_def);
}
