"""Stand-in package marker for alibaba/rtp-llm@4b8d39cd
``rtp_llm/config/`` (see ``rtp_llm/__init__.py``)."""
