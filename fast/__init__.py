"""
The fast GPU paths, applied from outside to a model built by model.py, the way compilation is:

    model = GPT(config)
    fast.apply(model, 'auto')   # before the optimizer is made: the stream's parameters are replaced
    model.compile()

model.py imports nothing from here and stays the reference; tests/test_fastroute.py and
tests/test_fastddl.py hold these paths to it, forward and every gradient.
  route.py  AttnRes and Delta AttnRes: one kernel per read forward, one per source backward
  ddl.py    Deep Delta Learning: the delta-rule write in one kernel each way
"""
# 'auto': fused where it measured faster (on CUDA; see each fused())
from cli import ROUTE_IMPLS as IMPLS
from model import DeepDelta, Routed


def apply(model, impl='auto'):
    """Swap model.stream for its fused twin: the same parameters (copied over, so call this before
    making the optimizer), the same math. 'plain' leaves the model as it is. Returns, in words, what
    was done."""
    if impl not in IMPLS:
        raise ValueError(f"route_impl={impl!r}: expected one of {', '.join(IMPLS)}")
    old = model.stream
    # the standard stream has nothing to fuse
    if impl == 'plain' or type(old) not in (Routed, DeepDelta):
        return 'plain'
    if isinstance(old, Routed):
        from fast.route import FusedRouted
        new = FusedRouted(model.config, old.additive, impl)
    else:  # the DDL write's backward recomputes c = ln(h), so it is given the pre-norms
        from fast.ddl import FusedDeepDelta
        new = FusedDeepDelta(model.config, [norm for norm, _ in model.sublayers()], impl)
    p = next(old.parameters())
    new.to(device=p.device, dtype=p.dtype).load_state_dict(old.state_dict())
    model.stream = new
    return f'{impl} ({type(new).__name__})'
