"""Stand-in package marker for alibaba/rtp-llm@4b8d39cd
``rtp_llm/test/`` (see ``rtp_llm/__init__.py``)."""
