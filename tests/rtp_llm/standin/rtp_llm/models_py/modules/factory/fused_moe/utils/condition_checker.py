"""Stand-in for alibaba/rtp-llm@4b8d39cd ``rtp_llm/models_py/modules/factory/fused_moe/utils/condition_checker.py``:
``ConditionChecker``, which records each ``check(result, **details)`` a router's ``check_conditions`` makes,
with the condition's source text, in ``.conditions``."""

from __future__ import annotations

import inspect
import linecache
import logging
import re
from typing import Any

logger = logging.getLogger(__name__)


class ConditionChecker:
    """Records ``(counter, condition source, result, details)`` per check; ``all_passed()`` ands the results."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conditions: list[tuple[int, str, bool, dict[str, Any]]] = []
        self.counter = 0

    def check(self, result: bool, **details: Any) -> bool:
        self.counter += 1
        self.conditions.append((self.counter, self._condition_source(), result, details))
        return result

    @staticmethod
    def _parse_check_argument(text: str) -> str:
        """The first argument of the first ``.check(`` call in ``text`` (bracket matching), whitespace-normalised."""
        match = re.search(r"\.check\s*\(", text)
        if not match:
            return ""
        parens = brackets = 0
        for i in range(match.end(), len(text)):
            char = text[i]
            if char == "(":
                parens += 1
            elif char == "[":
                brackets += 1
            elif char == "]":
                brackets -= 1
            elif char == ")" and parens:
                parens -= 1
            elif (char == ")" and not parens) or (char == "," and not parens and not brackets):
                return re.sub(r"\s+", " ", text[match.end():i].strip())
        return ""

    def _condition_source(self) -> str:
        """The calling ``checker.check(...)`` expression, read from the caller's source (up to 10 lines)."""
        try:
            caller = inspect.currentframe().f_back.f_back  # type: ignore[union-attr]
            info = inspect.getframeinfo(caller)  # type: ignore[arg-type]
            text = " ".join(linecache.getline(info.filename, info.lineno + i).rstrip() for i in range(10))
            return self._parse_check_argument(text) or "unknown"
        except Exception:
            return "unknown"

    def all_passed(self) -> bool:
        result = all(cond[2] for cond in self.conditions)
        lines = [f"[ConditionChecker] Checking {self.name}:"]
        for counter, condition, ok, details in self.conditions:
            detail = f" ({', '.join(f'{k}={v}' for k, v in details.items())})" if details else ""
            lines.append(f"  {'✓' if ok else '✗'} condition_{counter}: {condition} = {ok}{detail}")
        lines.append(f"  → Final result: {result}")
        logger.debug("\n".join(lines))
        return result
