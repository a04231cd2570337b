"""Where buffer classes come from besides real DeepEP: the pure-PyTorch reference providers (``reference/``).

Each generation's module (``deepep_switch/backends/<name>.py``) names its reference class; the registry picks it
when ``DEEPEP_SWITCH_PROVIDER=reference``.
"""
