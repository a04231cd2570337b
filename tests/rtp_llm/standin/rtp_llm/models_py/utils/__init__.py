"""Stand-in package marker for alibaba/rtp-llm@4b8d39cd
``rtp_llm/models_py/utils/`` (see ``rtp_llm/__init__.py``)."""
