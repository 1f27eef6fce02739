"""The report: every fit run on a sweep, written as Markdown, JSON and figures (and, optionally, a wandb run)."""

from analysis.report.build import fit_all, make_plots, write_report

__all__ = ["fit_all", "make_plots", "write_report"]
