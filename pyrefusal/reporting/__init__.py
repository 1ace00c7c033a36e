"""Reporting: report.md, figures and the formatting they share."""
