"""The kernel datapath: the only package that imports bcc or makes BPF syscalls.

``loader`` compiles ``sockmap.c`` (shipped with the package; ``bpf/sockmap.c`` in a checkout),
attaches it at tc with pyroute2 and keeps its maps equal to the desired state; ``bpfsys`` is
the raw ``bpf()`` syscall for what bcc cannot do; ``pins`` keeps maps on bpffs across restarts.
"""
