"""Stand-in of rtp-llm (alibaba/rtp-llm @ 4b8d39cd5cbe4eff0cf0661411e15be21ccc58b9), package ``rtp_llm``.

Only the modules and names that ``routers/rtp_llm.py`` and the three DeepEP tests ported into ``tests/rtp_llm/``
import, rewritten from rtp-llm's sources (same module paths, names, signatures, dataclass fields and behaviour;
C++ pybind configs as plain Python classes). Every file names the rtp-llm file it mirrors. What is left out or
differs is said in the file, next to it. ``tests/rtp_llm/conftest.py`` puts the directory holding this package on
``sys.path``; spawned ranks inherit it.

rtp-llm's DeepEP wrapper and routers are here in rtp-llm's own module shape; an engine (and each ported test)
calls ``routers.rtp_llm.install()``, which binds deepep-switch's objects in their place.
"""
