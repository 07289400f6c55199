"""gkd_d2's command-line tools. A package so that a tool can import its sibling modules: such a
tool runs as a module from the repository root (``python -m tools.rehearse``)."""
