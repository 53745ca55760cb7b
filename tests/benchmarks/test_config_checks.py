"""benchmarks/config_checks: the counts issue 26 is measured by."""

from __future__ import annotations

from benchmarks.config_checks import count

SOURCE = '''
from segplat.errors import ConfigError, DataError


def f(x):
    # a comment is no code line
    if x < 0:
        y = -x
        raise ConfigError(
            f"x={x} must be positive")
    if x == 3:
        raise DataError("not a config error")
    for i in range(x):
        raise ConfigError("in a loop, outside an if")
    return x
'''


def test_sites_check_lines_and_code_lines() -> None:
    sites, checks, code = count(SOURCE)
    assert sites == 2
    assert checks == 4 + 1  # the if down to the end of its raise, and the raise in the loop on its own
    assert code == 11
