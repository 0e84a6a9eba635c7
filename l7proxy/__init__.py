"""l7proxy: a transparent Layer-7 policy proxy fed by eBPF redirection."""

__version__ = "0.1.0"
