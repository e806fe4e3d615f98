"""The bibliography's style: author-year labels, as the text cites, and one link per entry.

pybtex's ``plain`` style labels entries with numbers and prints both the URL and the arXiv
identifier of an entry (two links to one page). This Sphinx extension registers

* the label style ``authoryear``: "Madry et al. 2018", "Carlini and Wagner 2017", "Goodfellow
  et al. 2015"; two works with the same label get "a", "b" after the year;
* the formatting style ``book``: ``plain`` with these labels, and one web reference per entry (the
  URL when there is one, else the arXiv identifier, else the DOI).

``_config.yml`` loads it through ``local_extensions`` and names it in ``bibtex_default_style``.
"""

from __future__ import annotations

from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.template import first_of, optional, sentence


def _surname(person) -> str:
    """The last name as printed: LaTeX braces and accent commands removed."""
    text = " ".join(person.prelast_names + person.last_names)
    return str(Text.from_latex(text)) if text else "Anonymous"


def author_year(entry) -> str:
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_surname(p) for p in people]
    if not names:
        who = "Anonymous"
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who} {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [author_year(e) for e in entries]
        counts = Counter(labels)
        seen: Counter = Counter()
        for label in labels:
            if counts[label] > 1:
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label]]
                seen[label] += 1
            else:
                yield label


class BookStyle(PlainStyle):
    default_label_style = "authoryear"

    def format_web_refs(self, e):
        return sentence[first_of[optional[self.format_url(e)], optional[self.format_eprint(e)],
                                 optional[self.format_doi(e)]]]


def setup(app):
    register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "book", BookStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
