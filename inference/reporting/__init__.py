"""Reporting: diagnostics of any model/guide pair, figures, the run report and comparisons.
Imports the experiment and algorithms layers below it."""
