"""Sphinx configuration for the txkernel user guide (Markdown via MyST)."""

project = "txkernel"
author = "the txkernel developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
myst_heading_anchors = 3  # "page.md#a-heading" links, as on GitHub
