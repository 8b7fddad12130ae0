"""A Numba compiler pipeline for fastce's helpers: no machine code for functions that only
ever run inlined into the kernels.

Numba compiles each ``@njit`` function as a code library of its own and finalises it: it
optimises the library's module at -O3, emits machine code for it and adds it to the JIT
engine.  A kernel links in its helpers' optimised modules and optimises the whole again,
inlining them.  fastce's helpers are only ever called by its kernels (no Python or C wrapper;
each kernel's module holds a copy of their IR, inlined or not), so their machine code was
never run: ~0.8 s of the cold table's 6.5-8.7 s of LLVM time (issue #16).

``HELPER`` is Numba's nopython pipeline with one pass added before lowering, which gives the
helper a code library whose finalisation links in its callees' IR and optimises it as Numba's
does, then stops.  The kernels' results are bitwise the same (tests/test_coldstart.py); their
machine code differs a little, because Numba's machine-code emission rewrites the helper's IR
in place (LLVM's code generation passes: 14 of the 20 modules of a rows call grew) before the
kernels link it in, and ran within ~2% of Numba's in alternating processes.  A helper cannot
be called from Python.  Numba's other users in the process are untouched.

``HELPER`` is None, and the helpers compile as Numba's other functions do, where a Numba
release lacks what this relies on (its code library classes, pass registry) or where the
environment sets ``FASTCE_NUMBA_PIPELINES=default``.

Not done: skipping the helpers' -O3 as well (another ~1.5 s): the kernels then inline
unoptimised IR, and the rows kernel's exp loop came out with 4x the stack spills (W1 forward
3-4% slower); skipping the function passes on every module (~0.9 s): softmax and probability
targets 5-10% slower.
"""
from __future__ import annotations

import os

__all__ = ["HELPER"]


def _make_pipeline():
    from numba.core.codegen import JITCodeLibrary
    from numba.core.compiler import CompilerBase, DefaultPassBuilder
    from numba.core.compiler_machinery import LoweringPass, register_pass
    from numba.core.typed_passes import AnnotateTypes

    # What HelperLibrary calls of Numba's code library (an AttributeError: Numba's pipeline);
    # the fields it reads (_linking_libraries, _final_module, _reload_init) are checked by
    # tests/test_coldstart.py on the installed Numba.
    for name in ("_raise_if_finalized", "_ensure_finalized", "_get_module_for_linking",
                 "_optimize_final_module", "enable_object_caching"):
        getattr(JITCodeLibrary, name)

    class HelperLibrary(JITCodeLibrary):
        """Finalisation links the callees' IR in and optimises the module as Numba's does,
        then stops: no machine code (its functions resolve to address 0)."""

        def finalize(self):
            self._raise_if_finalized()
            seen = set()
            for library in self._linking_libraries:
                if library not in seen:
                    seen.add(library)
                    self._reload_init.update(library._reload_init)
                    self._final_module.link_in(library._get_module_for_linking(),
                                               preserve=True)
            # Numba's -O3, as its own finalisation runs it (the kernels inline this IR); what
            # is skipped is the machine code, which would also rewrite the IR in place.
            self._optimize_final_module()
            self._final_module.verify()
            self._finalized = True

        def get_pointer_to_function(self, name):
            self._ensure_finalized()
            return 0

        @property
        def codegen(self):
            # Numba sets each compiled function's environment pointer in the JIT engine,
            # which holds nothing of this library.  Kernels never read their helpers'
            # environments (a kernel loaded from the on-disk cache has none either).
            return _NoEnvironment(self._codegen)

    class _NoEnvironment:
        def __init__(self, codegen):
            self._codegen = codegen

        def set_env(self, env_name, env):
            pass

        def __getattr__(self, name):
            return getattr(self._codegen, name)

    @register_pass(mutates_CFG=False, analysis_only=False)
    class UseHelperLibrary(LoweringPass):
        _name = "fastce_use_helper_library"

        def __init__(self):
            LoweringPass.__init__(self)

        def run_pass(self, state):
            if state.library is not None:
                return False
            state.library = HelperLibrary(state.targetctx.codegen(),
                                          state.func_id.func_qualname)
            state.library.enable_object_caching()
            return True

    class HelperCompiler(CompilerBase):
        def define_pipelines(self):
            pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
            pm.add_pass_after(UseHelperLibrary, AnnotateTypes)
            pm.finalize()
            return [pm]

    return HelperCompiler


HELPER = None
if os.environ.get("FASTCE_NUMBA_PIPELINES", "fastce") != "default":
    try:
        HELPER = _make_pipeline()
    except (ImportError, AttributeError, TypeError, ValueError):      # pragma: no cover
        HELPER = None
