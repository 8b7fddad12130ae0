"""A Numba compiler pipeline for helpers that only ever run inlined into fastce's kernels.

Numba compiles every ``@njit`` function called by a kernel as a library of its own and
finalises it: optimises its module at -O3, then emits machine code for it, before the kernel
links the helper's IR in, inlines it and optimises the whole again.  For a helper that is
never called on its own (no Python or C wrapper: only kernels call it, and each kernel's
module holds a copy of its IR, inlined or not) that first optimisation and the machine code
are thrown away: ~10-15% of the CPU time of the first calls (issue #16).

``InlineOnlyCompiler`` (``njit(pipeline_class=...)``) is Numba's nopython pipeline with one
pass added before lowering: the helper's code library links its callees' IR and stops there.
Its IR reaches the kernel unoptimised (after the function-level passes that Numba runs on
every module), and the kernel's optimisation, which inlines it, is the only one it gets.
Such a helper can't be called from Python (it has no machine code); Numba's other users in
the process are untouched.  The kernels compute bitwise the same results either way (see
tests/test_coldstart.py).

``PIPELINE`` is None, and the helpers compile as Numba's other functions do, where a Numba
release lacks what this relies on (its code library classes, pass registry) or where the
environment sets ``FASTCE_INLINE_ONLY=0``.
"""
from __future__ import annotations

import os

__all__ = ["PIPELINE"]


def _make_pipeline():
    from numba.core.codegen import JITCodeLibrary
    from numba.core.compiler import CompilerBase, DefaultPassBuilder
    from numba.core.compiler_machinery import LoweringPass, register_pass
    from numba.core.typed_passes import AnnotateTypes

    class InlineOnlyLibrary(JITCodeLibrary):
        """A code library whose finalisation links its callees' IR in and does nothing
        else: no module optimisation, no machine code (its functions resolve to 0)."""

        def finalize(self):
            self._raise_if_finalized()
            seen = set()
            for library in self._linking_libraries:
                if library not in seen:
                    seen.add(library)
                    self._reload_init.update(library._reload_init)
                    self._final_module.link_in(library._get_module_for_linking(),
                                               preserve=True)
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
    class UseInlineOnlyLibrary(LoweringPass):
        _name = "fastce_inline_only_library"

        def __init__(self):
            LoweringPass.__init__(self)

        def run_pass(self, state):
            if state.library is None:
                codegen = state.targetctx.codegen()
                state.library = InlineOnlyLibrary(codegen, state.func_id.func_qualname)
                state.library.enable_object_caching()
                return True
            return False

    class InlineOnlyCompiler(CompilerBase):
        def define_pipelines(self):
            pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
            pm.add_pass_after(UseInlineOnlyLibrary, AnnotateTypes)
            pm.finalize()
            return [pm]

    return InlineOnlyCompiler


PIPELINE = None
if os.environ.get("FASTCE_INLINE_ONLY", "1") != "0":
    try:
        PIPELINE = _make_pipeline()
    except (ImportError, AttributeError, TypeError, ValueError):      # pragma: no cover
        PIPELINE = None
