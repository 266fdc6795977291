"""The stage table that scripts/acceptance.sh and scripts/replicate.sh print, read back by tests."""


def stage_rows(stdout: str, stages: list[str]) -> dict[str, list[str]]:
    """stage -> its other cells (status, seconds, figures), for the rows of the given stages."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in stages:
            rows[cells[0]] = cells[1:]
    return rows
