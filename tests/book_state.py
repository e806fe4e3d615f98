"""What the tests know about the state of the committed notebooks, in one place.

A chapter's committed outputs follow the book's page conventions once the chapter has been
re-executed with ``scripts/execute_notebooks.py``: figures at most 7.5 inches wide
(``utils.plot.MAX_WIDTH``), and the Colab install cell pinned to the executing commit. The sets
below name the chapters whose outputs are older. The checks of those conventions treat them as
expected failures, strictly: a chapter that passes makes its test fail until it is removed here.
"""

import re

#: Folders of the machine that executed a notebook, which no output may show a reader.
MACHINE_PATH = re.compile(r"/root/|/home/|/tmp/|C:\\Users|site-packages", re.I)

#: Chapters whose Colab install cell is not yet pinned to the commit that produced the outputs.
AWAITING_REEXECUTION: frozenset[str] = frozenset()

#: Chapters whose committed figures are wider than the content column allows (shown below 75%).
FIGURES_PREDATE_STYLE: frozenset[str] = frozenset()

#: Chapters executed before the script recorded each run's wall time and machine
#: (``advbook.seconds``) and stated it in the header.
RUNTIME_NOT_RECORDED: frozenset[str] = frozenset()
