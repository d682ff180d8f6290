"""Skips that depend on the installed packages rather than on the test."""

import pytest


def interpreter_problem():
    """Why Triton's interpreter cannot run the fused paths' kernels here, or None. Before Triton 3.7 it
    hands a kernel its int arguments as 1-element arrays, and numpy 2.4 and later refuse those as Python
    ints (range(r0, r1) in a kernel raises TypeError)."""
    try:
        import triton
    except ImportError:
        return 'triton is not installed'
    import numpy
    version = lambda v: tuple(int(x) for x in v.split('.')[:2])
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} passes ints numpy {numpy.__version__} "
                "cannot convert (needs triton >= 3.7 or numpy < 2.4)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = interpreter_problem()
    for item in items:
        if reason and 'triton_interpreter' in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
