"""Stand-in package for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/defs/``.

rtp-llm's ``__init__`` re-exports the strategy machinery (``FusedMoe``, ``MoeStrategy``, ``StrategyAttributes``,
...); nothing here imports through it, so this stand-in is a package marker. Import from the submodules.
"""
