"""Reporting layer: turning outcomes into text, JSON, JUnit properties and HTML.

Owns the summary table and failure text (``reports``) and the HTML page (``html``). May import the base modules
and the analysis formatting helpers; it reads records only and never runs a model.
"""
