"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/utils/math.py``."""


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``."""
    return ceil_div(x, y) * y
