/* The C twin of parsers/fastnew.py: a constructor for a slotted dataclass that fills
 * its slots directly.
 *
 *     Maker(cls, names, defaults, factories) -> maker
 *     maker(*args, **kwargs) -> a new instance of cls
 *
 * Calling a Python class costs more than most of what the engines do with the object:
 * type.__call__, object.__new__, a lookup of __init__, and a Python frame for it. A
 * command or a request is built on every message, so that is most of its price. A
 * maker allocates the instance with the class's own tp_alloc (tracked by the garbage
 * collector, as object.__new__ would) and stores each argument at the offset its
 * member descriptor names, as the descriptor's __set__ would: the fields the
 * dataclass __init__ would set, nothing else, bypassing a frozen class's __setattr__
 * as quick_init does.
 *
 * Arguments follow the dataclass __init__: positional in field order, or by name;
 * a missing field takes its default (made by its factory, when it has one), one
 * without a default is an error. fastnew.py
 * decides which classes qualify (every field a plain __init__ field, no __post_init__)
 * and passes the fields and defaults; this file checks what it must to stay memory-safe:
 * each field a writable object slot of the class itself, no __new__ of its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#define MAX_FIELDS 32

typedef struct {
    PyObject_HEAD
    PyTypeObject *cls;
    PyObject *names;    /* tuple of str: the fields in __init__ order */
    PyObject *defaults; /* tuple: the defaults of the last len(defaults) fields */
    PyObject *factories; /* tuple, as long: None, or what makes that default each time */
    Py_ssize_t fields;
    Py_ssize_t required; /* fields without a default, the first ones */
    Py_ssize_t *offsets;
    vectorcallfunc vectorcall;
} Maker;

static int
fill_from_keywords(Maker *m, PyObject **values, PyObject *const *kwvalues, PyObject *kwnames)
{
    Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t at = -1;
        for (Py_ssize_t i = 0; i < m->fields; i++) {
            PyObject *name = PyTuple_GET_ITEM(m->names, i);
            if (name == key) {
                at = i;
                break;
            }
            int same = PyUnicode_Compare(name, key);
            if (same == -1 && PyErr_Occurred())
                return -1;
            if (same == 0) {
                at = i;
                break;
            }
        }
        if (at < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         m->cls->tp_name, key);
            return -1;
        }
        if (values[at] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%U'",
                         m->cls->tp_name, key);
            return -1;
        }
        values[at] = kwvalues[k];
    }
    return 0;
}

static PyObject *
maker_call(Maker *m, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t given = PyVectorcall_NARGS(nargsf);
    Py_ssize_t fields = m->fields;
    if (given > fields) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments but %zd were given",
                     m->cls->tp_name, fields, given);
        return NULL;
    }
    PyObject *stack[MAX_FIELDS];
    PyObject **values = stack;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        for (Py_ssize_t i = 0; i < fields; i++)
            values[i] = i < given ? args[i] : NULL;
        if (fill_from_keywords(m, values, args + given, kwnames) < 0)
            return NULL;
    }
    else if (given == fields) {
        values = (PyObject **)args; /* the common case: every field, in order */
    }
    else {
        for (Py_ssize_t i = 0; i < fields; i++)
            values[i] = i < given ? args[i] : NULL;
    }
    /* Defaults made by a factory, one new reference each (made[i]), else NULL. */
    PyObject *made[MAX_FIELDS];
    Py_ssize_t made_count = 0;
    if (values != (PyObject **)args) {
        for (Py_ssize_t i = 0; i < fields; i++) {
            made[i] = NULL;
            if (values[i] != NULL)
                continue;
            if (i < m->required) {
                PyErr_Format(PyExc_TypeError, "%s() missing required argument '%U'",
                             m->cls->tp_name, PyTuple_GET_ITEM(m->names, i));
                goto fail;
            }
            PyObject *factory = PyTuple_GET_ITEM(m->factories, i - m->required);
            if (factory == Py_None) {
                values[i] = PyTuple_GET_ITEM(m->defaults, i - m->required);
                continue;
            }
            made[i] = PyObject_CallNoArgs(factory);
            if (made[i] == NULL)
                goto fail;
            made_count = i + 1;
            values[i] = made[i];
        }
    }
    PyObject *obj = m->cls->tp_alloc(m->cls, 0);
    if (obj == NULL)
        goto fail;
    char *base = (char *)obj;
    for (Py_ssize_t i = 0; i < fields; i++)
        *(PyObject **)(base + m->offsets[i]) = Py_NewRef(values[i]);
    for (Py_ssize_t i = 0; i < made_count; i++)
        Py_XDECREF(made[i]);
    return obj;
fail:
    for (Py_ssize_t i = 0; i < made_count; i++)
        Py_XDECREF(made[i]);
    return NULL;
}

static PyObject *
maker_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *cls, *names, *defaults, *factories;
    static char *keywords[] = {"cls", "names", "defaults", "factories", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!O!:Maker", keywords, &PyType_Type,
                                     &cls, &PyTuple_Type, &names, &PyTuple_Type, &defaults,
                                     &PyTuple_Type, &factories))
        return NULL;
    PyTypeObject *klass = (PyTypeObject *)cls;
    Py_ssize_t fields = PyTuple_GET_SIZE(names);
    if (fields == 0 || fields > MAX_FIELDS || PyTuple_GET_SIZE(defaults) > fields ||
        PyTuple_GET_SIZE(factories) != PyTuple_GET_SIZE(defaults)) {
        PyErr_SetString(PyExc_TypeError,
                        "Maker: 1 to 32 fields, at most a default each, a factory per default");
        return NULL;
    }
    if (klass->tp_new != PyBaseObject_Type.tp_new || klass->tp_itemsize != 0) {
        PyErr_Format(PyExc_TypeError, "Maker: %s has a __new__ of its own or a variable size",
                     klass->tp_name);
        return NULL;
    }
    Maker *m = (Maker *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->offsets = PyMem_New(Py_ssize_t, fields);
    if (m->offsets == NULL) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < fields; i++) {
        /* Each field must be a writable object slot of the class itself: its member
         * descriptor gives the offset its own __set__ would store at. */
        PyObject *name = PyTuple_GET_ITEM(names, i);
        PyObject *descr = PyUnicode_Check(name) ? PyDict_GetItemWithError(klass->tp_dict, name)
                                                : NULL;
        int slot = descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                   PyDescr_TYPE(descr) == klass;
        if (slot) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            slot = member->type == T_OBJECT_EX && !(member->flags & READONLY);
            m->offsets[i] = member->offset;
        }
        if (!slot) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "Maker: field %zd of %s is not an object slot of its own",
                             i, klass->tp_name);
            Py_DECREF(m);
            return NULL;
        }
    }
    m->cls = (PyTypeObject *)Py_NewRef(cls);
    m->names = Py_NewRef(names);
    m->defaults = Py_NewRef(defaults);
    m->factories = Py_NewRef(factories);
    m->fields = fields;
    m->required = fields - PyTuple_GET_SIZE(defaults);
    m->vectorcall = (vectorcallfunc)maker_call;
    return (PyObject *)m;
}

static int
maker_traverse(Maker *m, visitproc visit, void *arg)
{
    Py_VISIT(m->cls);
    Py_VISIT(m->names);
    Py_VISIT(m->defaults);
    Py_VISIT(m->factories);
    return 0;
}

static int
maker_clear(Maker *m)
{
    Py_CLEAR(m->cls);
    Py_CLEAR(m->names);
    Py_CLEAR(m->defaults);
    Py_CLEAR(m->factories);
    return 0;
}

static void
maker_dealloc(Maker *m)
{
    PyObject_GC_UnTrack(m);
    maker_clear(m);
    PyMem_Free(m->offsets);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyObject *
maker_repr(Maker *m)
{
    return PyUnicode_FromFormat("<fast constructor of %s>", m->cls ? m->cls->tp_name : "?");
}

static PyTypeObject MakerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "parsers._fastnew.Maker",
    .tp_basicsize = sizeof(Maker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Maker, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = maker_new,
    .tp_traverse = (traverseproc)maker_traverse,
    .tp_clear = (inquiry)maker_clear,
    .tp_dealloc = (destructor)maker_dealloc,
    .tp_repr = (reprfunc)maker_repr,
    .tp_doc = "Maker(cls, names, defaults, factories): builds cls, filling its slots directly.",
};

static struct PyModuleDef fastnew_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "parsers._fastnew",
    .m_doc = "The C twin of parsers.fastnew: constructors for slotted dataclasses.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastnew(void)
{
    if (PyType_Ready(&MakerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastnew_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Maker", (PyObject *)&MakerType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
