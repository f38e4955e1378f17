"""METHODS: every quantization method by name, one `Method` object each (its layer rule and what it needs).

A new method is one `Method` object next to its rule, added here.
"""
from gpfq.methods.gpfq.variants import GPFQ, MSQ, SPARSE_GPFQ, SPFQ
from gpfq.methods.gptq import GPTQ
from gpfq.methods.method import Method
from gpfq.methods.qronos import QRONOS

METHODS = {method.name: method for method in (GPFQ, MSQ, GPTQ, SPFQ, SPARSE_GPFQ, QRONOS)}
METHOD_NAMES = tuple(METHODS)


def method_of(name: str) -> Method:
    """The method called `name`; ValueError naming the choices for an unknown name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {tuple(METHODS)}")
    return METHODS[name]
