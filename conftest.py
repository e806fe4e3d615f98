"""Settings for every test the suite collects, the notebooks included (tests/conftest.py holds the
fixtures of the unit tests).

nbval waits only 5 seconds for a cell's outputs once the kernel reports the cell finished, and fails the
cell when they come later. On a machine busy with other work (two pytest workers training models on two
cores), the kernel can take longer than that to send them, so a correct notebook failed. The outputs
still have to arrive: the wait is longer, not gone.
"""

NBVAL_OUTPUT_TIMEOUT = 120  # seconds


def pytest_collection_modifyitems(items):
    for item in items:
        if type(item).__name__ == "IPyNbCell":
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT
