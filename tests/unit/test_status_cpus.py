"""`xdpoib status` writes the agent's CPUs as taskset and systemd's CPUAffinity= do."""

import pytest

from xdpoib.commands.status import cpu_ranges


@pytest.mark.parametrize(("cpus", "text"), [
    ([3], "3"), ([0, 1], "0-1"), ([5, 0, 1, 2], "0-2,5"), ([0, 2, 4], "0,2,4"),
    ([0, 1, 2, 3, 7, 8, 10], "0-3,7-8,10"), ([], ""),
])
def test_cpu_ranges(cpus, text):
    assert cpu_ranges(cpus) == text
